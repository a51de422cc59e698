"""Engine: the public face. Builds the parts and takes requests from any thread.

    Engine -> Intake (caller's thread: validation, images, tokens, prompt-side super links)
           -> EngineCore (loop thread: C++ scheduler, ModelRunner over the paged KV cache, sampling,
              SuperLinks, DecoderRouter to the decoder workers)
           -> OutputProcessor (text deltas, stop strings, stream events, the final RequestOutput)

Every handle ends exactly once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import time
from typing import Optional, Sequence as Seq

import torch

from .. import _C
from ..config import EngineConfig
from ..sampling import SamplingParams
from .core import EngineCore
from .handle import RequestHandle
from .intake import Intake
from .memory import plan_kv_blocks
from .runner import ModelRunner
from .superlink import SuperLinks
from .types import EngineClosedError, EngineError, QueueFullError, Request, RequestOutput


class Engine:
    def __init__(self, model, tokenizer, config: Optional[EngineConfig] = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = cfg = config or EngineConfig()
        self.max_model_len = cfg.max_model_len or model.cfg.llm.max_position_embeddings
        self.memory = plan_kv_blocks(model, cfg)
        policy = _C.SchedulingPolicy.PRIORITY if cfg.policy == "priority" else _C.SchedulingPolicy.FCFS
        self.scheduler = _C.Scheduler(_C.SchedulerConfig(
            num_blocks=self.memory["num_kv_blocks"], block_size=cfg.block_size,
            enable_prefix_caching=cfg.enable_prefix_caching, max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens, max_queue_size=cfg.max_queue_size,
            max_model_len=self.max_model_len, policy=policy))
        self.superlinks = SuperLinks(model)
        self.tp = None  # tensor parallelism: rank 0's driver of the worker processes (unimlm_engine/distributed)
        self._closed = False
        if cfg.tensor_parallel_size > 1:
            from ..distributed import TensorParallel

            self.tp = TensorParallel(model, cfg.tensor_parallel_size, self.memory["num_kv_blocks"], cfg.block_size,
                                     timeout_s=cfg.distributed_timeout_s, on_failure=self._on_tp_failure)
        try:
            self.runner = ModelRunner(model, self.memory["num_kv_blocks"], cfg.block_size,
                                      cuda_graphs=cfg.cuda_graphs, cuda_graph_batch_sizes=cfg.cuda_graph_batch_sizes,
                                      cuda_graph_max_context=cfg.cuda_graph_max_context, superlinks=self.superlinks,
                                      tp=self.tp)
            self.intake = Intake(model, tokenizer, cfg, self.max_model_len, self.superlinks)
            self.core = EngineCore(model, self.scheduler, self.runner, self.superlinks, self.intake, cfg)
        except BaseException:
            if self.tp is not None:
                self.tp.close(graceful=False)
            raise
        self.output = self.core.output
        self.router = self.core.router
        self._ids = itertools.count(1)
        self._intake_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None  # submit_async's threads

    # ---- construction / shutdown -----------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str, device=None, dtype: Optional[torch.dtype] = None,
                        config: Optional[EngineConfig] = None) -> "Engine":
        from ..checkpoint.pretrained import load_pretrained

        m, tok = load_pretrained(model, device=device, dtype=dtype)
        return cls(m, tok, config)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, drain: bool = False, timeout: float = 1.0) -> None:
        """Stop the engine: with drain, wait up to `timeout` for requests in flight first;
        then cancel what is left and join the threads (within about a second)."""
        if self._closed and self.core._stop.is_set():
            return
        self._closed = True
        if drain:
            end = time.monotonic() + timeout
            while time.monotonic() < end and self.core.busy():
                time.sleep(0.005)
        self.core.shutdown(timeout)
        if self._intake_pool is not None:
            self._intake_pool.shutdown(wait=False, cancel_futures=True)
        if self.tp is not None:  # graceful unless the loop thread is still inside a step
            self.tp.close(graceful=not self.core._thread.is_alive())
        if not self.core._thread.is_alive():  # a step still running may yet touch the pool
            self.runner.release()

    def _on_tp_failure(self, error: EngineError) -> None:
        """A tensor-parallel worker died (watchdog thread): no new requests; the ones in flight end with
        `error`; the engine closes."""
        self._closed = True
        self.core.fatal = error
        self.close(timeout=2.0)

    # ---- public API ------------------------------------------------------------------
    def submit(self, request: Request) -> RequestHandle:
        """Queue a request and return its handle at once. Problems with the request itself
        end the handle with a typed error (result() raises it); the engine goes on."""
        handle = RequestHandle(request.request_id, canceller=self._request_cancel)
        if not self.accepting():
            handle.fail(RequestOutput(request.request_id), EngineClosedError("engine is closed"))
            return handle
        seq_id = next(self._ids)
        try:
            seq = self.intake.prepare(seq_id, request, handle)
        except Exception as e:  # noqa: BLE001 - typed errors from intake; anything else wrapped
            handle.fail(RequestOutput(request.request_id), e if isinstance(e, (ValueError, EngineError))
                        else EngineError(f"{type(e).__name__}: {e}"))
            return handle
        handle.seq_id = seq_id
        if not self.core.add(seq):
            handle.fail(RequestOutput(request.request_id), EngineClosedError("engine is closed")
                        if not self.accepting() else
                        QueueFullError(f"request queue is full (max_queue_size={self.config.max_queue_size})"))
        return handle

    def accepting(self) -> bool:
        """Whether new requests can be served (not closed, no fatal tensor-parallel failure)."""
        return not self._closed and self.core.fatal is None

    def generate(self, prompt: Optional[str] = None, *, prompt_token_ids: Optional[Seq[int]] = None, images=None,
                 sampling: Optional[SamplingParams] = None, **kw) -> RequestOutput:
        """Blocking; raises the request's error if it failed."""
        return self.submit(Request(prompt=prompt, prompt_token_ids=prompt_token_ids, images=images,
                                   sampling=sampling or SamplingParams(), **kw)).result()

    def generate_batch(self, requests: Seq[Request]) -> list[RequestOutput]:
        """Submit all, wait for all; failures come back as outputs with `error` set."""
        handles = [self.submit(r) for r in requests]
        return [h.future.result() for h in handles]

    async def submit_async(self, request: Request) -> RequestHandle:
        """submit() for an event loop: the intake (image decoding, tiling, tokenizing) runs on the
        engine's intake threads, never on the loop. If the awaiting task is cancelled meanwhile, the
        request is cancelled as soon as it was queued."""
        if not self.accepting():  # fails at once, no intake thread needed
            return self.submit(request)
        if self._intake_pool is None:
            self._intake_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="unimlm-intake")
        try:
            fut = asyncio.get_running_loop().run_in_executor(self._intake_pool, self.submit, request)
        except RuntimeError:  # the pool was shut down by close() meanwhile
            return self.submit(request)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if fut.cancelled() and not self.accepting():  # close() dropped the queued intake: a typed error
                return self.submit(request)
            fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() else f.result().cancel())
            raise

    async def generate_async(self, prompt: Optional[str] = None, **kw) -> RequestOutput:
        """generate() for an event loop (intake off the loop, see submit_async)."""
        handle = await self.submit_async(Request(prompt=prompt, **kw))
        return await handle.aresult()

    def stats(self) -> dict:
        sch, core = self.scheduler, self.core
        times = list(core.iter_times)
        return {
            "queued": len(core.incoming) + sch.num_waiting, "running": sch.num_running,
            "active_requests": len(core.seqs) + len(core.incoming),
            "kv_blocks_total": self.memory["num_kv_blocks"], "kv_blocks_free": sch.num_free_blocks,
            "kv_blocks_cached": sch.num_cached_blocks, "preemptions": sch.num_preemptions,
            "decoder_queue_depths": {**self.router.depths(), **core.span_router.depths()},
            "decoder_mean_batch_size": self.router.mean_batch_size(),
            "decoder_mean_queue_delay_s": self.router.mean_queue_delay_s(),
            "decoder_backends": {r: b.kind for r, b in self.router.backends.items()},
            "steps": core.steps, "iteration_latency_s": (sum(times) / len(times)) if times else None,
            # CPU seconds: the loop thread (working iterations), of it the model's forward, the output thread
            "cpu_s": {"loop": core.loop_cpu_s, "model": self.runner.model_cpu_s, "output": core.output.cpu_s},
            "memory_bytes": dict(self.memory["bytes"]),
        }

    def _request_cancel(self, handle: RequestHandle) -> None:
        if handle.seq_id is not None:
            self.core.cancel(handle.seq_id)
