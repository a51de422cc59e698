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
    import torch
    from torch.utils.cpp_extension import load

    mod = load(name="unimlm_msda_classic", sources=[str(SOURCE)], extra_cuda_cflags=["-O3", "-std=c++17"],
               verbose=verbose)
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

    def forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        n, s, m, d = value.shape
        _, lq, _, n_levels, n_points, _ = sampling_locations.shape
        args = [t.contiguous() for t in (value, spatial_shapes, level_start_index)]
        args += [t.to(value.dtype).contiguous() for t in (sampling_locations, attention_weights)]
        out = torch.empty((n, lq, m * d), device=value.device, dtype=value.dtype)
        mod.forward(*(t.data_ptr() for t in args), out.data_ptr(), n, s, m, d, n_levels, lq, n_points,
                    codes[value.dtype], torch.cuda.current_stream(value.device).cuda_stream)
        return out

    return forward
