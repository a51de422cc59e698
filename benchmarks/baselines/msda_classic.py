"""Loader for msda_classic.cu (the one-thread-per-output baseline kernel of bench_msda.py).

`load_classic()` JIT-builds it with torch.utils.cpp_extension.load (needs nvcc and a CUDA
build of torch) and returns a callable with the op's signature:
    (value [N, S, M, D], spatial_shapes [L, 2], level_start_index [L],
     sampling_locations [N, Lq, M, L, P, 2], attention_weights [N, Lq, M, L, P]) -> [N, Lq, M*D]
"""
from __future__ import annotations

from pathlib import Path

SOURCE = Path(__file__).resolve().with_name("msda_classic.cu")


def load_classic(verbose: bool = False):
    from torch.utils.cpp_extension import load

    mod = load(name="unimlm_msda_classic", sources=[str(SOURCE)], extra_cuda_cflags=["-O3", "-std=c++17"],
               verbose=verbose)

    def forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return mod.forward(value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                           sampling_locations.contiguous().to(value.dtype),
                           attention_weights.contiguous().to(value.dtype))

    return forward
