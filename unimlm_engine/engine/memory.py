"""Memory plan: weights, decoders, an activation estimate and the KV pool that fills the rest.

On CUDA the pool is sized like vLLM's: total * gpu_memory_utilization - weights - activations
- decoders (the C++ `num_kv_blocks`), where "weights" is what the device already holds besides the
decoders (`total - free` from `cudaMemGetInfo`: this model's weights, and also other models, a second
engine's pool or other processes on the card; at least this model's own parameter bytes); on the CPU
it is `cpu_kv_cache_bytes`; an explicit
`EngineConfig.num_kv_blocks` overrides both. The activation figure is an estimate of the
largest step's live tensors (hidden states, the FFN intermediates, attention output and
fp32 logits of the sampled rows), not a measurement.
"""
from __future__ import annotations

import torch

from .. import _C
from ..config import EngineConfig


def _param_bytes(module) -> int:
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


def plan_kv_blocks(model, cfg: EngineConfig) -> dict:
    c = model.cfg.llm
    dtype_bytes = torch.tensor([], dtype=model.dtype).element_size()
    per_block = _C.kv_bytes_per_block(num_layers=c.num_hidden_layers, num_kv_heads=c.num_key_value_heads,
                                      head_dim=c.head_dim, block_size=cfg.block_size, dtype_bytes=dtype_bytes)
    decoders = _param_bytes(model.decoders)
    weights = _param_bytes(model) - decoders
    t = cfg.max_num_batched_tokens
    activations = t * (4 * c.hidden_size + 3 * c.intermediate_size + (c.num_attention_heads + 2 * c.num_key_value_heads)
                       * c.head_dim) * dtype_bytes + cfg.max_num_seqs * c.vocab_size * 4
    device = model.device
    if cfg.num_kv_blocks is not None:
        n = cfg.num_kv_blocks
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # what is already on the card counts, not only this model: a pool sized from the model alone
        # ran out of memory on an H200 with a second copy of the LLM loaded (benchmarks/bench_e2e.py)
        other = max(0, (total - free) - weights - decoders)
        weights += other
        n = _C.num_kv_blocks(total_memory=total, num_layers=c.num_hidden_layers, num_kv_heads=c.num_key_value_heads,
                             head_dim=c.head_dim, block_size=cfg.block_size, dtype_bytes=dtype_bytes,
                             utilization=cfg.gpu_memory_utilization, weights=weights, activations=activations,
                             decoders=decoders)
        if n < 1:
            raise MemoryError(f"no room for a KV cache: weights {weights >> 20} MiB, decoders {decoders >> 20} MiB, "
                              f"activations ~{activations >> 20} MiB of {total >> 20} MiB at utilization "
                              f"{cfg.gpu_memory_utilization}")
    else:
        n = max(1, cfg.cpu_kv_cache_bytes // per_block)
    return {"num_kv_blocks": int(n), "bytes_per_block": int(per_block),
            # weights: on CUDA, with whatever else the card held at construction
            "bytes": {"weights": weights, "decoders": decoders, "activations_estimate": int(activations),
                      "kv_pool": int(n * per_block)}}
