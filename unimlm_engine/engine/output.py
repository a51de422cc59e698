"""Output processing (on its own thread: EngineConfig.output_thread): token ids -> text deltas, stop
strings, stream events, task results, the final output. The engine core (core.py) decides what to
compute; this decides what the caller sees, the way vLLM v1 separates its engine core from output
processing.

The core hands over, in order: each step's new tokens (`tokens`), a request's end of text (`text_done`),
decoder results (`task`) and a request's end (`end`). One queue and one thread (or, inline, one lock),
so a request's events keep their order. Guarantees:

- The text deltas a handle streams concatenate to exactly `RequestOutput.text`. With stop strings the
  last `max(len(stop)) - 1` characters are held back until they cannot start a stop string; what the
  hold-back and the detokenizer keep at the end goes out as one last delta.
- A stop string is found here, a step or two after its token was sampled: the thread cuts the text, asks
  the core to stop the request (`on_stop`), and when the text is done drops what was generated after the
  cut (tokens, and payloads of routing tokens past it) before the decoders are planned (`on_text_done`).
- Every handle ends exactly once (`end`).
- With span routes (`span_tasks`), the text a handle streams is also parsed for task / grounding spans
  (spans.py) as it goes out; each completed group goes to `on_spans` at once (the engine dispatches it
  while the text goes on), the rest when the text is final.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Optional

from ..routes import find_route
from .sequence import Sequence
from .types import EngineError, RequestOutput, StreamEvent, TaskResult

log = logging.getLogger("unimlm_engine")
_STOP = object()


class OutputProcessor:
    """threaded: run the handlers on the output thread (in order, one queue). Else run them in the calling
    thread under one re-entrant lock, which serialises them the same way: on a CPU there is no device work
    for the thread to overlap, the GIL serialises the two threads anyway, and the hand-off per step costs
    more than it saves (measured: tiny preset, one request, 1.75 vs 1.84-2.03 ms per token)."""

    def __init__(self, on_stop: Callable[[Sequence], None], on_text_done: Callable[[Sequence], None],
                 threaded: bool = True, span_tasks: tuple[str, ...] = (),
                 on_spans: Optional[Callable[[Sequence, list, bool], None]] = None):
        self.on_stop, self.on_text_done = on_stop, on_text_done
        self.threaded = threaded
        self.span_tasks, self.on_spans = tuple(span_tasks), on_spans  # on_spans(seq, groups, dispatch)
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._inline = threading.RLock()
        self.cpu_s = 0.0  # CPU seconds the output thread spent processing (not waiting); 0 when inline
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="unimlm-output", daemon=True)
            self._thread.start()

    # ---- producers (any thread; cheap) -------------------------------------------------------------
    def _submit(self, *item) -> None:
        if self.threaded:
            self._q.put(item)
            return
        with self._inline:
            self._call(item)

    def tokens(self, items: list[tuple[Sequence, int]]) -> None:
        """One step's new tokens, already appended to each sequence's `generated`."""
        if items:
            self._submit(self._tokens, items)

    def text_done(self, s: Sequence) -> None:
        self._submit(self._text_done, s)

    def task(self, s: Sequence, idx: int, task: TaskResult) -> None:
        self._submit(self._task, s, idx, task)

    def end(self, s: Sequence, reason: str, error: Optional[BaseException] = None) -> None:
        self._submit(self._end, s, reason, error)

    def close(self, timeout: float = 1.0) -> None:
        """Process what is queued, then stop the thread."""
        if self._thread is not None:
            self._q.put((_STOP,))
            self._thread.join(timeout)

    @staticmethod
    def _call(item) -> None:
        try:
            item[0](*item[1:])
        except Exception:  # noqa: BLE001 - one request's output problem must not stop the engine
            log.exception("output processing failed")

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item[0] is _STOP:
                return
            c0 = time.thread_time()
            self._call(item)
            self.cpu_s += time.thread_time() - c0

    # ---- the thread ---------------------------------------------------------------------------------
    def _tokens(self, items: list[tuple[Sequence, int]]) -> None:
        spans = bool(self.span_tasks)
        for s, tok in items:
            if s.stop_string_hit or s.text_finalized or s.output_error is not None:
                continue  # generated after the cut: dropped when the text is done
            try:
                delta = s.detok.step_one(tok)
                if not s.request.sampling.stop:  # the common case, kept short
                    if delta:
                        s.text_parts.append(delta)
                    s.handle.emit_text(delta, (tok,))
                elif self._with_stops(s, delta, (tok,), final=False):
                    self.on_stop(s)
                if spans and len(s.text_parts) > s.span_fed:
                    self._feed_spans(s, final=False)
            except Exception as e:  # noqa: BLE001 - this request ends in error; its batch mates go on
                log.exception("output processing failed for request %s", s.request.request_id)
                s.output_error = EngineError(f"output processing failed at token {tok}: {type(e).__name__}: {e}")
                self.on_stop(s)

    def _feed_spans(self, s: Sequence, final: bool, dispatch: bool = True) -> None:
        """Parse the text streamed since the last call; hand completed span groups to on_spans."""
        if s.span_parser is None:
            from .spans import SpanParser

            s.span_parser = SpanParser(self.span_tasks)
        groups = []
        for part in s.text_parts[s.span_fed:]:
            groups += s.span_parser.feed(part)
        s.span_fed = len(s.text_parts)
        if final:
            groups += s.span_parser.finish()
        if groups:
            self.on_spans(s, groups, dispatch)

    def _text_done(self, s: Sequence) -> None:
        self._finalize_text(s)
        self.on_text_done(s)

    def _task(self, s: Sequence, idx: int, task: TaskResult) -> None:
        s.handle.emit(StreamEvent(task=task))

    def _end(self, s: Sequence, reason: str, error: Optional[BaseException]) -> None:
        if s.output_error is not None and error is None:
            reason, error = "error", s.output_error
        self._finalize_text(s, dispatch=False)
        out = self.output(s, "stop" if s.stop_string_hit and reason == "length" else reason)
        if error is not None:
            s.handle.fail(out, error)
        else:
            s.handle.finish(out)

    def _finalize_text(self, s: Sequence, dispatch: bool = True) -> None:
        """Flush the detokenizer and the hold-back; apply a stop-string cut to tokens and payloads; end the
        span parse (dispatch=False: the request is ending, so its last span groups are not run)."""
        if s.text_finalized:
            return
        s.text_finalized = True
        if not s.stop_string_hit and s.output_error is None:  # a failed detokenizer is not flushed
            tail = s.detok.flush()
            if not s.request.sampling.stop:
                if tail:
                    s.text_parts.append(tail)
                    s.handle.emit_text(tail, ())
            else:
                self._with_stops(s, tail, (), final=True)
        if s.stop_cut is not None:
            cut = s.stop_cut
            del s.generated[cut + 1:]
            s.payloads = [p for p in s.payloads if p.source == "prompt" or p.token_index <= cut]
            s.pending = [p for p in s.pending if p.source == "prompt" or p.token_index <= cut]
            if s.finish_reason in ("length", None):
                s.finish_reason = "stop"
        if self.span_tasks:
            self._feed_spans(s, final=True, dispatch=dispatch)

    @staticmethod
    def _with_stops(s: Sequence, delta: str, token_ids: tuple[int, ...], final: bool) -> bool:
        """A request with stop strings: new text `delta`. Streams what cannot start a stop string (all of it
        when final) and holds back the rest; at a stop string, cuts the text before it. -> True at a hit."""
        stops = s.request.sampling.stop
        pending = s.held + delta
        hits = [j for j in (pending.find(x) for x in stops) if j >= 0]
        if hits:
            out, s.held, s.stop_string_hit = pending[:min(hits)], "", True
            s.stop_cut = len(s.detok.ids) - 1
        elif final:
            out, s.held = pending, ""
        else:
            keep = max(len(pending) - max(len(x) for x in stops) + 1, 0)  # a stop string starts after `keep`
            out, s.held = pending[:keep], pending[keep:]
        if out:
            s.text_parts.append(out)
        if out or token_ids:
            s.handle.emit_text(out, token_ids)
        return bool(hits)

    @staticmethod
    def output(s: Sequence, reason: str) -> RequestOutput:
        n = len(s.generated)
        tpot = (s.last_token - s.first_token) / (n - 1) if n > 1 and s.first_token else None
        return RequestOutput(
            request_id=s.request.request_id, text=s.text, token_ids=list(s.generated),
            tasks=[t for t in s.tasks if t is not None], payloads=list(s.payloads), finish_reason=reason,
            spans=[t for t in s.spans if t is not None],
            prompt_len=s.prompt_len, num_cached_tokens=s.num_cached_tokens,
            queue_time_s=(s.first_scheduled - s.arrival) if s.first_scheduled else 0.0,
            time_to_first_token_s=(s.first_token - s.arrival) if s.first_token else None,
            time_per_output_token_s=tpot, e2e_time_s=time.monotonic() - s.arrival)


def to_task_result(route: str, num_groups: int, res, backend: str) -> TaskResult:
    """A decoder's result object -> the engine's TaskResult (fields by the route's result kind)."""
    t = TaskResult(route=route, num_groups=num_groups, raw=res, backend=backend, kind=find_route(route).result)
    for name in ("boxes", "scores", "labels", "masks", "keypoints", "images", "phrases"):
        if hasattr(res, name):
            setattr(t, name, getattr(res, name))
    return t
