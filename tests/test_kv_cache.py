"""The KV-cache write op `unimlm::write_kv_cache` (Triton under TRITON_INTERPRET=1, forced with
backend_override) against the advanced-index reference and against the slots themselves.

Caches start as NaN: a slot that should be written and is not stays NaN, a slot that is written
but should not be (a skipped token, a wrong block or offset) loses its NaN; both fail. Unused
parts of the source buffers are NaN too, so reading K/V through a wrong stride fails."""
import pytest
import torch

from unimlm_engine.ops import kv_cache as kv
from unimlm_engine.ops._dispatch import backend_override

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
LAYOUTS = ("contiguous", "fused-qkv", "strided-heads", "dim-slice", "token-stride", "cache-view")


def rand_kv(rows, h, d, dtype):
    """[rows, H, D] as a non-contiguous view (every other head of a wider tensor)."""
    return torch.randn(rows, 2 * h, d).to(dtype)[:, ::2]


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def make_sources(layout, t, hkv, d, dtype):
    """k, v: [T, Hkv, D] laid out as `layout` says; every element outside the views is NaN.
    In the strided layouts k and v have different strides (step 2 for k, 3 for v)."""
    if layout == "fused-qkv":  # k, v sliced out of one [T, H + 2 Hkv, D] projection output
        h = 2 * hkv
        qkv = _poisoned((t, h + 2 * hkv, d), dtype)
        qkv[:, h:] = torch.randn(t, 2 * hkv, d).to(dtype)
        return qkv[:, h:h + hkv], qkv[:, h + hkv:]
    views = []
    for step in (2, 3):
        if layout == "strided-heads":  # every step-th head
            view = _poisoned((t, step * hkv, d), dtype)[:, ::step]
        elif layout == "dim-slice":  # the first D of wider rows
            view = _poisoned((t, hkv, d + 16 * step), dtype)[:, :, :d]
        elif layout == "token-stride":  # every step-th token
            view = _poisoned((step * t, hkv, d), dtype)[::step]
        else:
            view = _poisoned((t, hkv, d), dtype)
        view.copy_(torch.randn(t, hkv, d).to(dtype))
        views.append(view)
    return tuple(views)


def make_caches(layout, nb, bs, hkv, d, dtype):
    """NaN caches [NB, BS, Hkv, D]; `cache-view`: k_cache is one half of a [NB, 2, BS, Hkv, D]
    buffer and v_cache the first D of wider rows, so the two caches' strides differ."""
    if layout == "cache-view":
        return _poisoned((nb, 2, bs, hkv, d), dtype)[:, 0], _poisoned((nb, bs, hkv, d + 16), dtype)[..., :d]
    return _poisoned((nb, bs, hkv, d), dtype), _poisoned((nb, bs, hkv, d), dtype)


def make_slots(t, nb, bs, skip_every=7):
    """Distinct slots in random order; for T >= 2 the pool's first (0) and last slot are written;
    one token in `skip_every` (never those two) is -1."""
    middle = torch.randperm(nb * bs - 2) + 1
    slots = torch.cat([torch.tensor([0, nb * bs - 1]), middle])[:t]
    slots[3::skip_every] = -1
    return slots[torch.randperm(t)]


def assert_written(cache, src, slots):
    """Rows at the kept slots equal src bit for bit; every other row of the cache is still all NaN."""
    rows = cache.reshape(-1, *cache.shape[2:])
    keep = slots >= 0
    assert torch.equal(rows[slots[keep]], src[keep]), "a kept token's slot does not hold its K/V"
    untouched = torch.ones(rows.shape[0], dtype=torch.bool)
    untouched[slots[keep]] = False
    assert torch.isnan(rows[untouched]).all(), "a slot no kept token maps to was written"


@pytest.mark.triton_cpu
@pytest.mark.parametrize("bs", [16, 32], ids=["bs16", "bs32"])
def test_write_kv_cache_matches_reference(bs):
    t, hkv, d, nb = 23, 3, 80, 6
    k, v = rand_kv(t, hkv, d, torch.float16), rand_kv(t, hkv, d, torch.float16)
    slots = torch.randperm(nb * bs)[:t]
    slots[[0, 5, 11]] = -1  # skipped tokens
    kc = torch.randn(nb, bs, hkv, d).half()
    vc = torch.randn(nb, bs, hkv, d).half()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    with backend_override("triton"):
        kv.write_kv_cache(k, v, kc, vc, slots)
    kv.write_kv_cache_reference(k, v, kc_ref, vc_ref, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


@pytest.mark.triton_cpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bs", [16, 32], ids=["bs16", "bs32"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("t", [1, 63, 111], ids=["T1", "T63", "T111"])
def test_write_into_nan_cache(t, dtype, bs, layout):
    hkv, d = 3, 80  # neither a power of two: the kernel's masked lanes are exercised
    nb = -(-t // bs) + 2
    k, v = make_sources(layout, t, hkv, d, dtype)
    kc, vc = make_caches(layout, nb, bs, hkv, d, dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    slots = make_slots(t, nb, bs)
    with backend_override("triton"):
        kv.write_kv_cache(k, v, kc, vc, slots)
    assert_written(kc, k, slots)
    assert_written(vc, v, slots)
    kv.write_kv_cache_reference(k, v, kc_ref, vc_ref, slots)
    torch.testing.assert_close(kc, kc_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.triton_cpu
@pytest.mark.parametrize("hkv,d", [(1, 64), (8, 128), (32, 128), (2, 256)],
                         ids=["hkv1-d64", "hkv8-d128", "hkv32-d128", "hkv2-d256"])
def test_head_shapes(hkv, d):
    t, bs, dtype = 37, 16, torch.float16
    nb = -(-t // bs) + 1
    k, v = make_sources("fused-qkv", t, hkv, d, dtype)
    kc, vc = make_caches("contiguous", nb, bs, hkv, d, dtype)
    slots = make_slots(t, nb, bs, skip_every=5)
    with backend_override("triton"):
        kv.write_kv_cache(k, v, kc, vc, slots)
    assert_written(kc, k, slots)
    assert_written(vc, v, slots)


@pytest.mark.parametrize("t", [0, 1, 9], ids=["T0", "T1", "T9"])
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton_cpu), "reference"])
def test_all_tokens_skipped_leaves_cache_untouched(t, backend):
    hkv, d, bs, nb = 2, 64, 16, 3
    k, v = make_sources("contiguous", t, hkv, d, torch.float32)
    kc, vc = make_caches("contiguous", nb, bs, hkv, d, torch.float32)
    with backend_override(backend):
        kv.write_kv_cache(k, v, kc, vc, torch.full((t,), -1, dtype=torch.int64))
    assert torch.isnan(kc).all() and torch.isnan(vc).all()


@pytest.mark.triton_cpu
@pytest.mark.parametrize("which", ["k", "cache"])
def test_non_contiguous_head_dim_is_rejected(which):
    """The launcher needs head_dim contiguous (stride 1) in k/v and the caches; it says so."""
    t, hkv, d, bs, nb = 5, 2, 64, 16, 2
    k, v = make_sources("contiguous", t, hkv, d, torch.float32)
    kc, vc = make_caches("contiguous", nb, bs, hkv, d, torch.float32)
    if which == "k":
        k = torch.randn(t, hkv, 2 * d)[..., ::2]
        match = "head_dim must be contiguous"
    else:
        kc = torch.randn(nb, bs, hkv, 2 * d)[..., ::2]
        match = "cache head_dim must be contiguous"
    with backend_override("triton"), pytest.raises(AssertionError, match=match):
        kv.write_kv_cache(k, v, kc, vc, torch.arange(t))


@pytest.mark.triton_cpu
def test_int64_addressing_past_2_pow_31():
    """Block ids whose element offset block_id * BS * Hkv * D passes 2^31. The caches are 4 GiB
    torch.empty buffers: untouched pages are never materialised, so this costs a few MB. Only the
    written blocks and their neighbours are poisoned (the whole cache would be materialised)."""
    bs, hkv, d = 16, 1, 64
    nb = (1 << 31) // (bs * hkv * d) + 8
    kc = torch.empty(nb, bs, hkv, d, dtype=torch.float16)
    vc = torch.empty(nb, bs, hkv, d, dtype=torch.float16)
    blocks = torch.tensor([nb - 1, 3, nb - 5])
    assert int(blocks[0]) * bs * hkv * d > 2 ** 31
    watched = torch.tensor([nb - 1, nb - 2, 3, 2, 4, nb - 5, nb - 6, nb - 4, 0])  # 0: where a -1 would land
    for cache in (kc, vc):
        cache[watched] = float("nan")
    n = 40
    slots = (blocks[:, None] * bs + torch.arange(bs)).flatten()[:n]
    slots[7] = -1
    k, v = torch.randn(n, hkv, d).half(), torch.randn(n, hkv, d).half()
    with backend_override("triton"):
        kv.write_kv_cache(k, v, kc, vc, slots)
    local = {int(b): i for i, b in enumerate(watched)}  # slots renumbered into the watched blocks
    keep = slots >= 0
    local_slots = torch.full_like(slots, -1)
    local_slots[keep] = torch.tensor([local[int(s) // bs] * bs + int(s) % bs for s in slots[keep]])
    assert_written(kc[watched], k, local_slots)
    assert_written(vc[watched], v, local_slots)


def test_cpu_default_backend_is_the_reference(monkeypatch):
    """CPU tensors never launch Triton unless it is forced."""
    class NoLaunch:
        @staticmethod
        def write_kv_cache_triton(*args):
            raise AssertionError("the Triton kernel was launched for CPU tensors")

    monkeypatch.setattr(kv, "_kernel", lambda: NoLaunch)
    t, hkv, d, bs, nb = 9, 2, 64, 16, 2
    k, v = make_sources("strided-heads", t, hkv, d, torch.float32)
    kc, vc = make_caches("contiguous", nb, bs, hkv, d, torch.float32)
    slots = make_slots(t, nb, bs, skip_every=4)
    kv.write_kv_cache(k, v, kc, vc, slots)
    assert_written(kc, k, slots)
    assert_written(vc, v, slots)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton_cpu)])
def test_opcheck_fake_tensors(backend):
    kc, vc = torch.randn(8, 16, 2, 64), torch.randn(8, 16, 2, 64)
    k = torch.randn(3, 2, 64)
    with backend_override(backend):
        torch.library.opcheck(torch.ops.unimlm.write_kv_cache.default,
                              (k, k.clone(), kc.contiguous(), vc.contiguous(), torch.tensor([0, -1, 17])))


@pytest.mark.triton_gpu
@pytest.mark.parametrize("t", [1, 111, 4096], ids=["T1", "T111", "T4096"])
def test_write_bf16_cuda(t):
    """Vicuna-7B cache shape (32 KV heads, d 128, block size 16) on the GPU, compiled kernel."""
    hkv, d, bs = 32, 128, 16
    nb = -(-t // bs) + 4
    k, v = (x.cuda() for x in make_sources("fused-qkv", t, hkv, d, torch.bfloat16))
    kc, vc = (x.cuda() for x in make_caches("contiguous", nb, bs, hkv, d, torch.bfloat16))
    slots = make_slots(t, nb, bs).cuda()
    with backend_override("triton"):
        kv.write_kv_cache(k, v, kc, vc, slots)
    assert_written(kc.cpu(), k.cpu(), slots.cpu())
    assert_written(vc.cpu(), v.cpu(), slots.cpu())


AOT_SCRIPT = r'''
import inspect, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from unimlm_engine.kernels import kv_cache as kvc

names = list(inspect.signature(kvc._write_kv_kernel.fn).parameters)
for dt in ("bf16", "fp16", "fp32"):
    for bs, hkv, d, bt in ((16, 32, 128, 1), (32, 8, 128, 4), (16, 4, 256, 4)):
        consts = dict(BLOCK_SIZE=bs, BLOCK_T=bt, BLOCK_H=hkv, BLOCK_D=d)
        types = {"k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "kc_ptr": f"*{dt}", "vc_ptr": f"*{dt}", "slot_ptr": "*i64"}
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
        src = ASTSource(fn=kvc._write_kv_kernel, signature=sig,
                        constexprs={(names.index(k),): v for k, v in consts.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("compiled")
'''


@pytest.mark.slow
def test_kernel_compiles_for_sm90():
    """Ahead-of-time compile to sm_90 cubin (no GPU needed): catches GPU-only lowering errors
    that the interpreter accepts. Compile only: nothing is launched."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
