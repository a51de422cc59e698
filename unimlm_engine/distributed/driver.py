"""Rank 0's side of tensor parallelism: starts the workers, broadcasts each step, watches them.

The engine process is rank 0: its scheduler, block manager, vision tower, embedding, LM head, sampler
and task decoders are the only ones. `TensorParallel` stands in for `model.llm` in the runner's
forward: it sends the step to the workers (header over each worker's pipe, metadata and input
embeddings by broadcast), then runs rank 0's shard of the decoder stack; the row-parallel layers'
all-reduces join the ranks. Weights: rank 0's loaded model is sharded in memory and each worker's
shard goes to it through shared memory at spawn (workers do not read the checkpoint).

Failure: a watchdog thread waits on the workers' process sentinels. A worker that exits while the
engine runs makes `on_failure(WorkerDiedError)` run at once (the engine fails the requests in flight
and closes); a collective that fails on rank 0 raises `WorkerDiedError` too. Every collective has a
timeout (`EngineConfig.distributed_timeout_s`), and workers exit when rank 0's pipe closes.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from multiprocessing.connection import wait as mp_wait
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..engine.types import EngineError
from .comm import CollectiveError, TPGroup, make_store
from .layers import build_stack, check_tp, local_config, shard_state
from .worker import COPY, FORWARD, SHUTDOWN, WorkerSpec, worker_main

log = logging.getLogger("unimlm_engine")


class TensorParallelError(EngineError):
    """The tensor-parallel group cannot go on (the ranks are out of step): the engine is closed."""

    closes_engine = True  # the engine loop stops admitting requests when a step raises it


class WorkerDiedError(TensorParallelError):
    """A tensor-parallel worker process died, or a collective with it failed or timed out (a hung worker):
    the requests in flight end with it and the engine is closed."""


class WorkerStartError(EngineError):
    """A tensor-parallel worker failed to start."""


def _death(rank: int, p) -> str:
    code = f" (exit code {p.exitcode})" if p.exitcode is not None else ""
    return f"tensor-parallel worker rank {rank} died{code}; the engine is closed"


class TensorParallel:
    """tp ranks over `model`'s LLM. kv_dtype: the paged cache's dtype. on_failure: called once, on a thread
    of its own, when the group breaks while the engine runs (a worker died, a collective failed or timed
    out, rank 0 failed mid-step)."""

    def __init__(self, model, tp: int, num_blocks: int, block_size: int, kv_dtype: Optional[torch.dtype] = None,
                 timeout_s: float = 60.0, on_failure: Optional[Callable[[EngineError], None]] = None):
        cfg = model.cfg.llm
        check_tp(cfg, tp)
        self.tp, self.timeout_s, self.on_failure = tp, timeout_s, on_failure
        self.dtype, self.device = model.dtype, torch.device(model.device)
        self.local = local_config(cfg, tp)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if not (dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available()):
            raise EngineError(f"tensor parallelism on {self.device.type} needs torch.distributed's {backend} "
                              "backend, which this torch build lacks")
        self.failed: Optional[EngineError] = None
        self._closing = False
        self._send_lock, self._fail_lock = threading.Lock(), threading.Lock()
        store = make_store("127.0.0.1", 0, tp, True, timeout_s)
        full = {k: v.detach().to("cpu") for k, v in model.llm.model.state_dict().items()
                if not k.startswith("embed_tokens.")}
        ctx = mp.get_context("spawn")
        # the ranks share the CPU cores: each worker takes 1/tp of this process's intra-op threads (spinning
        # OpenMP threads of oversubscribed ranks slow every step several times; RESULTS.md)
        threads = max(1, torch.get_num_threads() // tp)
        devices = [self._rank_device(rank) for rank in range(tp)]
        self.procs, self.conns = [], []
        try:
            for rank in range(1, tp):
                state = {k: v.share_memory_() for k, v in shard_state(full, rank, tp).items()}
                spec = WorkerSpec(rank=rank, world_size=tp, backend=backend, host="127.0.0.1", port=store.port,
                                  timeout_s=timeout_s, device=str(devices[rank]), dtype=self.dtype,
                                  kv_dtype=kv_dtype or self.dtype, llm_cfg=cfg, lora_moe=model.cfg.lora_moe,
                                  num_blocks=num_blocks, block_size=block_size, num_threads=threads)
                parent, child = ctx.Pipe()
                p = ctx.Process(target=worker_main, args=(spec, state, child), name=f"unimlm-tp-rank{rank}",
                                daemon=True)
                p.start()
                child.close()
                self.procs.append(p)
                self.conns.append(parent)
            self._wait_ready(timeout_s)
            self.group = TPGroup(0, tp, backend, timeout_s, self.device)
            self.stack = build_stack(cfg, model.cfg.lora_moe, self.group, shard_state(full, 0, tp), self.device,
                                     self.dtype)
            self.group.connect(store)
        except BaseException:
            self._kill_all()
            raise
        del full
        self._store = store
        self._watchdog = threading.Thread(target=self._watch, name="unimlm-tp-watchdog", daemon=True)
        self._watchdog.start()

    def _rank_device(self, rank: int) -> torch.device:
        if self.device.type != "cuda":
            return torch.device("cpu")
        if rank == 0:
            return self.device
        base = self.device.index or 0  # untested: rank r on the r-th GPU after rank 0's
        if base + rank >= torch.cuda.device_count():
            raise EngineError(f"tensor_parallel_size={self.tp} needs {base + self.tp} GPUs from cuda:{base}, "
                              f"{torch.cuda.device_count()} visible")
        return torch.device("cuda", base + rank)

    @property
    def num_kv_heads(self) -> int:
        """KV heads of rank 0's share of the paged cache."""
        return self.local.num_key_value_heads

    def _wait_ready(self, timeout_s: float) -> None:
        end = time.monotonic() + max(timeout_s, 120.0)  # spawn re-imports torch: slow on a busy machine
        for rank, (p, conn) in enumerate(zip(self.procs, self.conns), start=1):
            ready = mp_wait([conn, p.sentinel], timeout=max(0.0, end - time.monotonic()))
            if conn in ready:
                try:
                    kind, detail = conn.recv()
                except EOFError:
                    kind, detail = "error", "the worker closed its pipe"
                if kind == "ready":
                    continue
                raise WorkerStartError(f"tensor-parallel worker rank {rank} failed to start:\n{detail}")
            if p.sentinel in ready:
                raise WorkerStartError(f"tensor-parallel worker rank {rank} exited while starting "
                                       f"(exit code {p.exitcode})")
            raise WorkerStartError(f"tensor-parallel worker rank {rank} was not ready within "
                                   f"{max(timeout_s, 120.0):.0f} s")

    # ---- the step ---------------------------------------------------------------------------------
    def _send(self, op: str, args: tuple) -> None:
        error = None
        with self._send_lock:
            for rank, conn in enumerate(self.conns, start=1):
                try:
                    conn.send((op, args))
                except (OSError, ValueError) as e:
                    error = f"sending to rank {rank}: {e}"
                    break
        if error is not None:
            raise self._died(error)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        """The runner's `llm.forward`: broadcast the step (metadata from `attn.meta`) and run rank 0's shard."""
        if self.failed is not None:
            raise self.failed
        meta = attn.meta
        t, n = meta.num_tokens, meta.context_lens.shape[0]
        m = meta.block_tables.shape[1]
        if embeds.dtype != self.dtype:
            raise EngineError(f"TensorParallel: embeddings are {embeds.dtype}, the workers expect {self.dtype}")
        ints = torch.cat([positions.long(), meta.cu_seqlens_q.long(), meta.context_lens.long(),
                          meta.block_tables.long().flatten(), meta.slot_mapping.long()]).to(self.device)
        embeds = embeds.contiguous()
        self._send(FORWARD, (t, n, m, int(meta.is_all_decode), int(meta.max_query_len), int(meta.max_context_len),
                             embeds.element_size()))
        try:
            self.group.broadcast(ints)
            self.group.broadcast(embeds.view(torch.uint8))
            return self.stack(embeds, positions, attn)
        except CollectiveError as e:
            raise self._died(str(e)) from None
        except Exception as e:  # rank 0 failed mid-step: the workers wait in a collective it will not join
            self._fail(TensorParallelError(f"rank 0 failed inside a tensor-parallel step ({type(e).__name__}: "
                                           f"{e}); the ranks are out of step, the engine is closed"))
            raise self.failed from e

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Tell the workers to copy KV blocks src -> dst in their shares (rank 0 copies its own)."""
        if self.failed is not None:
            raise self.failed
        self._send(COPY, (int(src.numel()),))
        try:
            self.group.broadcast(torch.cat([src.long(), dst.long()]).to(self.device))
        except CollectiveError as e:
            raise self._died(str(e)) from None

    # ---- failure and shutdown ---------------------------------------------------------------------
    def _died(self, detail: str) -> WorkerDiedError:
        """A collective or a send failed (on the loop thread): the group is broken whatever the cause. The
        error names the dead worker when one exits within 2 s; the engine is closed (`_fail`)."""
        if self.failed is None:  # by sentinel, not is_alive(): the watchdog may be reaping the same process
            ended = set(mp_wait([p.sentinel for p in self.procs], timeout=2.0))
            dead = [(r, p) for r, p in enumerate(self.procs, start=1) if p.sentinel in ended]
            self._fail(WorkerDiedError(_death(*dead[0]) if dead else
                                       f"tensor-parallel collective failed ({detail}); the engine is closed"))
        return self.failed

    def _fail(self, err: TensorParallelError) -> None:
        """Once: record `err`, stop every worker (their collectives cannot go on) and run `on_failure` on a
        thread of its own (it closes the engine, which joins the loop thread that may be the caller)."""
        with self._fail_lock:
            if self.failed is not None:
                return
            self.failed = err
        log.error("%s", err)
        self._kill_all()
        if self.on_failure is not None:
            threading.Thread(target=self.on_failure, args=(err,), name="unimlm-tp-failure", daemon=True).start()

    def _watch(self) -> None:
        alive = {p.sentinel: (r, p) for r, p in enumerate(self.procs, start=1)}
        while alive:
            for s in mp_wait(list(alive)):
                rank, p = alive.pop(s)
                if not self._closing:
                    p.join(0.1)
                    self._fail(WorkerDiedError(_death(rank, p)))

    def _kill_all(self) -> None:
        for p in self.procs:
            if p.pid is None or p.pid == os.getpid() or _exited(p):
                continue
            try:
                p.kill()
            except ProcessLookupError:  # reaped meanwhile (by the watchdog's join)
                pass

    def close(self, graceful: bool = True, timeout: float = 1.0) -> None:
        """Stop the workers: SHUTDOWN over the pipes (graceful), then join, killing any left after `timeout`.
        graceful=False (rank 0's loop may still be inside a step): kill at once."""
        if self._closing:
            return
        self._closing = True
        if graceful and self.failed is None:
            try:
                self._send(SHUTDOWN, ())
            except EngineError:
                pass
        end = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, end - time.monotonic()) if graceful else 0.0)
        self._kill_all()
        for p in self.procs:
            p.join(1.0)
        for c in self.conns:
            c.close()
        if threading.current_thread() is not self._watchdog:
            self._watchdog.join(1.0)


def _exited(p) -> bool:
    """Whether worker `p` has ended, by its sentinel: `is_alive()` polls with waitpid, which races with the
    watchdog thread's join on the same process (the loser sees ECHILD and reports a dead process as alive)."""
    return bool(mp_wait([p.sentinel], timeout=0))
