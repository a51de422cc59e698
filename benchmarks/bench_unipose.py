"""UniPose ([POSE]) decoder time on the CPU: the row-tiled group self-attention (ops/masked_attention.py) vs the
dense masked SDPA, for serving (forward, no grad) and for training (forward + backward of the outputs' sum).

The decoder is the shipped `tiny` model's (50 groups x 69 queries in the keypoint layer: a 3,450-token
self-attention under the official group mask). Both paths run on the same inputs and their outputs are
compared before any time is printed. Median of --iters after one warm-up.

    python benchmarks/bench_unipose.py [--batches 1 8] [--iters 5] [--threads 2]
Writes benchmarks/results/bench_unipose.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from unimlm_engine.checkpoint.loader import load_checkpoint
from unimlm_engine.model.decoders.pose import MAX_KPT_SLOTS, MAX_OBJ_SLOTS
from unimlm_engine.ops import masked_attention

HERE = Path(__file__).resolve().parent


def inputs(b: int, d: int, n_obj: int = 2, n_kpt: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, 224, 224, generator=g), torch.zeros(b, 224, 224, dtype=torch.bool),
            torch.randn(b, MAX_OBJ_SLOTS, 4, d, generator=g), torch.arange(MAX_OBJ_SLOTS)[None].expand(b, -1) < n_obj,
            torch.randn(b, MAX_KPT_SLOTS, 4, d, generator=g), torch.arange(MAX_KPT_SLOTS)[None].expand(b, -1) < n_kpt)


def timed(fn, iters: int) -> tuple[float, object]:
    out = fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="unimlm_engine/assets/shapes-tiny")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _, _ = load_checkpoint(args.model)
    net = model.decoders.unipose.float().eval()
    d = model.cfg.llm.hidden_size
    rows = []
    for b in args.batches:
        x = inputs(b, d)
        for mode in ("serve", "train"):
            res = {}
            for path in ("dense", "tiled"):
                masked_attention.TILED = path == "tiled"
                if mode == "serve":
                    def fn():
                        with torch.no_grad():
                            return net.forward_tensors(*x)
                else:
                    def fn():
                        net.zero_grad(set_to_none=True)
                        out = net.forward_tensors(*x)
                        sum(o.nan_to_num(0.0, 0.0, 0.0).sum() for o in out).backward()
                        return [o.detach() for o in out]
                res[path] = timed(fn, args.iters)
            masked_attention.TILED = True
            diff = max(float((a.nan_to_num(0.0, 0.0, 0.0) - c.nan_to_num(0.0, 0.0, 0.0)).abs().max())
                       for a, c in zip(res["dense"][1], res["tiled"][1]))
            if diff > 1e-4:
                raise SystemExit(f"batch {b} {mode}: tiled and dense outputs differ by {diff:.2e}")
            row = {"batch": b, "mode": mode, "dense_s": round(res["dense"][0], 4), "tiled_s": round(res["tiled"][0], 4),
                   "speedup": round(res["dense"][0] / res["tiled"][0], 2), "max_abs_diff": diff}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = HERE / "results" / "bench_unipose.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "iters": args.iters, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
