"""gpu_suite modes `check` (step 3) and `sanitize` (step 7).

check: every kernel in bf16 (fp16 in a dry run) against its fp32 reference, outputs and
workspaces NaN-poisoned (`poison_empty`), unused cache pages and the slots past each context
NaN (`make_paged`): an unwritten output or an unmasked read shows up as NaN.
sanitize: every kernel once on small ragged shapes; the suite runs it under
compute-sanitizer memcheck (check runs the same launches first, so Triton compiles them
outside the sanitizer).
"""
from __future__ import annotations

import itertools

import torch

from gpu_suite_common import (DEV, DRY, LOW, bits, case, headline, lora_inputs, low_name, make_paged, msda_backends,
                              msda_inputs, poison_empty, record, sync)


def _ops():
    from unimlm_engine.ops import kv_cache, lora_moe, msda, paged_attention
    from unimlm_engine.ops._dispatch import backend_override
    return paged_attention, kv_cache, lora_moe, msda, backend_override


@case
def check_decode(lens, h, hkv, d, bs, dtype=None, tol=2e-2):
    """Decode with the live longest context and with the block-table bound (a captured graph's
    split count): both must match the fp32 reference; the error is also compared with a
    same-precision PyTorch attention's (DESIGN.md section 7: at most twice it, or within tol)."""
    from unimlm_engine.kernels import paged_attention as kpa
    pa, _, _, _, override = _ops()
    dtype = dtype or LOW
    kc, vc, table, ctx = make_paged(lens, hkv, d, bs, dtype, seed=len(lens) + h + d)
    q = torch.randn(len(lens), h, d, device=DEV).to(dtype)
    scale = d ** -0.5
    with override("triton"), poison_empty():
        live = pa.paged_decode_attention(q, kc, vc, table, ctx, scale, max(lens))
        bound = pa.paged_decode_attention(q, kc, vc, table, ctx, scale, -1)
    sync()
    rows = sorted(set(range(min(4, len(lens)))) | set(range(max(0, len(lens) - 4), len(lens))))
    idx = torch.tensor(rows, device=DEV)
    ref = pa.paged_decode_reference(q[idx].float(), kc, vc, table[idx], ctx[idx], scale)
    same = pa.paged_decode_reference(q[idx], kc, vc, table[idx], ctx[idx], scale, dtype=dtype).float()
    err = max((o[idx].float() - ref).abs().max().item() for o in (live, bound))
    err_same = (same - ref).abs().max().item()
    nan = bool(torch.isnan(live).any() or torch.isnan(bound).any())
    bn = kpa._block_n(bs, d)
    ok = not nan and (err <= tol or err <= 2 * err_same)
    return record(f"check.decode B{len(lens)} H{h}/{hkv} d{d} bs{bs} {str(dtype)[6:]}", "ok" if ok else "FAIL",
                  max_err=err, same_precision_err=err_same, nan=nan, max_ctx=max(lens),
                  splits_live=kpa._num_splits(len(lens), hkv, max(lens), bn, q.device),
                  splits_bound=kpa._num_splits(len(lens), hkv, table.shape[1] * bs, bn, q.device))


@case
def check_prefill(q_lens, prefix, h, hkv, d, bs, dtype=None, tol=2e-2):
    pa, _, _, _, override = _ops()
    dtype = dtype or LOW
    lens = [a + b for a, b in zip(q_lens, prefix)]
    kc, vc, table, ctx = make_paged(lens, hkv, d, bs, dtype, seed=sum(lens))
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=DEV)
    q = torch.randn(sum(q_lens), h, d, device=DEV).to(dtype)
    scale = d ** -0.5
    with override("triton"), poison_empty():
        out = pa.paged_prefill_attention(q, kc, vc, table, cu, ctx, scale, max(q_lens))
    sync()
    ref = pa.paged_prefill_reference(q.float(), kc, vc, table, cu, ctx, scale)
    err = (out.float() - ref).abs().max().item()
    nan = bool(torch.isnan(out).any())
    return record(f"check.prefill q{q_lens} prefix{prefix} H{h}/{hkv} d{d} bs{bs} {str(dtype)[6:]}",
                  "ok" if not nan and err <= tol else "FAIL", max_err=err, nan=nan)


@case
def check_kv_write(t, hkv, d, bs, dtype=None):
    """Into NaN caches, some slots -1: the written slots equal the reference's, the rest stay NaN
    (compared bit for bit)."""
    _, kv, _, _, override = _ops()
    dtype = dtype or LOW
    nb = -(-t // bs) + 4
    k = torch.randn(t, hkv, d, device=DEV).to(dtype)
    v = torch.randn(t, hkv, d, device=DEV).to(dtype)
    slots = torch.randperm(nb * bs)[:t].to(DEV)
    slots[[0, t // 2, t - 1]] = -1
    kc = torch.full((nb, bs, hkv, d), float("nan"), device=DEV, dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    kr, vr = kc.clone(), vc.clone()
    with override("triton"):
        kv.write_kv_cache(k, v, kc, vc, slots)
    sync()
    kv.write_kv_cache_reference(k, v, kr, vr, slots)
    ok = torch.equal(bits(kc), bits(kr)) and torch.equal(bits(vc), bits(vr))
    untouched = int(torch.isnan(kc).flatten(1).all(1).sum())
    return record(f"check.kv_write T{t} Hkv{hkv} d{d} bs{bs} {str(dtype)[6:]}", "ok" if ok else "FAIL",
                  untouched_nan_blocks=untouched)


@case
def check_lora(t, k, n, e, r, dtype=None, tol=2e-2):
    """The op (the default base) and the kernel with each base (x W0^T by cuBLAS or by the kernel's own K loop)
    against the fp32 reference, the LoRA part alone too (a broken gate or expand cannot hide under the base
    GEMM), and benchmarks/bench_lora_moe.launch_split bit-equal to the kernel. One record per base."""
    import bench_lora_moe as blm
    from unimlm_engine.kernels import lora_moe as klm
    _, _, lm, _, override = _ops()
    dtype = dtype or LOW
    x, w0, wg, a, b = lora_inputs(t, k, n, e, r, dtype, seed=t)
    scaling = 32.0 / r
    xf = x.float()
    gate = torch.softmax(xf @ wg.float().t(), dim=-1)
    mid = (xf @ a.float().t()).view(-1, e, r) * gate.unsqueeze(-1)
    base_ref = xf @ w0.float().t()
    lora_ref = scaling * (mid.reshape(-1, e * r) @ b.float().t())
    ref = base_ref + lora_ref
    with override("triton"), poison_empty():
        op_out = lm.lora_moe_linear(x, w0, wg, a, b, scaling)
    for base in klm.BASES:
        with override("triton"), poison_empty():
            out = klm.lora_moe_triton(x, w0, wg, a, b, scaling, base=base)
            split = blm.launch_split(x, w0, wg, a, b, scaling, base=base)
            for name in ("base_gemm", "router_shrink", "base_gate_expand"):
                if split[name] is not None:
                    split[name]()
        sync()
        rel = ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
        rel_lora = ((out.float() - base_ref - lora_ref).abs().max() / lora_ref.abs().max().clamp_min(1e-6)).item()
        nan = bool(torch.isnan(out).any())
        same = torch.equal(bits(split["out"]), bits(out))
        extra = {}
        if base == klm.default_base():  # the op dispatches to this base
            extra["op_equal"] = torch.equal(bits(op_out), bits(out))
        ok = not nan and rel <= tol and rel_lora <= 0.1 and same and extra.get("op_equal", True)
        record(f"check.lora[{base}] T{t} {k}->{n} E{e} r{r} {str(dtype)[6:]}", "ok" if ok else "FAIL", rel_err=rel,
               rel_err_lora_part=rel_lora, nan=nan, splits=split["splits"], gated=split["gated"],
               launch_split_equal=same, **extra)


@case
def check_msda(levels, n, m, d, lq, p, dtype=None, loc_dtype=None, softmax=False, tol=3e-2):
    _, _, _, om, override = _ops()
    dtype = dtype or LOW
    args = msda_inputs(levels, n, m, d, lq, p, dtype, loc_dtype, softmax, seed=lq + d)
    ref = om.ms_deform_attn_reference(*args, softmax).float()
    backends, reason = msda_backends()
    tag = f"N{n} Lq{lq} M{m} D{d} L{len(levels)} P{p} {str(dtype)[6:]}/{str(args[3].dtype)[6:]}"
    for be in backends:
        with override(be), poison_empty():
            out = om.ms_deform_attn(*args, softmax)
        sync()
        err = (out.float() - ref).abs().max().item()
        nan = bool(torch.isnan(out).any())
        ok = not nan and err <= tol * max(1.0, ref.abs().max().item())
        record(f"check.msda[{be}] {tag}{' softmax' if softmax else ''}", "ok" if ok else "FAIL", max_err=err, nan=nan)
    if reason:
        record(f"check.msda[cuda] {tag}", "SKIP", reason=reason)


@case
def check_layer_ops(t, n, h, hkv, d, inter, dtype=None, tol=2e-2):
    """(residual add +) RMSNorm, RoPE on q / k column views of one fused QKV output, SiLU x up on views of a
    fused gate-up output: each against fp32 math on the same low-precision inputs (relative to the max)."""
    from unimlm_engine.ops import layer_ops as lo
    _, _, _, _, override = _ops()
    dtype = dtype or LOW
    g = torch.Generator(device=DEV).manual_seed(t)
    rnd = lambda *shape: torch.randn(*shape, device=DEV, generator=g).to(dtype)  # noqa: E731
    x, r, w = rnd(t, n), rnd(t, n), (1 + 0.1 * torch.randn(n, device=DEV, generator=g)).to(dtype)
    qkv, gu = rnd(t, (h + 2 * hkv) * d), rnd(t, 2 * inter)
    q, k, _ = qkv.split([h * d, hkv * d, hkv * d], 1)
    q, k = q.view(t, h, d), k.view(t, hkv, d)
    pos = torch.randint(0, 4096, (t,), device=DEV, generator=g).float()
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=DEV).float() / d))
    emb = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)[:, None]
    cos, sin = emb.cos(), emb.sin()
    with override("triton"), poison_empty():
        norm = lo.rms_norm(x, w, 1e-5)
        anorm, s = lo.add_rms_norm(x, r, w, 1e-5)
        qo, ko = lo.rope(q, k, cos, sin)
        act = lo.silu_mul(*gu.chunk(2, -1))
    sync()

    def ref_norm(v):
        vf = v.float()
        return w.float() * vf * torch.rsqrt(vf.pow(2).mean(-1, keepdim=True) + 1e-5)

    def ref_rope(v):
        vf = v.float()
        return vf * cos + torch.cat([-vf[..., d // 2:], vf[..., :d // 2]], -1) * sin

    gf, uf = (c.float() for c in gu.chunk(2, -1))
    pairs = {"rms_norm": (norm, ref_norm(x)), "add_rms_norm": (anorm, ref_norm(x.float() + r.float())),
             "residual_sum": (s, x.float() + r.float()), "rope_q": (qo, ref_rope(q)), "rope_k": (ko, ref_rope(k)),
             "silu_mul": (act, torch.nn.functional.silu(gf) * uf)}
    errs = {name: ((o.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
            for name, (o, ref) in pairs.items()}
    nan = any(bool(torch.isnan(o).any()) for o, _ in pairs.values())
    ok = not nan and max(errs.values()) <= tol
    return record(f"check.layer_ops T{t} N{n} H{h}/{hkv} d{d} I{inter} {str(dtype)[6:]}", "ok" if ok else "FAIL",
                  max_rel_err=max(errs.values()), nan=nan, **{f"rel_err_{k}": v for k, v in errs.items()})


def run_check() -> None:
    if DRY:
        check_decode([1, 17, 140], 4, 2, 64, 16)  # 3 splits: the merge kernel runs
        check_prefill([1, 9, 20], [0, 5, 13], 4, 2, 64, 16)
        check_kv_write(9, 2, 64, 16)
        check_lora(3, 160, 70, 4, 2)
        check_msda([(5, 6), (3, 3)], 1, 2, 16, 5, 2)
        check_msda([(5, 6), (3, 3)], 1, 2, 16, 5, 2, loc_dtype=torch.float32, softmax=True)
        check_layer_ops(3, 72, 4, 2, 16, 40)
    else:
        # decode: many splits (B*Hkv small), GQA, a batch of 64 random contexts, block 32 / d64, d256, fp16 d80
        check_decode([1, 17, 129, 500, 4096], 32, 32, 128, 16)
        check_decode([1, 17, 129, 500, 4096], 32, 8, 128, 16)
        g = torch.Generator().manual_seed(1)
        check_decode([int(x) for x in torch.randint(1, 4097, (64,), generator=g)], 32, 32, 128, 16)
        check_decode([3, 31, 32, 33, 1000], 16, 2, 64, 32)
        check_decode([1, 40, 700], 8, 8, 256, 16)
        check_decode([5, 63, 111], 8, 1, 80, 16, torch.float16)
        # prefill: cached prefixes, GQA, one long prompt, d256 with block 32
        check_prefill([1, 77, 300, 64], [0, 40, 700, 1], 32, 8, 128, 16)
        check_prefill([1000], [0], 32, 32, 128, 16)
        check_prefill([5, 130], [3, 200], 8, 8, 256, 32)
        check_kv_write(37, 8, 128, 16)
        check_kv_write(64, 32, 128, 16)
        check_kv_write(7, 3, 80, 32, torch.float16)
        for t in (1, 16, 64, 65, 300):  # split-K (ungated) up to 64 tokens, gated in launch 1 above
            check_lora(t, 4096, 11008, 8, 4)
        check_lora(1, 11008, 4096, 8, 4)  # down_proj
        check_lora(200, 4096, 1000, 16, 64)
        lv = [(20, 33), (10, 17), (5, 9), (3, 5)]
        check_msda(lv, 2, 8, 32, 333, 4)
        check_msda(lv, 2, 8, 32, 333, 4, loc_dtype=torch.float32, softmax=True)
        check_msda(lv, 1, 8, 32, 111, 8)
        check_msda([(7, 9), (4, 5), (1, 1)], 2, 3, 13, 63, 3)
        check_layer_ops(1, 4096, 32, 32, 128, 11008)  # Vicuna-7B decode
        check_layer_ops(77, 4096, 32, 8, 128, 14336)  # GQA, a prefill chunk
        check_layer_ops(5, 5120, 40, 40, 128, 13824)  # 13B widths (N not a power of two)
        check_layer_ops(3, 200, 6, 2, 24, 100)  # ragged: masks everywhere
    run_sanitize_launches()
    bad = [r for r in _mine() if r["status"] in ("FAIL", "ERROR")]
    n = len([r for r in _mine() if r["name"].startswith("check.") and r["status"] != "SKIP"])
    worst = {k: max((r.get(k, 0.0) for r in _mine()), default=0.0) for k in ("max_err", "rel_err")}
    headline(f"{n - len(bad)}/{n} {low_name()} cases ok, NaN-poisoned; worst abs err {worst['max_err']:.2g}, "
             f"worst LoRA rel err {worst['rel_err']:.2g}" + (f"; FAILED: {bad[0]['name']}" if bad else ""))


def _mine() -> list[dict]:
    from gpu_suite_common import _records
    return [r for r in _records if r["status"] != "info"]


@case
def launch_paged():
    pa, kv, _, _, override = _ops()
    shapes = [([1, 17, 129, 300], 8, 2, 128, 16), ([64] * 40, 32, 32, 128, 16), ([5, 33], 4, 4, 64, 32),
              ([7, 90], 4, 4, 256, 16)]
    if DRY:
        shapes = [([1, 17, 40], 4, 2, 64, 16), ([5, 33], 2, 2, 32, 32)]
    with override("triton"):
        for lens, h, hkv, d, bs in shapes:
            kc, vc, table, ctx = make_paged(lens, hkv, d, bs, LOW, poison=False)
            q = torch.randn(len(lens), h, d, device=DEV).to(LOW)
            pa.paged_decode_attention(q, kc, vc, table, ctx, d ** -0.5, max(lens))
            ql = [max(1, n // 2) for n in lens]
            cu = torch.tensor([0, *itertools.accumulate(ql)], dtype=torch.int32, device=DEV)
            qp = torch.randn(sum(ql), h, d, device=DEV).to(LOW)
            pa.paged_prefill_attention(qp, kc, vc, table, cu, ctx, d ** -0.5, max(ql))
            kk = torch.randn(len(lens), hkv, d, device=DEV).to(LOW)
            slots = torch.tensor([-1] + list(range(1, len(lens))), dtype=torch.int64, device=DEV)
            kv.write_kv_cache(kk, kk.clone(), kc, vc, slots)
            sync()
    return record("launch.paged (decode, prefill, kv write)", "ok", shapes=len(shapes))


@case
def launch_lora():
    _, _, lm, _, override = _ops()
    shapes = [(1, 256, 300, 8, 4), (40, 320, 130, 4, 16), (130, 128, 200, 16, 4)]
    if DRY:
        shapes = [(3, 160, 70, 4, 2), (70, 64, 40, 2, 2)]
    from unimlm_engine.kernels import lora_moe as klm
    with override("triton"):
        for t, k, n, e, r in shapes:
            for base in klm.BASES:
                klm.lora_moe_triton(*lora_inputs(t, k, n, e, r, LOW), 2.0, base=base)
                sync()
    return record("launch.lora_moe (split and gated, both bases)", "ok", shapes=len(shapes))


@case
def launch_msda():
    _, _, _, om, override = _ops()
    backends, reason = msda_backends()
    ran = []
    for d in ((16,) if DRY else (32, 13)):
        args = msda_inputs([(9, 11), (5, 6), (3, 3), (1, 2)], 2, 4, d, 9, 4, LOW, spread=(3.0, -1.0))
        for be in backends:
            with override(be):
                om.ms_deform_attn(*args, True)
            sync()
            ran.append(f"{be}-D{d}")
    return record("launch.msda", "ok", ran=ran, cuda_left_out=reason)


@case
def launch_layer_ops():
    from unimlm_engine.ops import layer_ops as lo
    _, _, _, _, override = _ops()
    shapes = [(1, 200, 6, 2, 24, 100), (9, 4096, 32, 8, 128, 11008)] if not DRY else [(3, 72, 4, 2, 16, 40)]
    with override("triton"):
        for t, n, h, hkv, d, inter in shapes:
            x = torch.randn(t, n, device=DEV).to(LOW)
            lo.add_rms_norm(x, x.clone(), torch.ones(n, device=DEV).to(LOW), 1e-5)
            qkv = torch.randn(t, (h + 2 * hkv) * d, device=DEV).to(LOW)
            cs = torch.rand(t, 1, d, device=DEV)
            lo.rope(qkv[:, :h * d].view(t, h, d), qkv[:, h * d:(h + hkv) * d].view(t, hkv, d), cs, cs.clone())
            lo.silu_mul(*torch.randn(t, 2 * inter, device=DEV).to(LOW).chunk(2, -1))
            sync()
    return record("launch.layer_ops (add+rms_norm, rope, silu_mul)", "ok", shapes=len(shapes))


def run_sanitize_launches() -> None:
    launch_paged()
    launch_lora()
    launch_msda()
    launch_layer_ops()


def run_sanitize() -> None:
    run_sanitize_launches()
    bad = [r for r in _mine() if r["status"] in ("FAIL", "ERROR")]
    ran = [r["name"] for r in _mine() if r["status"] == "ok"]
    note = "launches ran plain (dry run: no compute-sanitizer)" if DRY else "launches ran under memcheck"
    headline(f"{len(ran)}/4 launch groups ran; {note}" + (f"; ERROR: {bad[0]['name']}" if bad else ""))
