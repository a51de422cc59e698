"""Fused LoRA-MoE linear: the Triton kernel (TRITON_INTERPRET=1, forced with backend_override)
against the fp32 concatenated reference and the per-expert loop, with x W0^T by torch's GEMM
(the "cublas" base, the default) and by the kernel's own K loop ("triton"); launch 1's K splits; the
config's E / r limits are the kernel's."""
import pytest
import torch

from unimlm_engine.config import ConfigError, LoRAMoEConfig
from unimlm_engine.config.model import LORA_MOE_MAX_EXPERTS, LORA_MOE_MAX_RANK
from unimlm_engine.ops import lora_moe as lm
from unimlm_engine.ops._dispatch import backend_override

K, N = 160, 70  # K > 128 so the interpreter's K loop runs more than one tile; odd N


@pytest.fixture
def nan_empty(monkeypatch):
    """Fresh float buffers (mid, out) start as NaN so an unwritten element fails."""
    empty = torch.empty

    def _poison(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", _poison)


@pytest.fixture(params=["cublas", "triton"])
def base(request, monkeypatch):
    """Who computes x W0^T, set the way a deployment sets it (UNIMLM_LORA_MOE_BASE)."""
    monkeypatch.setenv("UNIMLM_LORA_MOE_BASE", request.param)
    return request.param


def make_inputs(t, e, r, dtype=torch.float32, k=K, n=N):
    """x is a non-contiguous row view; weights scaled so outputs are O(1)."""
    x = torch.randn(t, k + 7)[:, 3:3 + k]
    w0 = torch.randn(n, k) / k ** 0.5
    wg = torch.randn(e, k) / k ** 0.5 * 3  # peaked enough that the gate matters
    a = torch.randn(e * r, k) / k ** 0.5
    b = torch.randn(n, e * r) / (e * r) ** 0.5
    return [z.to(dtype) for z in (x, w0, wg, a, b)]


@pytest.mark.triton_cpu
@pytest.mark.parametrize("r", [1, 4, 16], ids=lambda v: f"r{v}")
@pytest.mark.parametrize("e", [1, 4, 16], ids=lambda v: f"E{v}")
@pytest.mark.parametrize("t", [1, 17, 130], ids=lambda v: f"T{v}")
def test_triton_matches_reference_and_loop(t, e, r, nan_empty, base):
    x, w0, wg, a, b = make_inputs(t, e, r)
    with backend_override("triton"):
        out = lm.lora_moe_linear(x, w0, wg, a, b, 2.0)
    assert not torch.isnan(out).any()
    ref = lm.lora_moe_reference(x.double(), w0.double(), wg.double(), a.double(), b.double(), 2.0)
    loop = lm.lora_moe_per_expert_loop(x, w0, wg, a, b, 2.0)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out, loop, atol=2e-5, rtol=1e-5)


@pytest.mark.triton_cpu
@pytest.mark.parametrize("t", [1, 33], ids=lambda v: f"T{v}")
def test_fp16_within_twice_torch_fp16_error(t, nan_empty, base):
    x, w0, wg, a, b = make_inputs(t, 8, 4, torch.float16)
    with backend_override("triton"):
        out = lm.lora_moe_linear(x, w0, wg, a, b, 4.0)
    ref = lm.lora_moe_reference(*(z.double() for z in (x, w0, wg, a, b)), 4.0)
    # same-precision PyTorch: every matmul rounded to fp16, the gate softmax in fp32
    gate = torch.softmax((x @ wg.t()).float(), -1).half()
    mid = ((x @ a.t()).view(t, 8, 4) * gate[..., None]).view(t, 32)
    torch_fp16 = x @ w0.t() + 4.0 * (mid @ b.t())
    err = (out.double() - ref).abs().max().item()
    base = (torch_fp16.double() - ref).abs().max().item()
    assert err <= max(2 * base, 1e-3), f"kernel err {err:.3g} > 2 x torch fp16 err {base:.3g}"


@pytest.mark.triton_cpu
def test_zero_lora_b_gives_the_base_linear(nan_empty, base):
    x, w0, wg, a, b = make_inputs(17, 4, 4)
    with backend_override("triton"):
        out = lm.lora_moe_linear(x, w0, wg, a, torch.zeros_like(b), 2.0)
    torch.testing.assert_close(out, x @ w0.t(), atol=1e-5, rtol=1e-5)


@pytest.mark.triton_cpu
def test_single_expert_is_a_plain_lora(nan_empty):
    """E = 1: the gate is exactly 1, so the op is W0 x + s B A x."""
    x, w0, wg, a, b = make_inputs(9, 1, 16)
    with backend_override("triton"):
        out = lm.lora_moe_linear(x, w0, wg, a, b, 0.5)
    torch.testing.assert_close(out, x @ w0.t() + 0.5 * (x @ a.t()) @ b.t(), atol=2e-5, rtol=1e-5)


@pytest.mark.triton_cpu
def test_rank_64_and_sixteen_experts_shrink_tiles(nan_empty, base):
    """E*r = 1024 spans many column tiles of launch 1 and middle tiles of launch 2's expand."""
    x, w0, wg, a, b = make_inputs(5, 16, 64)
    with backend_override("triton"):
        out = lm.lora_moe_linear(x, w0, wg, a, b, 1.0)
    ref = lm.lora_moe_reference(*(z.double() for z in (x, w0, wg, a, b)), 1.0)
    torch.testing.assert_close(out.double(), ref, atol=5e-5, rtol=1e-5)


@pytest.mark.triton_cpu
@pytest.mark.parametrize("e,r", [(4, 4), (16, 16)], ids=["E4r4", "E16r16-two-column-tiles"])
@pytest.mark.parametrize("splits", [1, 2, 4], ids=lambda v: f"splits{v}")
def test_k_splits_agree(splits, e, r, nan_empty, base):
    """K = 5 tiles of 128: with 4 splits of 2 tiles the last slice is empty (its partials are zeros).
    One split and one column tile: launch 1 applies the gate itself (gated); else launch 2 does."""
    from unimlm_engine.kernels import lora_moe as klm

    x, w0, wg, a, b = make_inputs(3, e, r, k=640)
    assert klm._plan(x, N, e, e * r, splits).gated == (splits == 1 and e == 4)
    with backend_override("triton"):
        out = klm.lora_moe_triton(x, w0, wg, a, b, 2.0, splits=splits)
    ref = lm.lora_moe_reference(*(z.double() for z in (x, w0, wg, a, b)), 2.0)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.triton_cpu
def test_benchmark_launch_split_composes_the_op(monkeypatch, base):
    """benchmarks/bench_lora_moe.launch_split (the per-launch timing closures) runs the op's math."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_lora_moe

    x, w0, wg, a, b = make_inputs(5, 4, 4)
    split = bench_lora_moe.launch_split(x, w0, wg, a, b, 2.0)
    assert split["base"] == base and (split["base_gemm"] is None) == (base == "triton")
    for name in ("base_gemm", "router_shrink", "base_gate_expand"):
        if split[name] is not None:
            split[name]()
    assert split["splits"] == 2  # K = 160: two 128-wide tiles under the interpreter
    torch.testing.assert_close(split["out"], lm.lora_moe_reference(x, w0, wg, a, b, 2.0), atol=2e-5, rtol=1e-5)


def test_config_limits_are_the_kernels():
    """One definition: the config accepts exactly what the kernel asserts (no GPU-only failures)."""
    import sys

    from unimlm_engine.kernels import lora_moe as klm

    assert (klm.MAX_EXPERTS, klm.MAX_RANK) == (LORA_MOE_MAX_EXPERTS, LORA_MOE_MAX_RANK) == (64, 256)
    LoRAMoEConfig(num_experts=LORA_MOE_MAX_EXPERTS, rank=LORA_MOE_MAX_RANK)
    with pytest.raises(ConfigError, match="num_experts"):
        LoRAMoEConfig(num_experts=LORA_MOE_MAX_EXPERTS + 1)
    with pytest.raises(ConfigError, match="rank"):
        LoRAMoEConfig(rank=LORA_MOE_MAX_RANK + 1)
    assert "unimlm_engine.config.model" in sys.modules  # the kernel imports the config, never the reverse


@pytest.mark.triton_cpu
def test_the_largest_config_runs(nan_empty):
    """E = 64 experts of rank 256 (E*r = 16384 middle columns): the config's limits run."""
    x, w0, wg, a, b = make_inputs(3, LORA_MOE_MAX_EXPERTS, LORA_MOE_MAX_RANK, n=20)
    with backend_override("triton"):
        out = lm.lora_moe_linear(x, w0, wg, a, b, 0.5)
    ref = lm.lora_moe_reference(*(z.double() for z in (x, w0, wg, a, b)), 0.5)
    torch.testing.assert_close(out.double(), ref, atol=5e-5, rtol=1e-5)


@pytest.mark.triton_cpu
def test_too_many_experts_is_refused():
    x, w0, wg, a, b = make_inputs(3, LORA_MOE_MAX_EXPERTS + 1, 1)
    with backend_override("triton"), pytest.raises(AssertionError, match=f"E <= {LORA_MOE_MAX_EXPERTS}"):
        lm.lora_moe_linear(x, w0, wg, a, b, 1.0)


def test_unknown_base_is_refused(monkeypatch):
    from unimlm_engine.kernels import lora_moe as klm

    monkeypatch.setenv("UNIMLM_LORA_MOE_BASE", "cutlass")
    with pytest.raises(ValueError, match="UNIMLM_LORA_MOE_BASE must be one of"):
        klm.default_base()


def test_cpu_default_backend_is_the_reference():
    x, w0, wg, a, b = make_inputs(4, 4, 4)
    assert torch.equal(lm.lora_moe_linear(x, w0, wg, a, b, 2.0), lm.lora_moe_reference(x, w0, wg, a, b, 2.0))


def test_opcheck_fake_tensors():
    x, w0, wg, a, b = make_inputs(4, 4, 4)
    torch.library.opcheck(torch.ops.unimlm.lora_moe_linear.default, (x.contiguous(), w0, wg, a, b, 2.0))


@pytest.mark.triton_gpu
@pytest.mark.parametrize("t", [1, 130, 4096], ids=lambda v: f"T{v}")
def test_bf16_cuda(t, base):
    x, w0, wg, a, b = (z.cuda() for z in make_inputs(t, 8, 4, torch.bfloat16, k=4096, n=1000))
    with backend_override("triton"):
        out = lm.lora_moe_linear(x, w0, wg, a, b, 8.0)
    ref = lm.lora_moe_reference(x, w0, wg, a, b, 8.0).float()
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=2e-2)


AOT_SCRIPT = r'''
import inspect, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from unimlm_engine.kernels import lora_moe as lm


def build(kernel, types, consts, warps):
    names = list(inspect.signature(kernel.fn).parameters)
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


for name, splits, block_e, gated in (("small_t", 16, 16, False), ("small_t", 1, 64, True), ("mid_t", 4, 16, False),
                                     ("mid_t", 1, 16, True), ("large_t", 1, 16, True), ("large_t", 1, 64, False)):
    bm, bn, bk, warps = lm._GEMM_CONFIGS[name]
    types = {"x_ptr": "*bf16", "wg_ptr": "*bf16", "a_ptr": "*bf16", "part_ptr": "*fp32", "mid_ptr": "*bf16",
             "w0_ptr": "*bf16", "b_ptr": "*bf16", "o_ptr": "*bf16", "scaling": "fp32"}
    build(lm._router_shrink_kernel, types, dict(BLOCK_M=bm, BLOCK_J=64, BLOCK_K=bk, GATED=gated, F32=False),
          8 if bm >= 128 else 4)
    for base in (True, False):
        build(lm._base_gate_expand_kernel, types,
              dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=block_e,
                   BLOCK_KR=max(16, min(bk, 4096 // (bm * splits))), SPLITS=splits, GATED=gated, F32=False,
                   BASE=base), warps)
print("compiled")
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_bf16():
    """Ahead-of-time compile of both launches to sm_90 cubin for every GPU tile config (no GPU
    needed, nothing launched): catches GPU-only lowering errors the interpreter accepts."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
