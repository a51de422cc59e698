"""Tensor parallelism on the CPU: the same batch through TP=1 and TP=N engines (gloo, worker processes).

N text requests (ignore_eos, `--tokens` each) are submitted at once to an engine with
tensor_parallel_size=1, then to one with --tp; the greedy tokens must match. Wall time and output
tokens/s per engine; engine start-up (the workers' spawn) is timed apart. On a CPU the ranks share the
machine's cores, so this measures the overhead of the split (a broadcast per step, two all-reduces per
layer, three with row-parallel LoRA-MoE) more than any speed-up; TP pays where each rank has its own
device (GPUs, NCCL: untested).

Prints a table and writes benchmarks/results/tp.json.
Usage: python benchmarks/bench_tp.py [--tp 2] [--requests 16] [--tokens 32] [--preset tiny-random] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, write_json  # noqa: E402

import unimlm_engine as ue  # noqa: E402
from unimlm_engine.checkpoint.pretrained import load_pretrained  # noqa: E402


def run(model, tok, tp: int, n: int, tokens: int, repeats: int) -> tuple[dict, list]:
    t0 = time.perf_counter()
    engine = ue.Engine(model, tok, ue.EngineConfig(tensor_parallel_size=tp, num_kv_blocks=512))
    start_s = time.perf_counter() - t0
    sp = ue.SamplingParams(max_tokens=tokens, ignore_eos=True)
    reqs = [ue.Request(prompt=f"Request {i}: tell me a long story about number {i}.", sampling=sp) for i in range(n)]
    try:
        engine.generate_batch(reqs[:2])  # warm-up
        walls, outs = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            outs = engine.generate_batch(reqs)
            walls.append(time.perf_counter() - t0)
        steps = engine.stats()["steps"]
    finally:
        engine.close()
    wall = statistics.median(walls)
    return ({"tp": tp, "requests": n, "tokens_each": tokens, "start_s": round(start_s, 2),
             "wall_s_median": round(wall, 3), "wall_s_min": round(min(walls), 3),
             "out_tok_per_s": round(n * tokens / wall, 1), "steps_total": steps},
            [o.token_ids for o in outs])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--preset", default="tiny-random")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (the workers take the same)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_pretrained(a.preset, device="cpu")
    row1, ids1 = run(model, tok, 1, a.requests, a.tokens, a.repeats)
    row2, ids2 = run(model, tok, a.tp, a.requests, a.tokens, a.repeats)
    if ids1 != ids2:
        raise SystemExit("TP changed the greedy tokens")
    rows = [row1, row2]
    print_table(rows)
    write_json("tp", {"preset": a.preset, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                      "rows": rows})


if __name__ == "__main__":
    main()
