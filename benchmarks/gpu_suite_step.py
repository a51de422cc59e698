"""gpu_suite mode `step` (step 6): a Vicuna-7B-shaped decode step, eager vs CUDA graph.

A few layers of the real LLM module (hidden 4096, FFN 11008, 32 heads, bf16) with and without
LoRA-MoE (E=8, r=4 on the FFN linears), paged KV cache at a 1024-token context, batch 1/16/64:
the eager forward (metadata built per step, as ModelRunner does) against
engine/cuda_graphs.DecodeGraphRunner replaying one captured graph per batch bucket, both timed
by the wall clock around a synchronized step. The floor is the bytes one step must read (layer
weights + each sequence's K/V) over the measured copy bandwidth; at batch 1 the target is
<= 1.25x of it (DESIGN.md section 6). A dry run: a one-layer tiny config, fp32, Triton under the
interpreter, the runner's static-buffer path uncaptured (CUDA graph capture needs a GPU).
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from gpu_suite_common import DEV, DRY, case, headline, record, sync

LAYERS = int(os.environ.get("GPU_SUITE_STEP_LAYERS", "4"))
BATCHES = (1, 2) if DRY else (1, 16, 64)
CTX = 40 if DRY else 1024
BS = 16
ITERS = 2 if DRY else 20


def _models(cfg, dtype) -> dict:
    """lora / nolora: as the engine serves them (q/k/v and gate/up fused, the one-launch layer ops);
    unfused: nolora's weights with separate projections and the eager PyTorch small ops (the A/B)."""
    from unimlm_engine.config import LoRAMoEConfig
    from unimlm_engine.model.llm import LLM, fuse_projections_
    models = {}
    for tag, lora in (("lora", LoRAMoEConfig()), ("nolora", None), ("unfused", None)):
        torch.manual_seed(0)
        with torch.device(DEV):
            m = LLM(cfg, lora)
        with torch.no_grad():  # keep random bf16 activations finite through the layers
            for name, p in m.named_parameters():
                if p.dim() == 2 and "embed" not in name:
                    p.mul_(0.5)
        models[tag] = m.to(dtype).eval()
        if tag != "unfused":
            fuse_projections_(m.model.layers)
    return models


def _layer_bytes(m) -> int:
    return sum(p.numel() * p.element_size() for n, p in m.named_parameters() if "embed" not in n and "lm_head" not in n)


def _wall_ms(fn, iters: int) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters * 1e3


def _setup() -> dict:
    """Both models, one paged KV cache (random history), block tables and a graph runner per model."""
    from unimlm_engine.config import LLMConfig
    from unimlm_engine.engine.cuda_graphs import DecodeGraphRunner
    from unimlm_engine.engine.paged_attention import PagedAttention, PagedKVCache
    if DRY:
        cfg = LLMConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    else:
        cfg = LLMConfig(num_hidden_layers=LAYERS, max_position_embeddings=8192)  # Vicuna-7B layer shapes
    dtype = torch.float32 if DRY else torch.bfloat16
    models = _models(cfg, dtype)
    pages = CTX // BS + 1
    cache = PagedKVCache(cfg.num_hidden_layers, max(BATCHES) * pages + 1, BS, cfg.num_key_value_heads,
                         cfg.head_dim, dtype, DEV)
    for t in cache.k + cache.v:
        t.normal_()
    runners = {tag: DecodeGraphRunner(m, PagedAttention(cache), BATCHES, max_context=CTX + BS, capture=not DRY)
               for tag, m in models.items()}
    return {"cfg": cfg, "models": models, "cache": cache, "runners": runners,
            "tables": [[1 + i * pages + j for j in range(pages)] for i in range(max(BATCHES))]}


@case
def step_batch(n: int, s: dict, copy_gbs: float):
    """One batch size: eager and graph outputs compared, both timed, per model; the bytes floor."""
    from unimlm_engine.engine.paged_attention import PagedAttention, PagedAttentionMetadata
    from unimlm_engine.ops.layer_ops import fused_layer_ops
    cfg, cache, tables = s["cfg"], s["cache"], s["tables"]
    ids = np.random.default_rng(n).integers(0, cfg.vocab_size, n).astype(np.int64)
    pos = np.full(n, CTX - 1, dtype=np.int64)
    slots = np.array([tables[i][(CTX - 1) // BS] * BS + (CTX - 1) % BS for i in range(n)], np.int64)
    row = {"batch": n, "ctx": CTX, "layers": cfg.num_hidden_layers}
    kv = n * CTX * cfg.num_key_value_heads * cfg.head_dim * 2 * cache.k[0].element_size() * cfg.num_hidden_layers
    for tag, m in s["models"].items():
        attn, runner = PagedAttention(cache), s["runners"][tag]
        fused = tag != "unfused"

        def eager(m=m, attn=attn, fused=fused):
            with fused_layer_ops(fused):
                attn.set_metadata(PagedAttentionMetadata.build([1] * n, [CTX] * n, tables[:n], BS, DEV))
                return m.forward(m.embed(torch.from_numpy(ids).to(DEV)), torch.from_numpy(pos).to(DEV), attn)

        def graph(runner=runner, fused=fused):
            with fused_layer_ops(fused):  # the capture (first call per bucket) records these ops
                return runner.run(ids, pos, slots, np.array(tables[:n], dtype=np.int32))

        e_out, g_out = eager().float(), graph().float()
        row[f"{tag}_rel_err_graph_vs_eager"] = ((e_out - g_out).abs().max() / e_out.abs().max().clamp_min(1e-6)).item()
        row[f"{tag}_finite"] = bool(torch.isfinite(g_out).all() and torch.isfinite(e_out).all())
        row[f"{tag}_eager_ms"] = _wall_ms(eager, ITERS)
        row[f"{tag}_graph_ms"] = _wall_ms(graph, ITERS)
        row[f"{tag}_captured"] = list(runner.captured)
        row[f"{tag}_floor_ms"] = (_layer_bytes(m) + kv) / (copy_gbs * 1e9) * 1e3
        row[f"{tag}_graph_over_floor"] = row[f"{tag}_graph_ms"] / row[f"{tag}_floor_ms"]
    row["lora_overhead_graph"] = row["lora_graph_ms"] / row["nolora_graph_ms"]
    row["fusion_speedup_graph"] = row["unfused_graph_ms"] / row["nolora_graph_ms"]
    row["graph_speedup_vs_eager"] = row["nolora_eager_ms"] / row["nolora_graph_ms"]
    ok = all(row[f"{t}_finite"] and row[f"{t}_rel_err_graph_vs_eager"] < 5e-2 for t in s["models"])
    return record(f"step.decode {cfg.num_hidden_layers}L B{n} ctx{CTX}", "ok" if ok else "FAIL", **row)


def run_step() -> None:
    from gpu_suite_common import _records
    from unimlm_engine.ops._dispatch import backend_override

    from gpu_suite_perf import ceilings
    copy_gbs = ceilings()["copy_gbs"]
    with torch.inference_mode(), backend_override("triton" if DRY else "auto"):
        setup = _setup()
        for n in BATCHES:
            step_batch(n, setup, copy_gbs)
    rows = {r["batch"]: r for r in _records if r["name"].startswith("step.decode") and "batch" in r}
    if not rows:
        headline("no decode step measured (see the log)")
        return
    b1 = rows[min(rows)]
    big = rows[max(rows)]
    capture = "graphs captured" if b1["nolora_captured"] else "uncaptured (dry run: capture needs a GPU)"
    headline(f"{b1['layers']}L B{b1['batch']}: graph {b1['nolora_graph_ms']:.3g} ms = "
             f"{b1['nolora_graph_over_floor']:.2f}x floor (<=1.25), eager {b1['nolora_eager_ms']:.3g} ms, "
             f"LoRA-MoE x{b1['lora_overhead_graph']:.2f}, unfused layer ops {b1['unfused_graph_ms']:.3g} ms "
             f"(fusion x{b1['fusion_speedup_graph']:.2f}); B{big['batch']}: graph {big['nolora_graph_ms']:.3g} ms "
             f"= {big['nolora_graph_over_floor']:.2f}x floor; {capture}")
