"""Paged attention ops (Triton under TRITON_INTERPRET=1, forced with backend_override)
against fp64/fp32 gather-through-block-table references."""
import math

import pytest
import torch

from unimlm_engine.ops import kv_cache as kv
from unimlm_engine.ops import paged_attention as pa
from unimlm_engine.ops._dispatch import backend_override

REF_DTYPE = {torch.float32: torch.float64, torch.float16: torch.float32, torch.bfloat16: torch.float32}
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture
def nan_empty(monkeypatch):
    """Fresh float buffers (outputs, split-K partials) start as NaN so an unwritten element fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def _poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(empty_like(*a, **k)))


def make_cache(lens, hkv, d, bs, dtype, spare=5):
    """Random caches as views of one [NB, 2, BS, Hkv, D] buffer (non-contiguous), shuffled pages,
    block tables padded with -1 past each sequence's pages."""
    pages = [math.ceil(n / bs) for n in lens]
    nb = sum(pages) + spare
    kv = torch.randn(nb, 2, bs, hkv, d).to(dtype)
    perm = torch.randperm(nb).tolist()
    table = torch.full((len(lens), max(pages) + 1), -1, dtype=torch.int32)
    i = 0
    for b, p in enumerate(pages):
        table[b, :p] = torch.tensor(perm[i:i + p], dtype=torch.int32)
        i += p
    return kv[:, 0], kv[:, 1], table, torch.tensor(lens, dtype=torch.int32)


def rand_q(rows, h, d, dtype):
    """[rows, H, D] as a non-contiguous view (every other head of a wider tensor)."""
    return torch.randn(rows, 2 * h, d).to(dtype)[:, ::2]


def assert_within_twice_torch(out, ref, same_precision, dtype):
    assert not torch.isnan(out).any(), "kernel left NaN (unwritten) elements"
    err = (out.double() - ref.double()).abs().max().item()
    base = (same_precision.double() - ref.double()).abs().max().item()
    assert err <= max(2 * base, FLOOR[dtype]), f"kernel err {err:.3g} > 2 x torch err {base:.3g}"


DECODE_CASES = [
    # (lens, H, Hkv, D, block_size, dtype)
    ([1, 17, 63, 129, 500], 4, 4, 64, 16, torch.float32),
    ([1, 17, 63, 129, 500], 8, 2, 128, 32, torch.float16),
    ([5, 63, 111], 8, 1, 80, 16, torch.float16),
    ([33, 2], 16, 2, 96, 32, torch.float32),
    ([40, 1], 8, 8, 256, 16, torch.float16),
]


def _id(case):
    lens, h, hkv, d, bs, dt = case
    return f"lens{'-'.join(map(str, lens))}-gqa{h // hkv}-d{d}-bs{bs}-{str(dt).split('.')[-1]}"


@pytest.mark.triton_cpu
@pytest.mark.parametrize("case", DECODE_CASES, ids=_id)
def test_decode_matches_reference(case, nan_empty):
    lens, h, hkv, d, bs, dtype = case
    kc, vc, table, ctx = make_cache(lens, hkv, d, bs, dtype)
    q = rand_q(len(lens), h, d, dtype)
    scale = d ** -0.5
    with backend_override("triton"):
        out = pa.paged_decode_attention(q, kc, vc, table, ctx, scale)
    ref = pa.paged_decode_reference(q.to(REF_DTYPE[dtype]), kc.to(REF_DTYPE[dtype]), vc.to(REF_DTYPE[dtype]),
                                    table, ctx, scale, dtype=REF_DTYPE[dtype])
    same = pa.paged_decode_reference(q, kc, vc, table, ctx, scale, dtype=dtype)
    assert_within_twice_torch(out, ref, same, dtype)


PREFILL_CASES = [
    # (q_lens, context_lens, H, Hkv, D, block_size, dtype); context > q_len = cached prefix
    ([1, 17, 20, 33], [1, 17, 63, 129], 4, 1, 64, 16, torch.float32),
    ([3, 30], [3, 70], 8, 2, 80, 32, torch.float16),
    ([16, 1, 9], [16, 40, 9], 8, 8, 128, 16, torch.float16),
]


def _pid(case):
    ql, cl, h, hkv, d, bs, dt = case
    return f"q{'-'.join(map(str, ql))}-ctx{'-'.join(map(str, cl))}-gqa{h // hkv}-d{d}-bs{bs}-{str(dt).split('.')[-1]}"


def _run_prefill(case):
    q_lens, lens, h, hkv, d, bs, dtype = case
    kc, vc, table, ctx = make_cache(lens, hkv, d, bs, dtype)
    q = rand_q(sum(q_lens), h, d, dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    scale = d ** -0.5
    with backend_override("triton"):
        out = pa.paged_prefill_attention(q, kc, vc, table, cu, ctx, scale)
    r = REF_DTYPE[dtype]
    ref = pa.paged_prefill_reference(q.to(r), kc.to(r), vc.to(r), table, cu, ctx, scale, dtype=r)
    same = pa.paged_prefill_reference(q, kc, vc, table, cu, ctx, scale, dtype=dtype)
    assert_within_twice_torch(out, ref, same, dtype)


@pytest.mark.triton_cpu
@pytest.mark.parametrize("case", PREFILL_CASES, ids=_pid)
def test_prefill_matches_reference(case, nan_empty):
    _run_prefill(case)


@pytest.mark.slow
@pytest.mark.triton_cpu
@pytest.mark.parametrize("case", [([48, 7, 64], [300, 7, 129], 8, 2, 64, 16, torch.float16)], ids=_pid)
def test_prefill_long_context(case, nan_empty):
    _run_prefill(case)


@pytest.mark.triton_cpu
def test_prefill_of_whole_sequence_equals_causal_sdpa():
    """No cached prefix: the op equals plain causal attention on the contiguous K/V."""
    n, h, d, bs = 37, 4, 64, 16
    kc, vc, table, ctx = make_cache([n], h, d, bs, torch.float32)
    q = torch.randn(n, h, d)
    k = pa._gather_kv(kc, table[0], n)
    v = pa._gather_kv(vc, table[0], n)
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                            is_causal=True).transpose(0, 1)
    cu = torch.tensor([0, n], dtype=torch.int32)
    with backend_override("triton"):
        out = pa.paged_prefill_attention(q, kc, vc, table, cu, ctx, d ** -0.5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.triton_gpu
def test_decode_bf16_cuda():
    lens, h, hkv, d, bs = [1, 17, 129, 500], 32, 8, 128, 16
    kc, vc, table, ctx = (t.cuda() for t in make_cache(lens, hkv, d, bs, torch.bfloat16))
    q = torch.randn(len(lens), h, d, device="cuda", dtype=torch.bfloat16)
    with backend_override("triton"):
        out = pa.paged_decode_attention(q, kc, vc, table, ctx, d ** -0.5)
    ref = pa.paged_decode_reference(q.float(), kc.float(), vc.float(), table, ctx, d ** -0.5)
    same = pa.paged_decode_reference(q, kc, vc, table, ctx, d ** -0.5, dtype=torch.bfloat16)
    assert_within_twice_torch(out, ref, same, torch.bfloat16)


@pytest.mark.triton_cpu
def test_int64_addressing_past_2_pow_31():
    """Block ids whose element offset block_id * BS * Hkv * D passes 2^31. The cache is a
    4 GiB torch.empty: untouched pages are never materialised, so this costs a few MB."""
    bs, hkv, d, h = 16, 1, 64, 4
    nb = (1 << 31) // (bs * hkv * d) + 8
    kc = torch.empty(nb, bs, hkv, d, dtype=torch.float16)
    vc = torch.empty(nb, bs, hkv, d, dtype=torch.float16)
    blocks = torch.tensor([nb - 1, 3, nb - 5], dtype=torch.int32)
    assert int(blocks[0]) * bs * hkv * d > 2 ** 31
    n = 40
    slots = (blocks.long()[:, None] * bs + torch.arange(bs)).flatten()[:n]
    k, v = torch.randn(n, hkv, d).half(), torch.randn(n, hkv, d).half()
    table, ctx = blocks[None], torch.tensor([n], dtype=torch.int32)
    q, qp = torch.randn(1, h, d).half(), torch.randn(n, h, d).half()
    cu = torch.tensor([0, n], dtype=torch.int32)
    with backend_override("triton"):
        kv.write_kv_cache(k, v, kc, vc, slots)
        dec = pa.paged_decode_attention(q, kc, vc, table, ctx, 0.125)
        pre = pa.paged_prefill_attention(qp, kc, vc, table, cu, ctx, 0.125)
    pos = torch.arange(n)
    torch.testing.assert_close(dec.float(), pa.attention_reference(q, k, v, 0.125, pos[-1:]), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(pre.float(), pa.attention_reference(qp, k, v, 0.125, pos), atol=2e-3, rtol=2e-3)


@pytest.mark.triton_cpu
@pytest.mark.parametrize("max_context_len", [-1, 1, 130, 501, 4096], ids=lambda v: f"max{v}")
def test_decode_split_count_follows_max_context_len(max_context_len, nan_empty):
    """The host int sets the split count (1 split for a 1-key bound, the single-split path; up to 4
    under the interpreter); every sequence splits its own live context, so any value, even one
    smaller than the real longest context, gives the reference's result."""
    from unimlm_engine.kernels import paged_attention as kpa

    lens, h, hkv, d, bs = [1, 17, 63, 129, 500], 4, 2, 64, 16
    kc, vc, table, ctx = make_cache(lens, hkv, d, bs, torch.float32)
    q = rand_q(len(lens), h, d, torch.float32)
    with backend_override("triton"):
        out = pa.paged_decode_attention(q, kc, vc, table, ctx, 0.125, max_context_len)
    bound = table.shape[1] * bs if max_context_len < 0 else max_context_len
    want_splits = min(4, -(-bound // kpa._block_n(bs, d)))
    assert kpa._num_splits(len(lens), hkv, bound, kpa._block_n(bs, d), q.device) == want_splits
    ref = pa.paged_decode_reference(q.double(), kc.double(), vc.double(), table, ctx, 0.125, dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.triton_cpu
def test_prefill_grid_follows_max_query_len(nan_empty):
    """The grid comes from the host int, not a device sync: a value above the real longest q_len
    gives the same result; one below it leaves the rows past it unwritten (NaN-poisoned here),
    which is why the scheduler's exact value is passed; the reference refuses it."""
    q_lens, lens, h, hkv, d, bs = [40, 3], [45, 3], 4, 2, 64, 16
    kc, vc, table, ctx = make_cache(lens, hkv, d, bs, torch.float32)
    q = rand_q(sum(q_lens), h, d, torch.float32)
    cu = torch.tensor([0, 40, 43], dtype=torch.int32)
    want = pa.paged_prefill_reference(q, kc, vc, table, cu, ctx, 0.125)
    with backend_override("triton"):
        exact = pa.paged_prefill_attention(q, kc, vc, table, cu, ctx, 0.125, 40)
        larger = pa.paged_prefill_attention(q, kc, vc, table, cu, ctx, 0.125, 100)
        short = pa.paged_prefill_attention(q, kc, vc, table, cu, ctx, 0.125, 20)
    torch.testing.assert_close(exact, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(larger, exact)
    assert not short[:32].isnan().any() and short[32:40].isnan().all()  # one 32-row tile of sequence 0
    with pytest.raises(ValueError, match="max_query_len"):
        pa.paged_prefill_attention(q, kc, vc, table, cu, ctx, 0.125, 20)


@pytest.mark.triton_gpu
def test_cuda_launchers_do_not_sync_with_host_maxima():
    """With the maxima passed as host ints, decode and prefill issue no device-to-host sync
    (torch's sync debug mode raises on one); the -1 fallback of prefill does sync."""
    lens, q_lens, h, hkv, d, bs = [40, 3], [40, 3], 8, 2, 128, 16
    kc, vc, table, ctx = (t.cuda() for t in make_cache(lens, hkv, d, bs, torch.bfloat16))
    q = torch.randn(2, h, d, device="cuda", dtype=torch.bfloat16)
    qp = torch.randn(sum(q_lens), h, d, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 40, 43], dtype=torch.int32, device="cuda")
    with backend_override("triton"):
        pa.paged_decode_attention(q, kc, vc, table, ctx, 0.1, 40)  # compile outside the check
        pa.paged_prefill_attention(qp, kc, vc, table, cu, ctx, 0.1, 40)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            pa.paged_decode_attention(q, kc, vc, table, ctx, 0.1, 40)
            pa.paged_prefill_attention(qp, kc, vc, table, cu, ctx, 0.1, 40)
            with pytest.raises(RuntimeError, match="synchroniz"):
                pa.paged_prefill_attention(qp, kc, vc, table, cu, ctx, 0.1)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_cpu_decode_path_checks_max_context_len():
    kc, vc, table, ctx = make_cache([5, 20], 2, 64, 16, torch.float32)
    q = torch.randn(2, 4, 64)
    want = pa.paged_decode_attention(q, kc, vc, table, ctx, 0.125)
    assert torch.equal(pa.paged_decode_attention(q, kc, vc, table, ctx, 0.125, 20), want)
    assert torch.equal(pa.paged_decode_attention(q, kc, vc, table, ctx, 0.125, 1000), want)
    with pytest.raises(ValueError, match="max_context_len"):
        pa.paged_decode_attention(q, kc, vc, table, ctx, 0.125, 19)


def test_cpu_default_backend_is_the_reference():
    kc, vc, table, ctx = make_cache([5, 20], 2, 64, 16, torch.float32)
    q = torch.randn(2, 4, 64)
    out = pa.paged_decode_attention(q, kc, vc, table, ctx, 0.125)
    # CPU tensors take the batched fp32 path (never Triton), which is the reference's math
    assert torch.equal(out, pa.paged_decode_batched(q, kc, vc, table, ctx, 0.125))
    torch.testing.assert_close(out, pa.paged_decode_reference(q, kc, vc, table, ctx, 0.125), atol=2e-6, rtol=2e-6)


def test_opcheck_fake_tensors():
    kc, vc, table, ctx = make_cache([5, 20], 2, 64, 16, torch.float32)
    q = torch.randn(2, 4, 64)
    torch.library.opcheck(torch.ops.unimlm.paged_decode_attention.default, (q, kc, vc, table, ctx, 0.125))
    torch.library.opcheck(torch.ops.unimlm.paged_decode_attention.default, (q, kc, vc, table, ctx, 0.125, 20))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    qp = torch.randn(7, 4, 64)
    torch.library.opcheck(torch.ops.unimlm.paged_prefill_attention.default, (qp, kc, vc, table, cu, ctx, 0.125))
    torch.library.opcheck(torch.ops.unimlm.paged_prefill_attention.default, (qp, kc, vc, table, cu, ctx, 0.125, 4))


AOT_SCRIPT = r'''
import inspect, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from unimlm_engine.kernels import paged_attention as pa


def build(kernel, types, consts):
    names = list(inspect.signature(kernel.fn).parameters)
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


cache = {"q_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16", "bt_ptr": "*i32", "ctx_ptr": "*i32",
         "o_ptr": "*bf16", "scale": "fp32"}
for bs, d, bn in ((16, 128, 64), (32, 256, 32)):
    for single in (True, False):
        build(pa._decode_split_kernel, {**cache, "acc_ptr": "*fp32", "ml_ptr": "*fp32"},
              dict(BLOCK_SIZE=bs, BLOCK_N=bn, BLOCK_G=16, BLOCK_D=d, F32=False, SINGLE_SPLIT=single))
    build(pa._prefill_kernel, {**cache, "cu_ptr": "*i32"},
          dict(BLOCK_M=64 if d <= 128 else 32, BLOCK_SIZE=bs, BLOCK_N=bn, BLOCK_D=d, F32=False))
build(pa._decode_merge_kernel, {"acc_ptr": "*fp32", "ml_ptr": "*fp32", "o_ptr": "*bf16"}, dict(BLOCK_S=8, BLOCK_D=128))
print("compiled")
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_bf16():
    """Ahead-of-time compile to sm_90 cubin (no GPU needed): catches GPU-only lowering errors
    that the interpreter accepts. Compile only: nothing is launched."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("lens,gqa,bs", [([1, 17, 63, 129, 500], 4, 16), ([5], 1, 32), ([33, 1, 2], 8, 16),
                                         ([77], 4, 16), ([1], 2, 16)],
                         ids=["mix-gqa4-bs16", "one-mha-bs32", "gqa8-bs16", "one-gqa4-bs16", "one-token"])
def test_batched_cpu_decode_equals_per_sequence_reference(lens, gqa, bs):
    """The CPU serving path (all sequences at once) == the per-sequence fp32 reference."""
    from unimlm_engine.ops.paged_attention import paged_decode_batched, paged_decode_reference

    hkv, d = 2, 64
    nblocks = sum((n + bs - 1) // bs for n in lens) + 3
    k_cache = torch.randn(nblocks, bs, hkv, d)
    v_cache = torch.randn(nblocks, bs, hkv, d)
    perm = torch.randperm(nblocks).tolist()
    width = max((n + bs - 1) // bs for n in lens) + 1
    tables = torch.full((len(lens), width), -1, dtype=torch.int32)
    for i, n in enumerate(lens):
        need = (n + bs - 1) // bs
        tables[i, :need] = torch.tensor([perm.pop() for _ in range(need)], dtype=torch.int32)
    # poison every slot no sequence owns: masked positions must not leak into the output
    valid = torch.zeros(nblocks * bs, dtype=torch.bool)
    for i, n in enumerate(lens):
        for p in range(n):
            valid[int(tables[i, p // bs]) * bs + p % bs] = True
    k_cache.view(-1, hkv, d)[~valid] = float("nan")
    v_cache.view(-1, hkv, d)[~valid] = float("nan")
    q = torch.randn(len(lens), hkv * gqa, d)
    ctx = torch.tensor(lens, dtype=torch.int32)
    ref = paged_decode_reference(q, k_cache, v_cache, tables, ctx, 0.125)
    got = paged_decode_batched(q, k_cache, v_cache, tables, ctx, 0.125)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=2e-6)
