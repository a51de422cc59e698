"""Kernel launches per decode step of the LLM: the eager small ops against the one-launch layer ops and the
fused q/k/v and gate/up GEMMs (unimlm_engine/ops/layer_ops.py, model/llm.py `fuse_projections_`).

Why count: at batch 1 a step's GPU time is the weight read plus, in a CUDA graph, a few microseconds of gap
per kernel; on an H200 4 Vicuna-7B layers took 0.876 ms against a 0.41 ms weight-read floor (RESULTS.md,
2026-11-28). The count is exact on a CPU: the LLM's decode step runs through the engine's paged attention
with every op on its GPU code path (Triton forced, under the interpreter), and the benchmark counts the
aten calls that would launch a GPU kernel (view ops and allocations excluded) and the Triton launches.
What the saved launches are worth in time needs a GPU: benchmarks/gpu_suite.sh's `step` runs the same A/B
(`unfused` against `nolora`) in CUDA graphs.

Prints a table and writes benchmarks/results/layer_launches.json.
Usage: TRITON_INTERPRET=1 python benchmarks/bench_layer_launches.py [--layers 4] [--batch 1]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, write_json  # noqa: E402

from unimlm_engine.config import LLMConfig  # noqa: E402
from unimlm_engine.engine.paged_attention import PagedAttention, PagedAttentionMetadata, PagedKVCache  # noqa: E402
from unimlm_engine.model.llm import LLM, fuse_projections_  # noqa: E402
from unimlm_engine.ops._dispatch import backend_override  # noqa: E402
from unimlm_engine.ops.layer_ops import fused_layer_ops  # noqa: E402

# aten calls that launch no GPU kernel: views, metadata, allocations
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh", "promote_types"}


class LaunchCounter(TorchDispatchMode):
    """Counts kernel-launching aten calls by name; Triton launches are counted by `count_triton`."""

    def __init__(self):
        super().__init__()
        self.aten = collections.Counter()
        self.triton = collections.Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.paused and not func.is_view and name not in _NO_KERNEL:
            self.aten[name] += 1
        return out


def count_triton(counter: LaunchCounter):
    """Wrap the interpreter's launch so each Triton launch counts once (its own tensor traffic not at all)."""
    from triton.runtime.interpreter import InterpretedFunction
    orig = InterpretedFunction.run

    def run(self, *args, **kwargs):
        counter.triton[self.fn.__name__] += 1
        counter.paused += 1
        try:
            return orig(self, *args, **kwargs)
        finally:
            counter.paused -= 1

    InterpretedFunction.run = run
    return lambda: setattr(InterpretedFunction, "run", orig)


def decode_step_launches(layers: int, batch: int, fused: bool, dtype: torch.dtype) -> LaunchCounter:
    cfg = LLMConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    torch.manual_seed(0)
    m = LLM(cfg).to(dtype).eval()
    if fused:
        fuse_projections_(m.model.layers)
    bs, ctx = 16, 40
    pages = ctx // bs + 1
    cache = PagedKVCache(layers, batch * pages + 1, bs, cfg.num_key_value_heads, cfg.head_dim, dtype, "cpu")
    attn = PagedAttention(cache)
    tables = [[1 + i * pages + j for j in range(pages)] for i in range(batch)]
    attn.set_metadata(PagedAttentionMetadata.build([1] * batch, [ctx] * batch, tables, bs, "cpu"))
    emb = m.embed(torch.arange(batch))
    pos = torch.full((batch,), ctx - 1)
    counter = LaunchCounter()
    undo = count_triton(counter)
    try:
        # no_grad, not inference_mode: under inference_mode the dtype casts (_to_copy) do not reach the mode
        with torch.no_grad(), backend_override("triton"), fused_layer_ops(fused), counter:
            m(emb, pos, attn)
    finally:
        undo()
    return counter


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 (served: the eager path's casts count), float32")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows, detail = [], {}
    for name, fused in (("eager small ops, separate projections", False), ("one-launch ops, fused projections", True)):
        c = decode_step_launches(args.layers, args.batch, fused, dtype)
        total = sum(c.aten.values()) + sum(c.triton.values())
        rows.append({"variant": name, "launches_per_step": total, "per_layer": round(total / args.layers, 1),
                     "aten": sum(c.aten.values()), "triton": sum(c.triton.values())})
        detail[name] = {"aten": dict(c.aten.most_common()), "triton": dict(c.triton.most_common())}
    rows.append({"variant": "saved per layer", "launches_per_step": rows[0]["launches_per_step"] - rows[1][
        "launches_per_step"], "per_layer": round(rows[0]["per_layer"] - rows[1]["per_layer"], 1), "aten": "",
                 "triton": ""})
    print(f"LLM decode step, {args.layers} layers, batch {args.batch}, {args.dtype}, paged attention (a CPU count "
          f"of the GPU code path: Triton under the interpreter; values not checked here)")
    print_table(rows)
    for name, d in detail.items():
        print(f"{name}: aten {d['aten']}; triton {d['triton']}")
    write_json("layer_launches", {"layers": args.layers, "batch": args.batch, "dtype": args.dtype, "rows": rows,
                                  "detail": detail})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
