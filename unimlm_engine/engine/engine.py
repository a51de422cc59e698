"""Engine: thread-safe submission, one background loop driving the C++ scheduler over the
paged KV cache, super-link routing to decoder workers, and result assembly.

Threads: callers (submit / cancel, any number), the engine loop (owns the scheduler, the
model runner and every Sequence until its text is done), one worker per decoder (owns a
Sequence only through `_on_task`, under `_lock`). Every handle ends exactly once.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from typing import Optional, Sequence as Seq

import torch

from .. import _C
from ..config import EngineConfig
from ..model.superlink import RoutedPayload
from ..sampling import SamplingParams, sample_token
from .handle import RequestHandle
from .intake import Intake
from .memory import plan_kv_blocks
from .routing import DecoderRouter
from .runner import ModelRunner
from .sequence import PendingPayload, Sequence, query_marker
from .types import (EngineClosedError, EngineError, PromptTooLongError, QueueFullError, Request, RequestOutput,
                    StreamEvent, TaskResult)

log = logging.getLogger("unimlm_engine")


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
        self.runner = ModelRunner(model, self.memory["num_kv_blocks"], cfg.block_size,
                                  cuda_graphs=cfg.cuda_graphs, cuda_graph_batch_sizes=cfg.cuda_graph_batch_sizes,
                                  cuda_graph_max_context=cfg.cuda_graph_max_context)
        self.intake = Intake(model, tokenizer, cfg, self.max_model_len)
        self.router = DecoderRouter(model, cfg, self._on_task)
        self._queue = _C.RequestQueue(cfg.max_queue_size)
        self._lock = threading.Lock()
        self._incoming: dict[int, Sequence] = {}
        self._seqs: dict[int, Sequence] = {}
        self._cancels: collections.deque[int] = collections.deque()
        self._ids = itertools.count(1)
        self._closed = False
        self._stop = threading.Event()
        self._iter_times: collections.deque[float] = collections.deque(maxlen=256)
        self._steps = 0
        self._thread = threading.Thread(target=self._loop, name="unimlm-engine-loop", daemon=True)
        self._thread.start()

    # ---- construction / shutdown -----------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str, device=None, dtype: Optional[torch.dtype] = None,
                        config: Optional[EngineConfig] = None) -> "Engine":
        from ..pretrained import load_pretrained

        m, tok = load_pretrained(model, device=device, dtype=dtype)
        return cls(m, tok, config)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, drain: bool = False, timeout: float = 1.0) -> None:
        """Stop the engine: with drain, wait up to `timeout` for requests in flight first;
        then cancel what is left and join the threads (within about a second)."""
        if self._closed and self._stop.is_set():
            return
        self._closed = True
        if drain:
            end = time.monotonic() + timeout
            while time.monotonic() < end and (self._seqs or self._incoming):
                time.sleep(0.005)
        self._stop.set()
        self._queue.close()
        self._thread.join(timeout=timeout)
        with self._lock:
            left = list(self._incoming.values()) + list(self._seqs.values())
        for s in left:
            self._end(s, "cancelled")
        self.router.close(timeout=timeout)

    # ---- public API ------------------------------------------------------------------
    def submit(self, request: Request) -> RequestHandle:
        """Queue a request and return its handle at once. Problems with the request itself
        end the handle with a typed error (result() raises it); the engine goes on."""
        handle = RequestHandle(request.request_id, canceller=self._request_cancel)
        if self._closed:
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
        with self._lock:
            self._incoming[seq_id] = seq
        if not self._queue.try_push(seq_id):
            with self._lock:
                self._incoming.pop(seq_id, None)
            handle.fail(RequestOutput(request.request_id),
                        QueueFullError(f"request queue is full (max_queue_size={self.config.max_queue_size})"))
        return handle

    def generate(self, prompt: Optional[str] = None, *, prompt_token_ids: Optional[Seq[int]] = None, images=None,
                 sampling: Optional[SamplingParams] = None, **kw) -> RequestOutput:
        """Blocking; raises the request's error if it failed."""
        return self.submit(Request(prompt=prompt, prompt_token_ids=prompt_token_ids, images=images,
                                   sampling=sampling or SamplingParams(), **kw)).result()

    def generate_batch(self, requests: Seq[Request]) -> list[RequestOutput]:
        """Submit all, wait for all; failures come back as outputs with `error` set."""
        handles = [self.submit(r) for r in requests]
        return [h.future.result() for h in handles]

    async def generate_async(self, prompt: Optional[str] = None, **kw) -> RequestOutput:
        handle = self.submit(Request(prompt=prompt, **kw))
        out: RequestOutput = await asyncio.wrap_future(handle.future)
        if out.finish_reason == "error" and out.error is not None:
            raise out.error
        return out

    def stats(self) -> dict:
        sch = self.scheduler
        times = list(self._iter_times)
        return {
            "queued": len(self._incoming) + sch.num_waiting, "running": sch.num_running,
            "active_requests": len(self._seqs) + len(self._incoming),
            "kv_blocks_total": self.memory["num_kv_blocks"], "kv_blocks_free": sch.num_free_blocks,
            "kv_blocks_cached": sch.num_cached_blocks, "preemptions": sch.num_preemptions,
            "decoder_queue_depths": self.router.depths(), "decoder_mean_batch_size": self.router.mean_batch_size(),
            "steps": self._steps, "iteration_latency_s": (sum(times) / len(times)) if times else None,
            "memory_bytes": dict(self.memory["bytes"]),
        }

    # ---- the loop --------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self._step()
            except Exception as e:  # noqa: BLE001 - an internal failure ends the batch, not the engine
                log.exception("engine step failed")
                self._fail_running(EngineError(f"engine step failed: {type(e).__name__}: {e}"))
                worked = True
            if not worked:
                seq_id = self._queue.pop(self.config.idle_wait_s)
                if seq_id is not None:
                    self._admit_one(seq_id)

    def _admit_one(self, seq_id: int) -> None:
        with self._lock:
            seq = self._incoming.pop(seq_id, None)
            if seq is None:
                return
            self._seqs[seq_id] = seq
        try:
            self.scheduler.add_request(seq_id, seq.tokens, seq.request.priority, self.intake.extra_keys(seq))
        except _C.QueueFullError as e:
            self._end(seq, "error", QueueFullError(str(e)))
        except ValueError as e:
            self._end(seq, "error", PromptTooLongError(str(e)))

    def _admit(self) -> None:
        while (seq_id := self._queue.pop(0.0)) is not None:
            self._admit_one(seq_id)

    def _expire_and_cancel(self) -> None:
        while self._cancels:
            seq_id = self._cancels.popleft()
            seq = self._seqs.get(seq_id) or self._incoming.get(seq_id)
            if seq is not None:
                self._end(seq, "cancelled")
        now = time.monotonic()
        with self._lock:
            late = [s for s in self._seqs.values() if s.deadline is not None and now >= s.deadline]
        for s in late:
            self._end(s, "timeout")

    def _step(self) -> bool:
        self._admit()
        self._expire_and_cancel()
        t0 = time.perf_counter()
        out = self.scheduler.step()
        for seq_id in out.rejected:
            if (s := self._seqs.get(seq_id)) is not None:
                self._end_text(s, "length", in_scheduler=False)
        if len(out) == 0:
            return False
        seqs = [self._seqs[i] for i in out.seq_ids.tolist()]
        now = time.monotonic()
        for s in seqs:
            if s.first_scheduled is None:
                s.first_scheduled = now
                s.num_cached_tokens = self.scheduler.num_cached_tokens(s.seq_id)
        if out.cow:
            self.runner.copy_blocks(out.cow)
        hidden, last_rows = self.runner.execute(out, seqs)
        self._collect_payloads(out, seqs, hidden)
        do_sample = out.do_sample
        rows = last_rows[torch.from_numpy(do_sample)]
        logits = self.runner.logits(hidden[rows.to(hidden.device)]) if rows.numel() else None
        j = 0
        for s, sample in zip(seqs, do_sample.tolist()):
            if not sample:
                self.scheduler.update(s.seq_id, [])
                continue
            lg, j = logits[j], j + 1
            if s.finish_after_payload:
                self._end_text(s, s.finish_after_payload)
                continue
            self._on_token(s, sample_token(lg, s.request.sampling, s.generator, step=len(s.generated)))
        self._steps += 1
        self._iter_times.append(time.perf_counter() - t0)
        return True

    def _collect_payloads(self, out, seqs: list[Sequence], hidden: torch.Tensor) -> None:
        starts, counts, qsl = out.num_computed.tolist(), out.num_new_tokens.tolist(), out.query_start_loc.tolist()
        for i, s in enumerate(seqs):
            if not s.pending:
                continue
            a, b = starts[i], starts[i] + counts[i]
            for p in list(s.pending):
                lo, hi = max(a, p.start), min(b, p.start + p.rows.shape[0])
                for pos in range(lo, hi):
                    p.rows[pos - p.start] = hidden[qsl[i] + pos - a]
                    p.filled.add(pos)
                if p.complete:
                    s.pending.remove(p)
                    s.payloads.append(RoutedPayload(p.route, p.token_index, p.rows))

    def _on_token(self, s: Sequence, tok: int) -> None:
        now = time.monotonic()
        s.first_token = s.first_token or now
        s.last_token = now
        s.generated.append(tok)
        delta = s.detok.step(s.generated)
        params = s.request.sampling
        stop = (tok == self.model.cfg.llm.eos_token_id and not params.ignore_eos) or tok in params.stop_token_ids
        if delta:
            s.text += delta
            for stop_str in params.stop:
                cut = s.text.find(stop_str, max(0, len(s.text) - len(delta) - len(stop_str)))
                if cut >= 0:
                    delta = delta[: max(0, len(delta) - (len(s.text) - cut))]
                    s.text, stop, s.stop_string_hit = s.text[:cut], True, True
                    break
        s.handle.emit(StreamEvent(text=delta, token_ids=[tok]))
        at_length = len(s.generated) >= params.max_tokens
        route = self.model.route_ids.get(tok)
        if route is not None and not stop:
            k = self.model.cfg.superlink.num_queries(route)
            markers = [query_marker(route, i) for i in range(k)]
            s.pending.append(PendingPayload(route, len(s.generated) - 1, len(s.tokens) + 1,
                                            torch.empty(k, self.model.cfg.llm.hidden_size, dtype=self.model.dtype,
                                                        device=self.model.device)))
            s.tokens += [tok] + markers
            self.scheduler.update(s.seq_id, [tok] + markers)
            if at_length:
                s.finish_after_payload = "length"
            return
        if stop or at_length:
            self._end_text(s, "stop" if stop else "length")
            return
        s.tokens.append(tok)
        self.scheduler.update(s.seq_id, [tok])

    # ---- endings -----------------------------------------------------------------------
    def _end_text(self, s: Sequence, reason: str, in_scheduler: bool = True) -> None:
        """Text is done: free the KV blocks, then hand the payloads to the decoders."""
        if in_scheduler:
            self.scheduler.abort(s.seq_id)
        s.text_done, s.finish_reason = True, reason
        if not s.stop_string_hit:
            s.text += s.detok.flush()  # characters held back at the end of the stream
        jobs = self.router.plan(s)
        with self._lock:
            s.decoders_pending = len(jobs)
        if not jobs:
            self._end(s, reason)
            return
        for idx, route in jobs:
            self.router.submit(s, idx, route)

    def _on_task(self, s: Sequence, idx: int, task: TaskResult) -> None:
        """Decoder worker callback (any thread)."""
        with self._lock:
            s.tasks[idx] = task
            s.decoders_pending -= 1
            done = s.decoders_pending == 0
        s.handle.emit(StreamEvent(task=task))
        if done:
            self._end(s, s.finish_reason or "stop")

    def _request_cancel(self, handle: RequestHandle) -> None:
        if handle.seq_id is not None:
            self._cancels.append(handle.seq_id)

    def _end(self, s: Sequence, reason: str, error: Optional[BaseException] = None) -> None:
        """End a request exactly once: remove it everywhere and finish its handle."""
        with self._lock:
            self._incoming.pop(s.seq_id, None)
            known = self._seqs.pop(s.seq_id, None) is not None
        if known and not s.text_done:
            self.scheduler.abort(s.seq_id)
        if reason in ("cancelled", "timeout"):
            self.router.cancel(s)
        out = self._output(s, reason)
        if error is not None:
            s.handle.fail(out, error)
        else:
            s.handle.finish(out)

    def _fail_running(self, error: EngineError) -> None:
        with self._lock:
            victims = [s for s in self._seqs.values() if not s.text_done]
        for s in victims:
            self._end(s, "error", error)

    def _output(self, s: Sequence, reason: str) -> RequestOutput:
        n = len(s.generated)
        tpot = (s.last_token - s.first_token) / (n - 1) if n > 1 and s.first_token else None
        return RequestOutput(
            request_id=s.request.request_id, text=s.text, token_ids=list(s.generated),
            tasks=[t for t in s.tasks if t is not None], payloads=list(s.payloads), finish_reason=reason, prompt_len=s.prompt_len,
            num_cached_tokens=s.num_cached_tokens,
            queue_time_s=(s.first_scheduled - s.arrival) if s.first_scheduled else 0.0,
            time_to_first_token_s=(s.first_token - s.arrival) if s.first_token else None,
            time_per_output_token_s=tpot, e2e_time_s=time.monotonic() - s.arrival)

