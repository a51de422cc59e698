"""The LLaMA layer's one-launch ops (`unimlm::rms_norm`, `add_rms_norm`, `rope`, `silu_mul`; Triton under the
interpreter on CPU, compiled on a GPU) against their PyTorch references, and the model paths that use them:
the residual stream carried apart, q/k/v and gate/up served as one GEMM (`fuse_projections_`).

Inputs are views with NaN outside them (a kernel reading past a row or through a wrong stride fails) and
outputs are compared with the references at fp32 / fp16 rounding; bf16 runs only on a GPU (the interpreter
gets bf16 arithmetic wrong: DESIGN.md section 4)."""
import pytest
import torch

from unimlm_engine.config import LLMConfig
from unimlm_engine.model.attention import ContiguousKVCache
from unimlm_engine.model.llm import LLM, fuse_projections_
from unimlm_engine.ops import layer_ops as lo
from unimlm_engine.ops._dispatch import backend_override

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _poisoned_view(t, n, dtype, device, pad=24):
    """[t, n] view of a wider NaN-filled buffer (row stride n + pad), the view filled with randn."""
    buf = torch.full((t, n + pad), float("nan"), dtype=dtype, device=device)
    buf[:, 3:3 + n] = torch.randn(t, n, device=device).to(dtype)
    return buf[:, 3:3 + n]


def _check_rms(device, dtype, t, n, with_res):
    x = _poisoned_view(t, n, dtype, device)
    w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype)
    if with_res:
        r = _poisoned_view(t, n, dtype, device, pad=40)
        with backend_override("triton"):
            out, s = lo.add_rms_norm(x, r, w, 1e-5)
        ref_s = x + r
        torch.testing.assert_close(s, ref_s, atol=0, rtol=0)  # the sum is rounded once, as torch rounds it
        ref = lo.rms_norm_reference(ref_s, w, 1e-5)
    else:
        with backend_override("triton"):
            out = lo.rms_norm(x, w, 1e-5)
        ref = lo.rms_norm_reference(x, w, 1e-5)
    assert out.dtype == ref.dtype and out.shape == ref.shape and not out.isnan().any()
    torch.testing.assert_close(out, ref, **TOL[dtype])


def _check_rope(device, dtype, t, h, hkv, d):
    # q, k as the fused QKV projection hands them over: column views of one [T, (H + 2 Hkv) D] output
    qkv = _poisoned_view(t, (h + 2 * hkv) * d, dtype, device)
    q, k, _ = qkv.split([h * d, hkv * d, hkv * d], 1)
    q, k = q.view(t, h, d), k.view(t, hkv, d)
    pos = torch.randint(0, 4000, (t,), device=device)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=device).float() / d))
    freqs = pos.float()[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)[:, None]
    cos, sin = emb.cos(), emb.sin()
    with backend_override("triton"):
        qo, ko = lo.rope(q, k, cos, sin)
    assert qo.is_contiguous() and ko.is_contiguous()
    torch.testing.assert_close(qo, lo.rope_reference(q, cos, sin), **TOL[dtype])
    torch.testing.assert_close(ko, lo.rope_reference(k, cos, sin), **TOL[dtype])


def _check_silu(device, dtype, t, n):
    gu = _poisoned_view(t, 2 * n, dtype, device)
    g, u = gu.chunk(2, dim=-1)
    with backend_override("triton"):
        out = lo.silu_mul(g, u)
    torch.testing.assert_close(out, torch.nn.functional.silu(g) * u, **TOL[dtype])


@pytest.mark.triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("t,n", [(1, 64), (5, 200), (3, 1000)])
@pytest.mark.parametrize("with_res", [False, True], ids=["norm", "add+norm"])
def test_rms_norm_matches_reference(dtype, t, n, with_res):
    _check_rms("cpu", dtype, t, n, with_res)


@pytest.mark.triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("t,h,hkv,d", [(1, 4, 2, 64), (6, 4, 4, 32), (3, 6, 2, 24)])
def test_rope_matches_reference(dtype, t, h, hkv, d):
    _check_rope("cpu", dtype, t, h, hkv, d)


@pytest.mark.triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("t,n", [(1, 96), (4, 300)])
def test_silu_mul_matches_reference(dtype, t, n):
    _check_silu("cpu", dtype, t, n)


@pytest.mark.triton_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_layer_ops_cuda(dtype):
    for with_res in (False, True):
        _check_rms("cuda", dtype, 7, 4096, with_res)
        _check_rms("cuda", dtype, 1, 5120, with_res)
    _check_rope("cuda", dtype, 5, 32, 8, 128)
    _check_silu("cuda", dtype, 3, 11008)


def _cfg():
    return LLMConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=12, max_position_embeddings=128)


@pytest.mark.triton_cpu
def test_fused_model_matches_eager():
    """Fused q/k/v and gate/up GEMMs + the one-launch ops (forced Triton) = the eager model's hidden states,
    prefill then decode, through a KV cache."""
    torch.manual_seed(0)
    eager = LLM(_cfg()).eval()
    fused = LLM(_cfg()).eval()
    fused.load_state_dict(eager.state_dict())
    assert fuse_projections_(fused.model.layers) == 4  # qkv and gate/up in each of the 2 layers
    emb = torch.randn(9, 48)
    outs = {}
    for name, m in (("eager", eager), ("fused", fused)):
        cache = ContiguousKVCache(2)
        with torch.no_grad(), backend_override("triton" if name == "fused" else "reference"):
            pre = m(emb[:7], torch.arange(7), cache)
            dec = m(emb[7:8], torch.tensor([7]), cache)
        outs[name] = (pre, dec)
    for a, b in zip(outs["eager"], outs["fused"]):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=2e-5)


def test_fuse_projections_shares_storage_and_keeps_the_state_dict():
    torch.manual_seed(0)
    m = LLM(_cfg())
    before = {n: t.clone() for n, t in m.state_dict().items()}
    fuse_projections_(m.model.layers)
    a, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    assert a.q_proj.weight.data_ptr() == a.qkv_weight.data_ptr()
    assert a.v_proj.weight.untyped_storage().data_ptr() == a.qkv_weight.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_up_weight.untyped_storage().data_ptr()
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    # loading new weights reaches the fused GEMM (the parameters are views of it)
    sd = {n: t + 1 if n.endswith("k_proj.weight") else t for n, t in before.items()}
    m.load_state_dict(sd)
    h, kv = 4 * 12, 2 * 12
    torch.testing.assert_close(a.qkv_weight[h:h + kv], sd["model.layers.0.self_attn.k_proj.weight"])
    # a cast undoes the fusion (the parameters get storage of their own) instead of leaving a stale copy
    m.to(torch.float64)
    assert a.qkv_weight is None and mlp.gate_up_weight is None and a.q_proj.weight.dtype == torch.float64


def test_gradients_take_the_reference():
    """The kernels have no backward: with a gradient needed the ops run the PyTorch references, even forced."""
    x = torch.randn(3, 64, requires_grad=True)
    w = torch.ones(64)
    with backend_override("triton"):
        out, s = lo.add_rms_norm(x, torch.randn(3, 64), w, 1e-5)
        (out.sum() + lo.silu_mul(x, x).sum()).backward()
    assert x.grad is not None and out.grad_fn is not None


@pytest.mark.triton_cpu
def test_fused_layer_ops_off_takes_the_reference(monkeypatch):
    calls = []
    mod = lo._kernels()
    monkeypatch.setattr(mod, "silu_mul_triton", lambda g, u: calls.append(1) or torch.zeros_like(g))
    g = torch.randn(2, 8)
    with backend_override("triton"):
        with lo.fused_layer_ops(False):
            torch.testing.assert_close(lo.silu_mul(g, g), torch.nn.functional.silu(g) * g)
        assert not calls
        lo.silu_mul(g, g)
    assert calls == [1]


def test_opcheck_fake_tensors():
    """The registered ops (what torch.compile / torch.export trace) pass torch.library.opcheck."""
    x, r, w = torch.randn(3, 16), torch.randn(3, 16), torch.rand(16)
    q, k = torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    cos, sin = torch.rand(3, 1, 8), torch.rand(3, 1, 8)
    ops = torch.ops.unimlm
    torch.library.opcheck(ops.rms_norm.default, (x, w, 1e-5))
    torch.library.opcheck(ops.add_rms_norm.default, (x, r, w, 1e-5))
    torch.library.opcheck(ops.rope.default, (q, k, cos, sin))
    torch.library.opcheck(ops.silu_mul.default, (x, r))
