"""Accuracy of the shipped shapes model (`tiny`, issue 18) through the engine, three times over the same
held-out scenes (unimlm_engine/shapes/evaluate.py says what is measured and how):

  eager        the engine as configured by default
  onnxruntime  [DET] / [SEG] through the detector exported to ONNX (with masks) and run by ONNX Runtime
  preemption   a KV pool of --preempt-blocks blocks, small enough that sequences are preempted and recomputed

Greedy decoding, closed loops of --concurrency clients. Prints a table, writes
benchmarks/results/bench_accuracy.json, and exits 1 if the three runs disagree beyond --tol or the targets
(routing >= 0.95, VQA >= 0.85, AP50 >= 0.7, mIoU >= 0.6, PCK >= 0.7) are missed.

Usage: python benchmarks/bench_accuracy.py [--model tiny] [--images 500] [--concurrency 32]
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import print_table, write_json  # noqa: E402

from unimlm_engine import Engine  # noqa: E402
from unimlm_engine.checkpoint.pretrained import load_pretrained  # noqa: E402
from unimlm_engine.config import EngineConfig  # noqa: E402
from unimlm_engine.shapes.evaluate import eval_items, run_requests, score  # noqa: E402

TARGETS = {"routing": 0.95, "vqa_exact_match": 0.85, "det_ap50": 0.7, "seg_miou": 0.6, "pose_pck": 0.7}
METRICS = tuple(TARGETS)


def run(model: str, items, concurrency: int, cfg: EngineConfig, label: str) -> dict:
    m, tok = load_pretrained(model, device="cpu")
    t0 = time.perf_counter()
    with Engine(m, tok, cfg) as eng:
        outs = run_requests(eng, items, concurrency)
        stats = eng.stats()
    wall = time.perf_counter() - t0
    res = score(items, outs, tok)
    res.update(run=label, wall_s=round(wall, 1), backends=sorted({t.backend for o in outs if o for t in o.tasks}))
    pre = stats.get("preemptions") if isinstance(stats, dict) else None
    if pre is not None:
        res["preemptions"] = pre
    print(f"[{label}] {wall:.0f} s: " + ", ".join(f"{k}={res[k]:.4f}" for k in METRICS), flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--preempt-blocks", type=int, default=96,
                    help="KV blocks (16 tokens each) of the preemption run")
    ap.add_argument("--tol", type=float, default=1e-5,
                    help="largest allowed difference between the runs: ONNX Runtime and a recomputed (preempted) "
                         "prefill round the detector's floats differently (measured: up to 2.7e-6; RESULTS.md)")
    ap.add_argument("--runs", default="eager,onnxruntime,preemption")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    items = eval_items(args.images)
    results = []
    for label in args.runs.split(","):
        cfg = EngineConfig(max_num_seqs=args.concurrency)
        if label == "onnxruntime":
            from unimlm_engine.export.cli import export_decoder

            tmp = tempfile.mkdtemp(prefix="bench_acc_onnx_")
            rec = export_decoder("seg", args.model, "onnx", out=tmp, progress=False)
            cfg = EngineConfig(max_num_seqs=args.concurrency, decoder_backends={"gdino": f"onnxruntime:{rec['path']}"})
        elif label == "preemption":
            cfg = EngineConfig(max_num_seqs=args.concurrency, num_kv_blocks=args.preempt_blocks,
                               enable_prefix_caching=False)
        elif label != "eager":
            raise SystemExit(f"unknown run {label!r}")
        results.append(run(args.model, items, args.concurrency, cfg, label))
    print_table([{"run": r["run"], **{k: round(r[k], 4) for k in METRICS}, "requests": r["requests"],
                  "errors": r["errors"], "preemptions": r.get("preemptions"), "wall s": r["wall_s"]} for r in results])
    base = results[0]
    diff = max(abs(r[k] - base[k]) for r in results for k in METRICS if not math.isnan(base[k]))
    met = {k: base[k] >= v for k, v in TARGETS.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    out = {"date": datetime.date.today().isoformat(), "commit": commit, "machine": platform.processor() or
           platform.machine(), "threads": torch.get_num_threads(), "model": args.model, "images": args.images,
           "concurrency": args.concurrency, "targets": TARGETS, "targets_met": met, "max_run_difference": diff,
           "runs": results}
    write_json("bench_accuracy", out)
    print(f"max difference between runs: {diff:.2g} (--tol {args.tol:g}); targets met: {met}")
    return 0 if diff <= args.tol and all(met.values()) and all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
