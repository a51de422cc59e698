"""Python driver of benchmarks/gpu_suite.sh, one mode per suite step (run from the repository root).

    python benchmarks/gpu_suite.py --mode MODE

  probe     versions, device, the _C build (--require-cuda-build: exit 3 without the CUDA MSDA kernel)
  check     step 3: every kernel in bf16 vs fp32 references, NaN-poisoned (gpu_suite_check.py)
  ceilings  step 4: D2D copy GB/s and bf16 GEMM TFLOP/s (gpu_suite_perf.py)
  kernels   step 5: the kernel benchmarks at DESIGN.md section 6 shapes, MSDA dispatch table
            (--classic: the classic MSDA baseline was built; gpu_suite_perf.py)
  step      step 6: 7B-shaped decode step, eager vs CUDA graph, +/- LoRA-MoE (gpu_suite_step.py)
  sanitize  step 7: tiny launches of every kernel (run under compute-sanitizer by the suite)
  e2e       step 8: benchmarks/bench_e2e.py's run on a small workload; its JSON to $OUT/bench_e2e.json
            ($GPU_SUITE_E2E_ARGS replaces the arguments)
  report    the summary table from --steps FILE and the files in $OUT (no torch import)

Records go to $OUT/results.json (gpu_suite_common.py); exit status 1 when a case FAILs or ERRORs.
GPU_SUITE_DRY=1: CPU, TRITON_INTERPRET=1, fp16 for bf16, tiny shapes (see gpu_suite.sh).
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import traceback
from pathlib import Path

MODES = ("probe", "check", "ceilings", "kernels", "step", "sanitize", "e2e", "report")
E2E_DRY = "--device cpu --workload text --requests 2 --max-tokens 4 --concurrency 2 --check 1"
E2E_GPU = "--device cuda --workload text --requests 16 --max-tokens 32 --concurrency 1,16 --check 2 --threads 0"


def run_probe(require_cuda_build: bool) -> int:
    import torch
    import triton

    from gpu_suite_common import DEV, DRY, headline, record
    info = {"torch": torch.__version__, "triton": triton.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "interpret": os.environ.get("TRITON_INTERPRET")}
    if DEV == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2 ** 30, 1))
    from unimlm_engine import _C
    from unimlm_engine.kernels import kv_cache, lora_moe, msda, paged_attention  # noqa: F401  (they must import)
    info.update(c_module=_C.__file__, with_cuda=bool(getattr(_C, "with_cuda", False)),
                msda_forward=hasattr(_C, "msda_forward"))
    ok = info["with_cuda"] and info["msda_forward"]
    status = "ok" if ok or not require_cuda_build else "FAIL"
    if not DRY and not info["cuda_available"]:
        status = "FAIL"
    record("probe", status, **info)
    headline(f"torch {info['torch']} (CUDA {info['torch_cuda']}), triton {info['triton']}, "
             f"{info.get('device', 'no GPU')}; _C with_cuda={info['with_cuda']} msda_forward={info['msda_forward']}"
             + (" (dry run: no build, probe only)" if DRY else ""))
    return 0 if status == "ok" else 3


def run_e2e() -> int:
    """bench_e2e's run and table without its PNG plots (matplotlib may be missing on the GPU machine)."""
    import json

    import bench_e2e
    import torch

    from gpu_suite_common import DRY, OUT, headline, record
    argv = shlex.split(os.environ.get("GPU_SUITE_E2E_ARGS") or (E2E_DRY if DRY else E2E_GPU))
    args = bench_e2e.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = bench_e2e.run(args)
    bench_e2e.print_table(bench_e2e.table_rows(result))
    (OUT / "bench_e2e.json").write_text(json.dumps(result, indent=1, default=str))
    base = result["baseline"]["summary"]
    runs = {r["concurrency"]: r["summary"] for r in result["engine"]}
    top = runs[max(runs)]
    ok = result["verdict"]["correct"]
    record("e2e", "ok" if ok else "FAIL", preset=result["setup"]["preset"], args=" ".join(argv),
           baseline_req_per_s=base["req_per_s"], engine_req_per_s={c: s["req_per_s"] for c, s in runs.items()},
           speedup_at_max=top["req_per_s"] / base["req_per_s"], baseline_tpot_p50_ms=base["tpot_p50_s"] * 1e3,
           engine_tpot_p50_ms={c: s["tpot_p50_s"] * 1e3 for c, s in runs.items()},
           failures=result["verdict"]["failures"][:5])
    c1 = runs[min(runs)]
    headline(f"{result['setup']['preset']} {result['setup']['workload']}: HF serial {base['req_per_s']:.2f} req/s; "
             f"engine c={max(runs)} {top['req_per_s']:.2f} req/s = {top['req_per_s'] / base['req_per_s']:.2f}x "
             f"(>=10x); TPOT p50 c={min(runs)} {c1['tpot_p50_s'] * 1e3:.2f} ms vs HF {base['tpot_p50_s'] * 1e3:.2f} ms"
             + ("" if ok else "; CORRECTNESS CHECK FAILED"))
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--require-cuda-build", action="store_true", help="probe: exit 3 without _C.msda_forward")
    ap.add_argument("--classic", action="store_true", help="kernels: time the classic MSDA baseline too")
    ap.add_argument("--steps", type=Path, help="report: the suite's step table (tab-separated)")
    ap.add_argument("--budget", type=int, default=0, help="report: the suite's time budget in seconds")
    args = ap.parse_args(argv)
    if args.mode == "report":
        from gpu_suite_report import report
        return report(args.steps, args.budget)

    def _term(signum, frame):  # `timeout` sends SIGTERM: unwind so `finally` blocks and records still run
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _term)
    import gpu_suite_common as gs
    gs.MODE["name"] = args.mode
    print(f"gpu_suite --mode {args.mode}: dry={gs.DRY} device={gs.DEV} dtype={gs.low_name()} "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')} OUT={gs.OUT}", flush=True)
    if not gs.DRY:
        import torch
        if not torch.cuda.is_available():
            gs.record(args.mode, "ERROR", error="no CUDA device (set GPU_SUITE_DRY=1 for the CPU dry run)")
            return 1
    try:
        if args.mode == "probe":
            return run_probe(args.require_cuda_build)
        if args.mode == "e2e":
            return run_e2e()
        if args.mode in ("check", "sanitize"):
            import gpu_suite_check as m
            m.run_check() if args.mode == "check" else m.run_sanitize()
        elif args.mode in ("ceilings", "kernels"):
            import gpu_suite_perf as m
            m.run_ceilings() if args.mode == "ceilings" else m.run_kernels(args.classic)
        else:
            import gpu_suite_step as m
            m.run_step()
    except Exception as e:  # outside any case: say so in results.json, then fail the step
        gs.record(args.mode, "ERROR", error=f"{type(e).__name__}: {e}"[:1500], tb=traceback.format_exc()[-2500:])
        traceback.print_exc()
        return 1
    bad = gs.failures()
    for r in bad:
        print(f"{r['status']}: {r['name']}: {r.get('error', '')}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
