"""csrc/kernels/msda.cu: compiles with nvcc for sm_80 and sm_90a (when nvcc is on PATH) with
branch-free corner loads in the sm_90a SASS; the kernel's per-thread body (msda_thread, host +
device) run on the CPU through a small nvcc-built harness matches the reference; on a CUDA
machine with a CUDA build of unimlm_engine._C, the kernel itself matches the reference op."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from unimlm_engine.ops.msda import _CUDA_DTYPE_CODE, _cuda_module, cuda_unavailable_reason, ms_deform_attn_reference

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")


def _cuobjdump() -> str | None:
    """cuobjdump from PATH, else the copy Triton's NVIDIA backend ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return None
    path = Path(nv.__file__).parent / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def _sass_functions(text: str) -> dict[str, list[str]]:
    """cuobjdump -sass output -> {mangled kernel name: instruction lines}."""
    funcs: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        if "Function : " in line:
            name = line.split("Function : ")[1].strip()
            funcs[name] = []
        elif name and "/*" in line and ";" in line:
            funcs[name].append(line)
    return funcs


def _check_branch_free_corners(sass: str) -> None:
    """In the (L, P) = (4, 4) 16-byte-vector instances no corner load is predicated or sits between
    branches one at a time: all 4*4*4 LDG.E.128 come in one branch-free stretch (the earlier code had
    one load per branch, so one load in flight per thread)."""
    checked = 0
    for name, lines in _sass_functions(sass).items():
        if "Li4ELi4EE" not in name or "ELi1ELi" in name:
            continue
        loads = [i for i, line in enumerate(lines) if "LDG.E.128" in line]
        assert len(loads) == 4 * 4 * 4, (name, len(loads))
        assert not any("@" in lines[i].split("LDG")[0] for i in loads), f"predicated corner load in {name}"
        between = [line for line in lines[loads[0]:loads[-1]] if "BRA" in line or "BSSY" in line]
        assert not between, f"{len(between)} branches between the corner loads of {name}"
        checked += 1
    assert checked == 5, checked  # fp32, fp16, fp16/fp32-loc, bf16, bf16/fp32-loc


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_msda_cu_compiles_for_sm80_and_sm90a(tmp_path):
    """One nvcc call, both targets compiled in parallel (--threads 2): ~30 s of CPU per target."""
    obj = tmp_path / "msda.o"
    cmd = [NVCC, "-std=c++17", "--threads", "2", "-gencode=arch=compute_80,code=sm_80",
           "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr", "-I", str(ROOT / "csrc"), "-c",
           str(ROOT / "csrc" / "kernels" / "msda.cu"), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr[-4000:]}"
    assert obj.stat().st_size > 0
    dump = _cuobjdump()
    if dump is None:
        pytest.skip("compiled; cuobjdump not found (PATH or Triton's NVIDIA backend), SASS not checked")
    sass = subprocess.run([dump, "-sass", "-arch", "sm_90a", str(obj)], capture_output=True, text=True, timeout=300)
    assert sass.returncode == 0, sass.stderr[-2000:]
    _check_branch_free_corners(sass.stdout)


HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <string>

#include "kernels/msda.cuh"

using namespace unimlm::msda;

static void* read_all(const std::string& path, size_t bytes) {
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(p, 1, bytes, f) != bytes) std::exit(3);
  std::fclose(f);
  return p;
}

template <typename T, typename LocT, int V, int kL, int kP>
static void run_all(const std::string& dir, const int64_t* a, int softmax) {
  const int64_t n = a[0], s = a[1], m = a[2], d = a[3], levels = a[4], lq = a[5], points = a[6];
  const size_t nloc = static_cast<size_t>(n * lq * m * levels * points);
  auto* value = static_cast<T*>(read_all(dir + "/value.bin", n * s * m * d * sizeof(T)));
  auto* shapes = static_cast<int64_t*>(read_all(dir + "/shapes.bin", levels * 2 * sizeof(int64_t)));
  auto* starts = static_cast<int64_t*>(read_all(dir + "/starts.bin", levels * sizeof(int64_t)));
  auto* loc = static_cast<LocT*>(read_all(dir + "/loc.bin", nloc * 2 * sizeof(LocT)));
  auto* attn = static_cast<LocT*>(read_all(dir + "/attn.bin", nloc * sizeof(LocT)));
  const size_t nout = static_cast<size_t>(n * lq * m * d);
  auto* out = static_cast<T*>(std::aligned_alloc(64, (nout * sizeof(T) + 63) / 64 * 64));
  for (int64_t idx = 0; idx < n * lq * m * (d / V); ++idx) {
    msda_thread<T, LocT, V, kL, kP>(idx, value, shapes, starts, loc, attn, out, s, m, d, lq,
                                    static_cast<int>(levels), static_cast<int>(points), softmax != 0);
  }
  FILE* f = std::fopen((dir + "/out.bin").c_str(), "wb");
  std::fwrite(out, sizeof(T), nout, f);
  std::fclose(f);
  std::printf("V=%d kL=%d kP=%d\n", V, kL, kP);
}

// Same (V, L, P) choice as launch_typed / launch_levels_points.
template <typename T, typename LocT>
static void dispatch(const std::string& dir, const int64_t* a, int softmax) {
  constexpr int kWide = 16 / sizeof(T);
  if (a[3] % kWide != 0) return run_all<T, LocT, 1, 0, 0>(dir, a, softmax);
  if (a[4] == 4 && a[6] == 4) return run_all<T, LocT, kWide, 4, 4>(dir, a, softmax);
  if (a[4] == 4 && a[6] == 8) return run_all<T, LocT, kWide, 4, 8>(dir, a, softmax);
  run_all<T, LocT, kWide, 0, 0>(dir, a, softmax);
}

int main(int argc, char** argv) {
  if (argc != 12) return 2;
  int64_t a[7];
  for (int i = 0; i < 7; ++i) a[i] = std::atoll(argv[2 + i]);
  const int dtype = std::atoi(argv[9]), loc_dtype = std::atoi(argv[10]), softmax = std::atoi(argv[11]);
  const std::string dir = argv[1];
  if (dtype == kFloat32) dispatch<float, float>(dir, a, softmax);
  else if (dtype == kFloat16 && loc_dtype == kFloat16) dispatch<__half, __half>(dir, a, softmax);
  else if (dtype == kFloat16) dispatch<__half, float>(dir, a, softmax);
  else if (loc_dtype == kBFloat16) dispatch<__nv_bfloat16, __nv_bfloat16>(dir, a, softmax);
  else dispatch<__nv_bfloat16, float>(dir, a, softmax);
  return 0;
}
"""


@pytest.fixture(scope="module")
def host_harness(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    work = tmp_path_factory.mktemp("msda_harness")
    (work / "harness.cu").write_text(HARNESS)
    exe = work / "harness"
    cmd = [NVCC, "-std=c++17", "-O1", "-arch=sm_80", "--expt-relaxed-constexpr", "-I", str(ROOT / "csrc"),
           str(work / "harness.cu"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed on the host harness:\n{proc.stderr[-4000:]}"
    return exe


def _dump(t: torch.Tensor, path: Path) -> None:
    t.contiguous().view(-1).view(torch.uint8).numpy().tofile(path)


# name: (levels [(H, W)], N, M, D, Lq, P, value dtype, location dtype, softmax, path the harness prints)
HOST_CASES = {
    "fp32-L4P4-D32-vec4": ([(6, 9), (3, 5), (2, 3), (1, 1)], 2, 3, 32, 7, 4, torch.float32, torch.float32, False,
                           "V=4 kL=4 kP=4"),
    "fp16-L4P8-D16-vec8-locfp32-softmax": ([(5, 7), (3, 4), (2, 2), (1, 2)], 1, 2, 16, 9, 8, torch.float16,
                                           torch.float32, True, "V=8 kL=4 kP=8"),
    "bf16-L3P3-D13-scalar": ([(7, 9), (4, 5), (1, 1)], 2, 3, 13, 5, 3, torch.bfloat16, torch.bfloat16, False,
                             "V=1 kL=0 kP=0"),
    "fp16-L2P3-D24-vec8-runtime-LP-softmax": ([(5, 6), (2, 3)], 1, 2, 24, 6, 3, torch.float16, torch.float16,
                                              True, "V=8 kL=0 kP=0"),
}


@pytest.mark.parametrize("case", list(HOST_CASES))
def test_cuda_thread_body_on_host_matches_reference(case, host_harness, tmp_path):
    levels, n, m, d, lq, p, dtype, loc_dtype, softmax_weights, path = HOST_CASES[case]
    shapes = torch.tensor(levels, dtype=torch.int64)
    hw = shapes.prod(dim=1)
    starts = torch.cumsum(hw, 0) - hw
    value = torch.randn(n, int(hw.sum()), m, d).to(dtype)
    loc = (torch.rand(n, lq, m, len(levels), p, 2) * 1.6 - 0.3).to(loc_dtype)
    attn = torch.randn(n, lq, m, len(levels), p).to(loc_dtype)
    if softmax_weights:
        attn[:, ::2, :, 0, 0] = float("-inf")  # a masked logit must not poison the softmax
    for name, t in (("value", value), ("shapes", shapes), ("starts", starts), ("loc", loc), ("attn", attn)):
        _dump(t, tmp_path / f"{name}.bin")
    (tmp_path / "out.bin").write_bytes(b"")
    argv = [str(host_harness), str(tmp_path), *map(str, (n, int(hw.sum()), m, d, len(levels), lq, p)),
            str(_CUDA_DTYPE_CODE[dtype]), str(_CUDA_DTYPE_CODE[loc_dtype]), str(int(softmax_weights))]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == path, proc.stdout + proc.stderr
    raw = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.uint8)
    got = raw.view(dtype).view(n, lq, m * d)
    expected = ms_deform_attn_reference(value, shapes, starts, loc, attn, softmax_weights)
    torch.testing.assert_close(got, expected, atol=TOL[dtype], rtol=TOL[dtype])


CUDA_MOD = _cuda_module() if torch.cuda.is_available() else None
needs_cuda_build = pytest.mark.skipif(CUDA_MOD is None, reason=str(cuda_unavailable_reason()))

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


TRITON_AOT = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from unimlm_engine.kernels.msda import _msda_fwd_kernel

sig = {"value_ptr": "*bf16", "shapes_ptr": "*i64", "starts_ptr": "*i64", "loc_ptr": "*fp32", "attn_ptr": "*fp32",
       "out_ptr": "*bf16", "S": "i32", "M": "i32", "Lq": "i32", "D": "i32", "stride_s": "i32", "L": "constexpr",
       "P": "constexpr", "BLOCK_Q": "constexpr", "BLOCK_D": "constexpr", "SOFTMAX": "constexpr"}
# What the JIT specialises at run time for D = 32, M*D = 256 and 16-byte aligned tensors.
attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 9, 10)}
consts = {"L": 4, "P": 4, "BLOCK_Q": 32, "BLOCK_D": 32, "SOFTMAX": True}
k = triton.compile(ASTSource(fn=_msda_fwd_kernel, signature=sig, constexprs=consts, attrs=attrs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("v4", len(re.findall(r"ld\.global\.v4", k.asm["ptx"])), "cubin", len(k.asm["cubin"]))
"""


@pytest.mark.slow
def test_triton_kernel_compiles_for_sm90_with_vector_gathers():
    """Ahead-of-time Triton compile (no GPU needed, ~1-2 min of CPU): the kernel lowers to a
    cubin, and with D = 32 the bf16 corner gathers are 16-byte loads (one per corner)."""
    import os
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", TRITON_AOT], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    fields = proc.stdout.split()
    assert int(fields[fields.index("cubin") + 1]) > 0
    assert int(fields[fields.index("v4") + 1]) >= 4 * 4 * 4  # L*P samples x 4 corners


def _configure(tmp_path, mode: str) -> subprocess.CompletedProcess:
    """CMake configure only (nothing built) with a PATH holding no nvcc and CUDACXX unset."""
    import os
    import sys

    import pybind11

    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not (Path(d) / "nvcc").exists())
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CMAKE_CUDA_COMPILER")} | {"PATH": path}
    cmd = [shutil.which("cmake"), "-S", str(ROOT), "-B", str(tmp_path / mode), f"-DUNIMLM_CUDA={mode}",
           "-DUNIMLM_BUILD_TESTS=OFF", f"-DPython_EXECUTABLE={sys.executable}",
           f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not on PATH")
def test_cmake_without_nvcc_on_fails_and_auto_says_so(tmp_path):
    """UNIMLM_CUDA=ON without nvcc is a configure error naming what is missing; AUTO configures
    without the CUDA kernels and says so in a STATUS line."""
    on = _configure(tmp_path, "ON")
    assert on.returncode != 0
    assert "UNIMLM_CUDA=ON but no CUDA compiler" in on.stderr and "nvcc" in on.stderr, on.stderr[-2000:]
    auto = _configure(tmp_path, "AUTO")
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert "unimlm: building WITHOUT CUDA kernels (UNIMLM_CUDA=AUTO): no CUDA compiler" in auto.stdout
