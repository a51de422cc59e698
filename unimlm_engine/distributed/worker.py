"""A tensor-parallel worker process (ranks 1 .. tp-1) and the step protocol it shares with rank 0.

Control over the worker's pipe (rank 0 -> worker): one small header per operation; the worker blocks
on it with no timeout (an idle engine sends nothing) and exits when the pipe closes (rank 0 gone).
Data over the process group (`TPGroup.broadcast` from rank 0): the step's int metadata in one int64
tensor, then the input embeddings as raw bytes (exact for any dtype).

    FORWARD  (T, N, M, is_all_decode, max_query_len, max_context_len, itemsize)
             ints = positions [T] | cu_seqlens_q [N+1] | context_lens [N] | block_tables [N*M] | slots [T]
             embeds [T, hidden] as uint8 [T, hidden*itemsize]
    COPY     (n,)  ints = src [n] | dst [n]          copy-on-write of KV blocks in every layer
    SHUTDOWN ()
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Optional

import torch

FORWARD, COPY, SHUTDOWN = "forward", "copy", "shutdown"


@dataclass
class WorkerSpec:
    rank: int
    world_size: int
    backend: str
    host: str
    port: int
    timeout_s: float
    device: str
    dtype: torch.dtype
    kv_dtype: torch.dtype
    llm_cfg: object  # LLMConfig
    lora_moe: Optional[object]  # LoRAMoEConfig
    num_blocks: int
    block_size: int
    num_threads: int


def unpack_forward(ints: torch.Tensor, t: int, n: int, m: int):
    """-> positions [T] int64, cu_seqlens_q [N+1] int32, context_lens [N] int32, block_tables [N, M] int32,
    slot_mapping [T] int64 (the inverse of the packing in `driver.TensorParallel.forward`)."""
    pos, cu, ctx, bt, slots = ints.split([t, n + 1, n, n * m, t])
    return pos, cu.to(torch.int32), ctx.to(torch.int32), bt.view(n, m).to(torch.int32), slots


def worker_main(spec: WorkerSpec, state: dict, conn) -> None:
    """Entry point of a spawned worker: build the shard, report ready, join the group, serve steps."""
    from ..engine.paged_attention import PagedAttention, PagedKVCache
    from .comm import TPGroup, make_store
    from .layers import build_stack, local_config

    try:
        torch.set_num_threads(spec.num_threads)
        device = torch.device(spec.device)
        if device.type == "cuda":  # untested: no multi-GPU machine was available
            torch.cuda.set_device(device)
        group = TPGroup(spec.rank, spec.world_size, spec.backend, spec.timeout_s, device)
        stack = build_stack(spec.llm_cfg, spec.lora_moe, group, state, device, spec.dtype)
        del state
        loc = local_config(spec.llm_cfg, spec.world_size)
        cache = PagedKVCache(loc.num_hidden_layers, spec.num_blocks, spec.block_size, loc.num_key_value_heads,
                             loc.head_dim, dtype=spec.kv_dtype, device=device)
        attn = PagedAttention(cache)
        conn.send(("ready", None))
        group.connect(make_store(spec.host, spec.port, spec.world_size, False, spec.timeout_s))
    except BaseException:  # noqa: BLE001 - reported to rank 0, which fails the engine's start
        conn.send(("error", traceback.format_exc()))
        return
    try:
        _serve(conn, group, stack, attn, spec)
    except EOFError:
        return  # rank 0 is gone
    except BaseException:  # noqa: BLE001 - rank 0 sees the exit (watchdog) and the failed collective
        traceback.print_exc()
        raise SystemExit(1)


@torch.inference_mode()
def _serve(conn, group, stack, attn, spec: WorkerSpec) -> None:
    from ..engine.paged_attention import PagedAttentionMetadata

    device = group.device
    hidden = spec.llm_cfg.hidden_size
    cache = attn.cache
    while True:
        op, args = conn.recv()
        if op == SHUTDOWN:
            return
        if op == COPY:
            (n,) = args
            ints = group.broadcast(torch.empty(2 * n, dtype=torch.int64, device=device))
            src, dst = ints[:n], ints[n:]
            for t in cache.k + cache.v:
                t[dst] = t[src]
            continue
        t, n, m, decode, max_q, max_ctx, itemsize = args
        ints = group.broadcast(torch.empty(2 * t + 2 * n + 1 + n * m, dtype=torch.int64, device=device))
        raw = group.broadcast(torch.empty(t, hidden * itemsize, dtype=torch.uint8, device=device))
        pos, cu, ctx, bt, slots = unpack_forward(ints, t, n, m)
        attn.set_metadata(PagedAttentionMetadata(cu_seqlens_q=cu, context_lens=ctx, block_tables=bt,
                                                 slot_mapping=slots, is_all_decode=bool(decode), num_tokens=t,
                                                 max_query_len=max_q, max_context_len=max_ctx))
        stack(raw.view(spec.dtype), pos, attn)
