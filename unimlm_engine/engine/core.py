"""EngineCore: the loop thread. Admit, expire/cancel, schedule, run the model, collect super-link
payloads, sample, feed routing tokens' queries, hand finished text to the decoders.

Threads: callers put sequences in (`add`) and ask for cancels (any thread); the loop thread owns the
scheduler, the model runner and every Sequence until its text is done; decoder workers report through
`on_task` (any thread, under the lock). What the caller sees (text, stream events, the final output)
is the OutputProcessor's (output.py).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Optional

import torch

from .. import _C
from ..sampling import sample_token
from .output import OutputProcessor
from .routing import DecoderRouter
from .runner import ModelRunner
from .sequence import Sequence
from .superlink import SuperLinks
from .types import EngineError, PromptTooLongError, QueueFullError, TaskResult

log = logging.getLogger("unimlm_engine")


class EngineCore:
    def __init__(self, model, scheduler, runner: ModelRunner, superlinks: SuperLinks, intake, cfg,
                 output: OutputProcessor):
        self.model, self.scheduler, self.runner, self.superlinks = model, scheduler, runner, superlinks
        self.intake, self.cfg, self.output = intake, cfg, output
        self.router = DecoderRouter(model, cfg, self.on_task)
        self.eos = model.cfg.llm.eos_token_id
        self.queue = _C.RequestQueue(cfg.max_queue_size)
        self.lock = threading.Lock()
        self.incoming: dict[int, Sequence] = {}
        self.seqs: dict[int, Sequence] = {}
        self._cancels: collections.deque[int] = collections.deque()
        self._stop = threading.Event()
        self.iter_times: collections.deque[float] = collections.deque(maxlen=256)
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="unimlm-engine-loop", daemon=True)
        self._thread.start()

    # ---- called from other threads -----------------------------------------------------------------
    def add(self, seq: Sequence) -> bool:
        """Queue a prepared sequence; False when the request queue is full."""
        with self.lock:
            self.incoming[seq.seq_id] = seq
        if self.queue.try_push(seq.seq_id):
            return True
        with self.lock:
            self.incoming.pop(seq.seq_id, None)
        return False

    def cancel(self, seq_id: int) -> None:
        self._cancels.append(seq_id)

    def shutdown(self, timeout: float) -> None:
        """Stop the loop, then end every request left as cancelled and stop the decoder workers."""
        self._stop.set()
        self.queue.close()
        self._thread.join(timeout=timeout)
        with self.lock:
            left = list(self.incoming.values()) + list(self.seqs.values())
        for s in left:
            self.end(s, "cancelled")
        self.router.close(timeout=timeout)

    def busy(self) -> bool:
        return bool(self.seqs or self.incoming)

    def on_task(self, s: Sequence, idx: int, task: TaskResult) -> None:
        """Decoder worker callback (any thread)."""
        if self.output.on_task(s, idx, task):
            self.end(s, s.finish_reason or "stop")

    # ---- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self._step()
            except Exception as e:  # noqa: BLE001 - an internal failure ends the batch, not the engine
                log.exception("engine step failed")
                self._fail_running(EngineError(f"engine step failed: {type(e).__name__}: {e}"))
                worked = True
            if not worked:
                seq_id = self.queue.pop(self.cfg.idle_wait_s)
                if seq_id is not None:
                    self._admit_one(seq_id)

    def _admit_one(self, seq_id: int) -> None:
        with self.lock:
            seq = self.incoming.pop(seq_id, None)
            if seq is None:
                return
            self.seqs[seq_id] = seq
        try:
            self.scheduler.add_request(seq_id, seq.tokens, seq.request.priority, self.intake.extra_keys(seq))
        except _C.QueueFullError as e:
            self.end(seq, "error", QueueFullError(str(e)))
        except ValueError as e:
            self.end(seq, "error", PromptTooLongError(str(e)))

    def _expire_and_cancel(self) -> None:
        while (seq_id := self.queue.pop(0.0)) is not None:
            self._admit_one(seq_id)
        while self._cancels:
            seq_id = self._cancels.popleft()
            seq = self.seqs.get(seq_id) or self.incoming.get(seq_id)
            if seq is not None:
                self.end(seq, "cancelled")
        now = time.monotonic()
        with self.lock:
            late = [s for s in self.seqs.values() if s.deadline is not None and now >= s.deadline]
        for s in late:
            self.end(s, "timeout")

    def _step(self) -> bool:
        self._expire_and_cancel()
        t0 = time.perf_counter()
        out = self.scheduler.step()
        for seq_id in out.rejected:
            if (s := self.seqs.get(seq_id)) is not None:
                self.end_text(s, "length", in_scheduler=False)
        if len(out) == 0:
            return False
        seqs = [self.seqs[i] for i in out.seq_ids.tolist()]
        now = time.monotonic()
        for s in seqs:
            if s.first_scheduled is None:
                s.first_scheduled = now
                s.num_cached_tokens = self.scheduler.num_cached_tokens(s.seq_id)
        if out.cow:
            self.runner.copy_blocks(out.cow)
        hidden, last_rows = self.runner.execute(out, seqs)
        self.superlinks.collect(seqs, out.num_computed.tolist(), out.num_new_tokens.tolist(),
                                out.query_start_loc.tolist(), hidden)
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
                self.end_text(s, s.finish_after_payload)
                continue
            self._on_token(s, sample_token(lg, s.request.sampling, s.generator, step=len(s.generated)))
        self.steps += 1
        self.iter_times.append(time.perf_counter() - t0)
        return True

    def _on_token(self, s: Sequence, tok: int) -> None:
        params = s.request.sampling
        s.generated.append(tok)
        stop = self.output.on_token(s, tok)
        stop = stop or (tok == self.eos and not params.ignore_eos) or tok in params.stop_token_ids
        at_length = len(s.generated) >= params.max_tokens
        feed = None if stop else self.superlinks.on_token(s, tok)
        if feed is not None:  # a routing token: its K queries are fed next step, even at max_tokens
            s.tokens += feed
            self.scheduler.update(s.seq_id, feed)
            if at_length:
                s.finish_after_payload = "length"
            return
        if stop or at_length:
            self.end_text(s, "stop" if stop else "length")
            return
        s.tokens.append(tok)
        self.scheduler.update(s.seq_id, [tok])

    # ---- endings -----------------------------------------------------------------------------------
    def end_text(self, s: Sequence, reason: str, in_scheduler: bool = True) -> None:
        """Text is done: free the KV blocks, flush the text, then hand the payloads to the decoders."""
        if in_scheduler:
            self.scheduler.abort(s.seq_id)
        s.text_done, s.finish_reason = True, reason
        self.output.finish_text(s)
        jobs = self.router.plan(s)
        with self.lock:
            s.decoders_pending = len(jobs)
        if not jobs:
            self.end(s, reason)
            return
        for idx, spec in jobs:
            self.router.submit(s, idx, spec)

    def end(self, s: Sequence, reason: str, error: Optional[BaseException] = None) -> None:
        """End a request exactly once: remove it everywhere and finish its handle."""
        with self.lock:
            self.incoming.pop(s.seq_id, None)
            known = self.seqs.pop(s.seq_id, None) is not None
        if known and not s.text_done:
            self.scheduler.abort(s.seq_id)
        if not s.text_done:
            s.text_done = True
            self.output.finish_text(s)
        if reason in ("cancelled", "timeout"):
            self.router.cancel(s)
        self.output.complete(s, reason, error)

    def _fail_running(self, error: EngineError) -> None:
        with self.lock:
            victims = [s for s in self.seqs.values() if not s.text_done]
        for s in victims:
            self.end(s, "error", error)
