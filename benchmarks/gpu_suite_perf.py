"""gpu_suite modes `ceilings` (step 4) and `kernels` (step 5).

ceilings: the measured device-to-device copy bandwidth and bf16 GEMM rate (benchmarks/common.py);
later modes read them back from results.json.
kernels: each kernel benchmark's own `run_case` / `bench_shape` at the DESIGN.md section 6
shapes, bf16: decode attention at batch 64 x context 4096 against the copy bandwidth (target
>= 0.85), the KV write, the fused LoRA-MoE linear against the base GEMM alone (target <= 1.15x),
MSDA against the classic one-thread-per-output kernel at Grounding-DINO encoder shapes (target
>= 3x); then the faster MSDA kernel goes into the dispatch table (bench_msda.record_dispatch,
at $UNIMLM_BACKEND_TABLE). A dry run calls the same functions on tiny shapes with wall-clock timers.
"""
from __future__ import annotations

import time

import torch

from gpu_suite_common import DEV, DRY, LOW, case, headline, load_records, low_name, record, timer, wall_timer


def _cpu_ceilings() -> dict:
    """Dry run: the same two numbers on the CPU (small buffers, wall clock)."""
    src = torch.empty(64 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = wall_timer(lambda: dst.copy_(src), warmup=1, iters=3)
    a = torch.randn(512, 512)
    mm = wall_timer(lambda: a @ a, warmup=1, iters=3)
    return {"copy_gbs": 2 * src.numel() / (ms * 1e-3) / 1e9, "matmul_tflops": 2 * 512 ** 3 / (mm * 1e-3) / 1e12,
            "matmul_dtype": "float32", "device": "cpu (dry run)"}


def _gpu_ceilings() -> dict:
    from common import copy_bandwidth_gbs, device_info, matmul_tflops
    return {"copy_gbs": copy_bandwidth_gbs(), "matmul_tflops": matmul_tflops(), "matmul_dtype": "bfloat16",
            "device": device_info()["name"], "info": device_info()}


def run_ceilings() -> dict:
    c = _cpu_ceilings() if DRY else _gpu_ceilings()
    record("ceilings", "ok", **c)
    headline(f"copy {c['copy_gbs']:.0f} GB/s (D2D read+write), {c['matmul_dtype']} GEMM "
             f"{c['matmul_tflops']:.3g} TFLOP/s on {c['device']}")
    return c


def ceilings() -> dict:
    """The ceilings step's numbers from results.json, measured here when that step did not run."""
    rows = [r for r in load_records() if r.get("name") == "ceilings" and r.get("status") == "ok"]
    return rows[-1] if rows else run_ceilings()


@case
def bench_decode(batch, ctx, hkv, copy_gbs):
    import bench_paged_attention as bpa
    from unimlm_engine.kernels import paged_attention as kpa
    from unimlm_engine.ops import paged_attention as pa
    from unimlm_engine.ops._dispatch import backend_override
    with backend_override("triton"):
        row = bpa.run_case(batch, ctx, hkv, copy_gbs, pa, pa.paged_decode_reference, timer=timer(), device=DEV,
                           dtype=LOW)
    splits = kpa._num_splits(batch, hkv, ctx, kpa._block_n(bpa.BLOCK_SIZE, bpa.HEAD_DIM), torch.device(DEV))
    return record(f"kernels.decode B{batch} ctx{ctx} H{bpa.HEADS}/{hkv}", row["check"], splits=splits, **row)


@case
def bench_kv(phase, t, copy_gbs):
    import bench_kv_cache as bkv
    from unimlm_engine.ops import kv_cache
    from unimlm_engine.ops._dispatch import backend_override
    kw = {"timer": wall_timer, "device": DEV, "num_blocks": 16} if DRY else {}
    with backend_override("triton"):
        row = bkv.run_case(phase, t, copy_gbs, kv_cache, **kw)
    return record(f"kernels.kv_write {phase} T{t}", row["check"], **row)


@case
def bench_lora(t, r):
    import bench_lora_moe as blm
    from unimlm_engine.ops._dispatch import backend_override
    from unimlm_engine.ops.lora_moe import lora_moe_linear, lora_moe_reference
    kw = {"k": 160, "n": 96, "e": 4} if DRY else {}
    with backend_override("triton"):
        row = blm.run_case(t, r, lora_moe_linear, lora_moe_reference, timer=timer(), device=DEV, dtype=LOW, **kw)
    k, n = kw.get("k", blm.K_IN), kw.get("n", blm.N_OUT)
    return record(f"kernels.lora T{t} {k}->{n} E{kw.get('e', blm.EXPERTS)} r{r}", row["check"], **row)


def _msda_impls(classic: bool) -> dict:
    import bench_msda as bm
    if DRY:
        from unimlm_engine.kernels.msda import ms_deform_attn_triton
        return {"reference": bm.ms_deform_attn_reference, "triton": ms_deform_attn_triton}
    return bm.gpu_impls(skip_classic=not classic)


@case
def bench_msda_all(classic: bool, copy_gbs: float):
    """bench_msda's shapes (encoder, decoder at N 1 and 2, DCNv4), then the dispatch table."""
    import bench_msda as bm
    impls = _msda_impls(classic)
    if DRY:
        shapes = [bm.Shape("dry-encoder-N1", [(6, 8), (3, 4)], 1, 0, m=2, d=16, p=2)]
        kw = {"device": "cpu", "timer": lambda fn, w, i: wall_timer(fn, 1, 2)}
    else:
        shapes, kw = bm.gpu_shapes([1, 2]), {}
    rows = []
    for shape in shapes:
        rows += bm.bench_shape(shape, LOW, impls, 5, 20, copy_gbs, **kw)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    bm.print_table(rows)
    for r in rows:
        record(f"kernels.msda {r['shape']} {r['impl']}", "ok" if r["correct"] else "FAIL", **r)
    winner, totals = bm.fastest_backend(rows)
    if winner is None:
        why = "dry run: only the Triton kernel runs without a GPU" if DRY else \
            "Triton and CUDA did not both pass on a common shape"
        record("kernels.msda dispatch", "SKIP", reason=f"dispatch table not written: {why}")
    else:
        name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
        _, path = bm.record_dispatch(rows, LOW, name)
        record("kernels.msda dispatch", "ok", winner=winner, totals_ms=totals, table=str(path))
    if not classic:
        record("kernels.msda classic", "SKIP", reason="dry run: the classic baseline needs CUDA" if DRY else
               "classic CUDA baseline not built (see the msda-classic log)")
    return rows


def _pick(prefix: str, key: str):
    from gpu_suite_common import _records
    rows = [r for r in _records if r["name"].startswith(prefix) and r.get(key) is not None]
    return rows[0][key] if rows else None


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def run_kernels(classic: bool) -> None:
    c = ceilings()
    gbs = c["copy_gbs"]
    if DRY:
        bench_decode(2, 64, 8, gbs)
        bench_kv("decode", 4, gbs)
        bench_kv("prefill", 40, gbs)
        for t in (3, 70):
            bench_lora(t, 4)
    else:
        for b, ctx, hkv in ((64, 4096, 32), (64, 4096, 8), (1, 4096, 32)):
            bench_decode(b, ctx, hkv, gbs)
        for phase, t in (("decode", 64), ("prefill", 4096)):
            bench_kv(phase, t, gbs)
        for t in (1, 16, 64, 256, 1024, 4096):
            bench_lora(t, 4)
    t0 = time.time()
    rows = bench_msda_all(classic, gbs) or []
    enc = [r for r in rows if "encoder" in r["shape"] and r["impl"] in ("triton", "cuda") and r["correct"]]
    best = min(enc, key=lambda r: r["ms"]) if enc else None
    vs_classic = best.get("speedup_vs_classic") if best else None
    print(f"msda {time.time() - t0:.1f}s", flush=True)
    decode_key = "kernels.decode B2" if DRY else "kernels.decode B64 ctx4096 H32/32"
    lora_lo, lora_hi = ("kernels.lora T3", "kernels.lora T70") if DRY else ("kernels.lora T1 ", "kernels.lora T4096")
    headline(f"{low_name()}: decode {'B2 ctx64' if DRY else 'B64 ctx4096'} {_fmt(_pick(decode_key, 'frac_copy_bw'))}"
             f" of copy bw (>=0.85); LoRA-MoE /base T{'3' if DRY else '1'} {_fmt(_pick(lora_lo, 'cublas_base/base'))} "
             f"(Triton base {_fmt(_pick(lora_lo, 'triton_base/base'))}), T{'70' if DRY else '4096'} "
             f"{_fmt(_pick(lora_hi, 'cublas_base/base'))} (Triton base {_fmt(_pick(lora_hi, 'triton_base/base'))}) "
             f"(<=1.15); MSDA encoder best "
             f"{best['impl'] if best else '-'} {_fmt(best['ms'] if best else None, '.3f')} ms, vs classic "
             f"{_fmt(vs_classic)}x (>=3); dispatch {_pick('kernels.msda dispatch', 'winner') or 'unchanged'}")
