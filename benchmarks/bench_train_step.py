"""Seconds per joint step of training/train_shapes.py (the shapes model, issue 18), per task mix.

Each mix runs the script itself from the shipped checkpoint (`--init`, so no tokenizer training and no
vision / VQA phase) for --steps joint steps; the time of a step is the wall time between two optimizer steps,
and the first two steps (warm-up) are left out. The checkpoint is not written.

    python benchmarks/bench_train_step.py [--mixes MIX ...] [--steps 10] [--threads 2] [--device cpu]

The default mixes: the 57-minute attempt's (benchmarks/RESULTS.md), its VQA and text-only samples alone, and
that plus the DET / SEG or the POSE samples, so the per-sample cost of each decoder can be read off.
Writes benchmarks/results/bench_train_step.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))
import train_shapes  # noqa: E402

from unimlm_engine.config.presets import shapes_dir  # noqa: E402

TEXT = "det_text=3,seg_text=2,pose_text=3"
MIXES = [f"vqa=16,det=2,seg=2,pose=3,{TEXT}", f"vqa=16,{TEXT}", f"vqa=16,det=2,seg=2,{TEXT}",
         f"vqa=16,pose=3,{TEXT}"]


def step_times(mix: str, steps: int, threads: int, device: str, vqa_turns: int = 3) -> list[float]:
    """Wall seconds of joint steps 2 .. steps-1 of one train_shapes run with this mix."""
    stamps = []
    orig_step, orig_write = torch.optim.AdamW.step, train_shapes.write

    def step(self, *a, **k):
        out = orig_step(self, *a, **k)
        stamps.append(time.perf_counter())
        return out

    torch.optim.AdamW.step = step
    train_shapes.write = lambda *a, **k: None
    try:
        with tempfile.TemporaryDirectory() as out:
            train_shapes.main(["--out", out, "--init", str(shapes_dir()), "--vqa-steps", "0", "--steps", str(steps),
                               "--mix", mix, "--vqa-turns", str(vqa_turns), "--threads", str(threads),
                               "--device", device, "--log-every", str(10 ** 9)])
    finally:
        torch.optim.AdamW.step, train_shapes.write = orig_step, orig_write
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixes", nargs="+", default=MIXES)
    ap.add_argument("--steps", type=int, default=10, help="joint steps per mix (the first two are not timed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "bench_train_step.json")
    opts = ap.parse_args(argv)
    if opts.steps < 3:
        ap.error("--steps must be >= 3 (two warm-up steps, then at least one timed)")
    rows = []
    for mix in opts.mixes:
        t = step_times(mix, opts.steps, opts.threads, opts.device)
        rows.append(dict(mix=mix, mean_s=statistics.fmean(t), median_s=statistics.median(t), steps=t))
        print(json.dumps({"mix": mix, "mean_s": round(rows[-1]["mean_s"], 3),
                          "median_s": round(rows[-1]["median_s"], 3)}), flush=True)
    print(f"{'mix':<60}{'mean s/step':>12}{'median':>9}")
    for r in rows:
        print(f"{r['mix']:<60}{r['mean_s']:>12.3f}{r['median_s']:>9.3f}")
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(json.dumps(dict(device=opts.device, threads=opts.threads, torch=torch.__version__,
                                         rows=rows), indent=2))
    print(f"wrote {opts.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
