"""unimlm::ms_deform_attn: reference vs an independent fp64 bilinear loop, Triton kernel
(TRITON_INTERPRET=1 on CPU, compiled on a GPU) vs reference, fake/opcheck, input validation,
the auto-dispatch rule, CUDA cases."""
from __future__ import annotations

import sys

import pytest
import torch

from unimlm_engine.ops import _dispatch
from unimlm_engine.ops._dispatch import backend_override
from unimlm_engine.ops.msda import cuda_unavailable_reason, ms_deform_attn, ms_deform_attn_reference

HAS_CUDA = torch.cuda.is_available()
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}

# name: (levels [(H, W)], N, M, D, Lq, P, location range (lo, hi))
CASES = {
    "odd-3lvl": ([(7, 9), (4, 5), (2, 3)], 2, 3, 13, 11, 3, (0.0, 1.0)),
    "lq1": ([(5, 6), (3, 3)], 1, 2, 16, 1, 2, (0.0, 1.0)),
    "1x1-levels": ([(1, 1), (1, 1), (3, 2)], 2, 2, 5, 7, 4, (-0.3, 1.3)),
    "outside": ([(6, 5), (3, 4)], 1, 2, 7, 9, 4, (-1.5, 2.5)),
    "gdino-like-L4P4": ([(9, 11), (5, 6), (3, 3), (1, 2)], 1, 4, 24, 13, 4, (-0.1, 1.1)),
}


def make_inputs(case: str, dtype=torch.float32, loc_dtype=None, device="cpu"):
    levels, n, m, d, lq, p, (lo, hi) = CASES[case]
    shapes = torch.tensor(levels, dtype=torch.int64, device=device)
    hw = shapes.prod(dim=1)
    starts = torch.cumsum(hw, 0) - hw
    loc_dtype = loc_dtype or dtype
    value = torch.randn(n, int(hw.sum()), m, d, device=device).to(dtype)
    loc = (torch.rand(n, lq, m, len(levels), p, 2, device=device) * (hi - lo) + lo).to(loc_dtype)
    attn = torch.rand(n, lq, m, len(levels), p, device=device)
    attn = (attn / attn.sum(dim=(-2, -1), keepdim=True)).to(loc_dtype)
    return value, shapes, starts, loc, attn


def direct_bilinear_fp64(value, shapes, starts, loc, attn, softmax_weights=False):
    """Independent fp64 formulation: explicit 4-corner gathers, align_corners=False, zeros outside."""
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = loc.shape
    v = value.double().cpu()
    locd, a = loc.double().cpu(), attn.double().cpu()
    if softmax_weights:
        a = torch.softmax(a.reshape(n, lq, m, -1), dim=-1).reshape(a.shape)
    out = torch.zeros(n, lq, m, d, dtype=torch.float64)
    bidx = torch.arange(n).view(n, 1, 1)
    hidx = torch.arange(m).view(1, 1, m)
    for lvl in range(n_levels):
        h, w = (int(x) for x in shapes[lvl])
        start = int(starts[lvl])
        for pt in range(n_points):
            x = locd[:, :, :, lvl, pt, 0] * w - 0.5  # [N, Lq, M]
            y = locd[:, :, :, lvl, pt, 1] * h - 0.5
            x0, y0 = torch.floor(x), torch.floor(y)
            for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
                xi, yi = x0 + dx, y0 + dy
                cw = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                rows = start + (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()
                corner = v[bidx, rows, hidx]  # [N, Lq, M, D]
                out += (cw * inside * a[:, :, :, lvl, pt]).unsqueeze(-1) * corner
    return out.reshape(n, lq, m * d)


@pytest.mark.parametrize("softmax_weights", [False, True], ids=["weights", "fused-softmax"])
@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_fp64_loop(case, softmax_weights):
    value, shapes, starts, loc, attn = make_inputs(case, torch.float64)
    expected = direct_bilinear_fp64(value, shapes, starts, loc, attn, softmax_weights)
    got = ms_deform_attn_reference(value.float(), shapes, starts, loc.float(), attn.float(), softmax_weights)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_reference_computes_in_fp32(dtype):
    value, shapes, starts, loc, attn = make_inputs("odd-3lvl", dtype)
    got = ms_deform_attn_reference(value, shapes, starts, loc, attn)
    assert got.dtype == dtype
    expected = direct_bilinear_fp64(value, shapes, starts, loc, attn).to(dtype)
    torch.testing.assert_close(got, expected, atol=TOL[dtype][0], rtol=TOL[dtype][1])


def _run_triton_poisoned(value, shapes, starts, loc, attn, softmax_weights):
    from unimlm_engine.kernels.msda import ms_deform_attn_triton

    n, _, m, d = value.shape
    out = torch.full((n, loc.shape[1], m * d), float("nan"), dtype=value.dtype, device=value.device)
    ms_deform_attn_triton(value, shapes, starts, loc, attn, softmax_weights=softmax_weights, out=out)
    return out


TRITON_CASES = [
    ("odd-3lvl", torch.float32, None, False),
    ("odd-3lvl", torch.float32, None, True),
    ("outside", torch.float32, None, False),
    ("1x1-levels", torch.float16, None, False),
    ("gdino-like-L4P4", torch.float16, None, True),
    ("lq1", torch.float16, torch.float32, False),
]


@pytest.mark.parametrize("case,dtype,loc_dtype,softmax_weights", TRITON_CASES,
                         ids=[f"{c}-{SHORT[d]}-loc-{SHORT[ld or d]}-{'softmax' if s else 'weights'}"
                              for c, d, ld, s in TRITON_CASES])
def test_triton_matches_reference(case, dtype, loc_dtype, softmax_weights, triton_device):
    value, shapes, starts, loc, attn = make_inputs(case, dtype, loc_dtype, triton_device)
    got = _run_triton_poisoned(value, shapes, starts, loc, attn, softmax_weights)
    expected = ms_deform_attn_reference(value, shapes, starts, loc, attn, softmax_weights)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.triton_cpu
def test_triton_fused_softmax_with_a_masked_logit():
    value, shapes, starts, loc, attn = make_inputs("odd-3lvl")
    attn = torch.randn_like(attn)
    attn[:, ::2, :, 0, 0] = float("-inf")
    got = _run_triton_poisoned(value, shapes, starts, loc, attn, True)
    expected = direct_bilinear_fp64(value, shapes, starts, loc, attn, softmax_weights=True)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.triton_cpu
def test_op_triton_backend_on_noncontiguous_inputs():
    value, shapes, starts, loc, attn = make_inputs("odd-3lvl")
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    assert not value_nc.is_contiguous() and not loc_nc.is_contiguous()
    with backend_override("triton"):
        got = ms_deform_attn(value_nc, shapes, starts, loc_nc, attn)
    expected = direct_bilinear_fp64(value, shapes, starts, loc, attn)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=2e-5)


def test_op_on_cpu_dispatch():
    """auto on CPU fp32 takes the C++ kernel (its own grad_fn), fp16 and a forced reference take the reference
    (bit for bit), a forced cuda backend on CPU tensors is refused."""
    value, shapes, starts, loc, attn = make_inputs("lq1")
    ref = ms_deform_attn_reference(value, shapes, starts, loc, attn)
    with backend_override("auto"):
        got = ms_deform_attn(value, shapes, starts, loc, attn)
        assert type(ms_deform_attn(value.requires_grad_(), shapes, starts, loc, attn).grad_fn).__name__ == \
            "_MsdaCpuBackward"
        value.requires_grad_(False)
        half = [t.half() for t in (value, loc, attn)]
        got_half = ms_deform_attn(half[0], shapes, starts, half[1], half[2])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_half, ms_deform_attn_reference(half[0], shapes, starts, half[1], half[2]),
                               atol=0, rtol=0)
    with backend_override("reference"):
        torch.testing.assert_close(ms_deform_attn(value, shapes, starts, loc, attn), ref, atol=0, rtol=0)
    with backend_override("cuda"), pytest.raises(RuntimeError, match="CUDA"):
        ms_deform_attn(value, shapes, starts, loc, attn)


def _grads(fn, value, shapes, starts, loc, attn, up, softmax_weights=False):
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2], softmax_weights)
    return (out.detach(),) + torch.autograd.grad((out * up).sum(), leaves)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("softmax_weights", [False, True], ids=["weights", "fused-softmax"])
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_kernel_forward_and_backward_match_reference(case, softmax_weights, threads, monkeypatch):
    """The C++ CPU kernel (csrc/kernels/msda_cpu.cpp): output and the gradients of value, locations and weights
    against the grid_sample reference's autograd, in fp64 for the reference (locations outside the levels,
    1x1 levels and the fused softmax included), with 1 and 3 threads (3 > N*M in some cases)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(5)
    value, shapes, starts, loc, attn = make_inputs(case)
    up = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    with backend_override("auto"):
        got = _grads(ms_deform_attn, value, shapes, starts, loc, attn, up, softmax_weights)

    def reference64(v, sh, st, lc, a, sw):
        return ms_deform_attn_reference(v.double(), sh, st, lc.double(), a.double(), sw)

    want = _grads(reference64, value.double(), shapes, starts, loc.double(), attn.double(), up.double(),
                  softmax_weights)
    for name, g, w in zip(("out", "value", "loc", "weights"), got, want):
        assert g.dtype == torch.float32, name
        scale = float(w.abs().max()) or 1.0
        torch.testing.assert_close(g.double() / scale, w / scale, atol=3e-6, rtol=0, msg=name)


def test_cpu_kernel_noncontiguous_nan_and_empty_inputs():
    value, shapes, starts, loc, attn = make_inputs("outside")
    loc[0, 2, 1, 0, 1] = float("nan")  # samples nothing (grid_sample's result there is implementation-defined)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.transpose(1, 2).contiguous().transpose(1, 2)
    assert not value_nc.is_contiguous() and not loc_nc.is_contiguous()
    with backend_override("auto"):
        got = ms_deform_attn(value_nc, shapes, starts, loc_nc, attn)
        empty = ms_deform_attn(value, shapes, starts, loc[:, :0], attn[:, :0])
    zeroed = attn.clone()
    zeroed[0, 2, 1, 0, 1] = 0.0  # the NaN point's sample left out
    want = ms_deform_attn_reference(value, shapes, starts, loc.nan_to_num(), zeroed)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert empty.shape == (1, 0, value.shape[2] * value.shape[3])


def test_gradient_with_forced_kernel_backends_takes_the_reference(monkeypatch):
    """The CUDA and Triton kernels have no backward: with a gradient needed the op takes the reference
    (differentiable) instead of returning an output autograd cannot see through."""
    value, shapes, starts, loc, attn = make_inputs("odd-3lvl")
    value.requires_grad_()
    launched = []
    monkeypatch.setattr("unimlm_engine.ops.msda._triton_module",
                        lambda: type("K", (), {"ms_deform_attn_triton": staticmethod(
                            lambda *a, **k: launched.append(1))}))
    with backend_override("triton"):
        out = ms_deform_attn(value, shapes, starts, loc, attn)
    assert not launched and out.requires_grad
    (g,) = torch.autograd.grad(out.sum(), value)
    (want,) = torch.autograd.grad(ms_deform_attn_reference(value, shapes, starts, loc, attn).sum(), value)
    torch.testing.assert_close(g, want, atol=0, rtol=0)


def test_opcheck_and_fake_tensor():
    value, shapes, starts, loc, attn = make_inputs("lq1")
    torch.library.opcheck(torch.ops.unimlm.ms_deform_attn.default, (value, shapes, starts, loc, attn, True))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (value, shapes, starts, loc, attn)]
        out = torch.ops.unimlm.ms_deform_attn(*fakes)
    assert tuple(out.shape) == (1, 1, 32) and out.dtype == value.dtype


def _mutate(name):
    value, shapes, starts, loc, attn = make_inputs("odd-3lvl")
    bad = {
        "value-3d": (value[0], shapes, starts, loc, attn),
        "value-int": (value.long(), shapes, starts, loc, attn),
        "shapes-int32": (value, shapes.int(), starts, loc, attn),
        "shapes-1d": (value, shapes.flatten(), starts, loc, attn),
        "starts-len": (value, shapes, starts[:2], loc, attn),
        "starts-wrong": (value, shapes, starts + 1, loc, attn),
        "S-mismatch": (value[:, :-1], shapes, starts, loc, attn),
        "loc-heads": (value, shapes, starts, loc[:, :, :2], attn[:, :, :2]),
        "loc-last-dim": (value, shapes, starts, loc[..., :1], attn),
        "attn-shape": (value, shapes, starts, loc, attn[..., :2]),
        "attn-dtype": (value, shapes, starts, loc, attn.double()),
        "loc-fp16-value-fp32": (value, shapes, starts, loc.half(), attn.half()),
    }
    return bad[name]


BAD = ["value-3d", "value-int", "shapes-int32", "shapes-1d", "starts-len", "starts-wrong", "S-mismatch",
       "loc-heads", "loc-last-dim", "attn-shape", "attn-dtype", "loc-fp16-value-fp32"]


@pytest.mark.parametrize("bad", BAD)
def test_bad_inputs_raise_clear_errors(bad):
    with pytest.raises(ValueError, match="ms_deform_attn"):
        ms_deform_attn(*_mutate(bad))


class _FakeCudaTensor:
    """What `pick` reads of a CUDA tensor (is_cuda, device, dtype), without a GPU."""
    is_cuda = True
    device = torch.device("cuda", 0)

    def __init__(self, dtype):
        self.dtype = dtype


@pytest.fixture
def dispatch_table(tmp_path, monkeypatch):
    monkeypatch.setenv(_dispatch.TABLE_ENV, str(tmp_path / "table.json"))
    monkeypatch.setattr(_dispatch, "_device_name", lambda index: "NVIDIA H100 80GB HBM3")
    _dispatch.reload_table()
    yield tmp_path / "table.json"
    _dispatch.reload_table()


def test_auto_dispatch_rule(dispatch_table):
    """CUDA tensors: the measured table's winner for (device, op, dtype) when available, else the
    documented default order (CUDA, then Triton); CPU tensors: the reference."""
    bf16, fp16 = _FakeCudaTensor(torch.bfloat16), _FakeCudaTensor(torch.float16)

    def pick(t, **kw):
        return _dispatch.pick(t, op="ms_deform_attn", **{"has_triton": True, "has_cuda": True, **kw})
    assert _dispatch.DEFAULT_ORDER["ms_deform_attn"] == ("cuda", "triton")
    with backend_override("auto"):
        assert pick(bf16) == "cuda" and pick(bf16, has_cuda=False) == "triton"
        _dispatch.record_fastest("ms_deform_attn", "NVIDIA H100 80GB HBM3", torch.bfloat16, "triton")
        assert dispatch_table.exists()
        assert pick(bf16) == "triton" and pick(fp16) == "cuda"  # measured for bf16 only
        assert pick(bf16, has_triton=False) == "cuda"  # the winner is not available here
        assert _dispatch.pick(torch.zeros(1), has_triton=True, has_cuda=True, op="ms_deform_attn") == "reference"
    with pytest.raises(ValueError, match="backend"):
        _dispatch.record_fastest("ms_deform_attn", "x", torch.bfloat16, "reference")


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    value, shapes, starts, loc, attn = make_inputs("lq1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backend_override("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ms_deform_attn(value, shapes, starts, loc, attn)


@pytest.mark.triton_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("softmax_weights", [False, True], ids=["weights", "fused-softmax"])
def test_cuda_backends_match_reference(dtype, softmax_weights):
    value, shapes, starts, loc, attn = make_inputs("gdino-like-L4P4", dtype, torch.float32, "cuda")
    expected = ms_deform_attn_reference(value, shapes, starts, loc, attn, softmax_weights)
    reason = cuda_unavailable_reason()
    backends = ["auto", "triton"] + (["cuda"] if reason is None else [])
    if reason is not None:
        print(f"CUDA kernel not checked: {reason}")
    for backend in backends:
        with backend_override(backend):
            got = ms_deform_attn(value, shapes, starts, loc, attn, softmax_weights)
        torch.testing.assert_close(got, expected, atol=TOL[dtype][0], rtol=TOL[dtype][1], msg=backend)


@pytest.mark.skipif(HAS_CUDA, reason="the CPU path of the benchmark (the GPU path is too long for a test)")
def test_benchmark_cpu_path_runs(tmp_path, monkeypatch):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_msda.py"
    spec = importlib.util.spec_from_file_location("bench_msda", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_msda", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "bench_msda.json"
    bench.main(["--iters", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"reference", "cpu"} and all(r["ms"] > 0 and r["correct"] for r in rows)


def test_reference_output_is_contiguous_like_its_fake():
    """Inductor/AOTI trust the fake's (contiguous) strides; a transposed real output was read wrongly."""
    from unimlm_engine.ops.msda import ms_deform_attn_reference

    shapes = torch.tensor([[3, 4], [2, 2]])
    start = torch.tensor([0, 12])
    value = torch.randn(2, 16, 3, 5)
    loc = torch.rand(2, 7, 3, 2, 2, 2)
    w = torch.rand(2, 7, 3, 2, 2)
    out = ms_deform_attn_reference(value, shapes, start, loc, w)
    assert out.shape == (2, 7, 15) and out.is_contiguous()
