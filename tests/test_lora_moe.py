"""Fused LoRA-MoE linear: the Triton kernel (TRITON_INTERPRET=1, forced with backend_override)
against the fp32 concatenated reference and the per-expert loop."""
import pytest
import torch

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


def make_inputs(t, e, r, dtype=torch.float32, k=K, n=N):
    """x is a non-contiguous row view; weights scaled so outputs are O(1)."""
    x = torch.randn(t, k + 7)[:, 3:3 + k]
    w0 = torch.randn(n, k) / k ** 0.5
    wg = torch.randn(e, k) / k ** 0.5 * 3  # peaked enough that the gate matters
    a = torch.randn(e * r, k) / k ** 0.5
    b = torch.randn(n, e * r) / (e * r) ** 0.5
    return [z.to(dtype) for z in (x, w0, wg, a, b)]


@pytest.mark.parametrize("r", [1, 4, 16], ids=lambda v: f"r{v}")
@pytest.mark.parametrize("e", [1, 4, 16], ids=lambda v: f"E{v}")
@pytest.mark.parametrize("t", [1, 17, 130], ids=lambda v: f"T{v}")
def test_triton_matches_reference_and_loop(t, e, r, nan_empty):
    x, w0, wg, a, b = make_inputs(t, e, r)
    with backend_override("triton"):
        out = lm.lora_moe_linear(x, w0, wg, a, b, 2.0)
    assert not torch.isnan(out).any()
    ref = lm.lora_moe_reference(x.double(), w0.double(), wg.double(), a.double(), b.double(), 2.0)
    loop = lm.lora_moe_per_expert_loop(x, w0, wg, a, b, 2.0)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out, loop, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [1, 33], ids=lambda v: f"T{v}")
def test_fp16_within_twice_torch_fp16_error(t, nan_empty):
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


def test_zero_lora_b_gives_the_base_linear(nan_empty):
    x, w0, wg, a, b = make_inputs(17, 4, 4)
    with backend_override("triton"):
        out = lm.lora_moe_linear(x, w0, wg, a, torch.zeros_like(b), 2.0)
    torch.testing.assert_close(out, x @ w0.t(), atol=1e-5, rtol=1e-5)


def test_single_expert_is_a_plain_lora(nan_empty):
    """E = 1: the gate is exactly 1, so the op is W0 x + s B A x."""
    x, w0, wg, a, b = make_inputs(9, 1, 16)
    with backend_override("triton"):
        out = lm.lora_moe_linear(x, w0, wg, a, b, 0.5)
    torch.testing.assert_close(out, x @ w0.t() + 0.5 * (x @ a.t()) @ b.t(), atol=2e-5, rtol=1e-5)


def test_rank_64_and_sixteen_experts_shrink_tiles(nan_empty):
    """E*r = 1024 spans many middle-column tiles of launch 1 and K tiles of launch 2's expand."""
    x, w0, wg, a, b = make_inputs(5, 16, 64)
    with backend_override("triton"):
        out = lm.lora_moe_linear(x, w0, wg, a, b, 1.0)
    ref = lm.lora_moe_reference(*(z.double() for z in (x, w0, wg, a, b)), 1.0)
    torch.testing.assert_close(out.double(), ref, atol=5e-5, rtol=1e-5)


def test_too_many_experts_is_refused():
    x, w0, wg, a, b = make_inputs(3, 17, 1)
    with backend_override("triton"), pytest.raises(AssertionError, match="E <= 16"):
        lm.lora_moe_linear(x, w0, wg, a, b, 1.0)


def test_cpu_default_backend_is_the_reference():
    x, w0, wg, a, b = make_inputs(4, 4, 4)
    assert torch.equal(lm.lora_moe_linear(x, w0, wg, a, b, 2.0), lm.lora_moe_reference(x, w0, wg, a, b, 2.0))


def test_opcheck_fake_tensors():
    x, w0, wg, a, b = make_inputs(4, 4, 4)
    torch.library.opcheck(torch.ops.unimlm.lora_moe_linear.default, (x.contiguous(), w0, wg, a, b, 2.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is unreliable in the Triton interpreter: CUDA only")
@pytest.mark.parametrize("t", [1, 130, 4096], ids=lambda v: f"T{v}")
def test_bf16_cuda(t):
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


for name in ("small_t", "mid_t", "large_t"):
    bm, bn, bk, warps = lm._GEMM_CONFIGS[name]
    build(lm._router_shrink_kernel, {"x_ptr": "*bf16", "wg_ptr": "*bf16", "a_ptr": "*bf16", "mid_ptr": "*bf16",
                                     "scaling": "fp32"},
          dict(BLOCK_M=bm, BLOCK_R=32, BLOCK_K=bk, BLOCK_E=16, F32=False), 4)
    build(lm._base_expand_kernel, {"x_ptr": "*bf16", "w0_ptr": "*bf16", "mid_ptr": "*bf16", "b_ptr": "*bf16",
                                   "o_ptr": "*bf16"},
          dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_KR=32, F32=False), warps)
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
