"""csrc/kernels/msda.cu: compiles with nvcc for sm_80 and sm_90a (when nvcc is on PATH), and,
on a CUDA machine with a CUDA build of unimlm_engine._C, matches the reference op."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from unimlm_engine.ops.msda import _CUDA_DTYPE_CODE, _cuda_module, ms_deform_attn_reference

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_msda_cu_compiles(arch, tmp_path):
    obj = tmp_path / f"msda_{arch}.o"
    cmd = [NVCC, "-std=c++17", f"-gencode=arch=compute_{arch[3:]},code={arch}", "--expt-relaxed-constexpr",
           "-I", str(ROOT / "csrc"), "-c", str(ROOT / "csrc" / "kernels" / "msda.cu"), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr[-4000:]}"
    assert obj.stat().st_size > 0


CUDA_MOD = _cuda_module() if torch.cuda.is_available() else None
needs_cuda_build = pytest.mark.skipif(CUDA_MOD is None, reason="needs a CUDA device and a CUDA build of _C")

# name: (levels [(H, W)], N, M, D, Lq, P)
RUN_CASES = {
    "L4P4-D32": ([(20, 33), (10, 17), (5, 9), (3, 5)], 2, 8, 32, 333, 4),
    "L4P8-D32": ([(20, 33), (10, 17), (5, 9), (3, 5)], 1, 8, 32, 111, 8),
    "L3P3-D13-scalar-path": ([(7, 9), (4, 5), (1, 1)], 2, 3, 13, 63, 3),
    "L4P4-D24": ([(9, 11), (5, 6), (3, 3), (1, 2)], 1, 4, 24, 1, 4),
}


def _inputs(case, dtype, loc_dtype):
    levels, n, m, d, lq, p = RUN_CASES[case]
    shapes = torch.tensor(levels, dtype=torch.int64, device="cuda")
    hw = shapes.prod(dim=1)
    starts = torch.cumsum(hw, 0) - hw
    value = torch.randn(n, int(hw.sum()), m, d, device="cuda").to(dtype)
    loc = (torch.rand(n, lq, m, len(levels), p, 2, device="cuda") * 1.4 - 0.2).to(loc_dtype)
    attn = torch.randn(n, lq, m, len(levels), p, device="cuda").to(loc_dtype)
    return value, shapes, starts, loc, attn


def _cuda_poisoned(value, shapes, starts, loc, attn, softmax_weights):
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = loc.shape
    out = torch.full((n, lq, m * d), float("nan"), device="cuda", dtype=value.dtype)
    stream = torch.cuda.current_stream().cuda_stream
    CUDA_MOD.msda_forward(value.data_ptr(), shapes.data_ptr(), starts.data_ptr(), loc.data_ptr(), attn.data_ptr(),
                          out.data_ptr(), n, s, m, d, n_levels, lq, n_points, _CUDA_DTYPE_CODE[value.dtype], stream,
                          softmax_weights, _CUDA_DTYPE_CODE[loc.dtype])
    torch.cuda.synchronize()
    return out


DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32),
          (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@needs_cuda_build
@pytest.mark.parametrize("softmax_weights", [False, True], ids=["weights", "fused-softmax"])
@pytest.mark.parametrize("dtype,loc_dtype", DTYPES, ids=["fp32", "fp16", "fp16-locfp32", "bf16", "bf16-locfp32"])
@pytest.mark.parametrize("case", list(RUN_CASES))
def test_cuda_kernel_matches_reference(case, dtype, loc_dtype, softmax_weights):
    args = _inputs(case, dtype, loc_dtype)
    got = _cuda_poisoned(*args, softmax_weights)
    expected = ms_deform_attn_reference(*args, softmax_weights)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, atol=TOL[dtype], rtol=TOL[dtype])


@needs_cuda_build
def test_cuda_kernel_misaligned_value_takes_scalar_path():
    value, shapes, starts, loc, attn = _inputs("L4P4-D32", torch.float16, torch.float16)
    flat = torch.empty(value.numel() + 1, device="cuda", dtype=value.dtype)
    shifted = flat[1:].view(value.shape)  # 2-byte offset: no 16-byte loads possible
    shifted.copy_(value)
    got = _cuda_poisoned(shifted, shapes, starts, loc, attn, False)
    torch.testing.assert_close(got, ms_deform_attn_reference(value, shapes, starts, loc, attn), atol=3e-3, rtol=3e-3)


@needs_cuda_build
def test_cuda_kernel_rejects_bad_dtype_pair():
    value, shapes, starts, loc, attn = _inputs("L4P4-D24", torch.float32, torch.float16)
    with pytest.raises(RuntimeError, match="msda_forward"):
        _cuda_poisoned(value, shapes, starts, loc, attn, False)
