"""Output processing: token ids -> text deltas, stop strings, stream events, task results, the final output.

The engine core (core.py) decides what to compute; this module decides what the caller sees, the way
vLLM v1 separates its engine core from output processing. Guarantees:

- The text deltas a handle streams concatenate to exactly `RequestOutput.text`. With stop strings, the
  last `max(len(stop)) - 1` characters are held back until they cannot start a stop string, so text
  that a stop string later cuts is never streamed; the held-back text and whatever the detokenizer
  holds at the end (an unfinished multi-byte character) go out as one last delta before the end.
- Every handle ends exactly once (`complete`), with the tasks collected so far.
"""
from __future__ import annotations

import threading
import time
from typing import Optional

from ..routes import get_route
from .sequence import Sequence
from .types import RequestOutput, StreamEvent, TaskResult


class OutputProcessor:
    def __init__(self):
        self._lock = threading.Lock()

    # ---- text -------------------------------------------------------------------------------------
    def on_token(self, s: Sequence, tok: int) -> bool:
        """A generated token (already appended to `s.generated`): detokenize, look for stop strings, stream
        what is safe. Returns True when a stop string ended the text (the text is cut before it)."""
        now = time.monotonic()
        s.first_token = s.first_token or now
        s.last_token = now
        delta = s.detok.step(s.generated)
        hit = False
        if delta:
            s.text += delta
            hit = self._cut_stop_string(s, len(delta))
        self._stream(s, [tok], final=hit)
        return hit

    def finish_text(self, s: Sequence) -> None:
        """The text is done (stop, length, cancel...): flush what the detokenizer and the stop-string
        hold-back kept, as one last delta."""
        if not s.stop_string_hit:
            tail = s.detok.flush()
            if tail:
                s.text += tail
                self._cut_stop_string(s, len(tail))
        self._stream(s, [], final=True)

    @staticmethod
    def _cut_stop_string(s: Sequence, new: int) -> bool:
        """Look for a stop string overlapping the last `new` characters; cut the text before it."""
        for stop in s.request.sampling.stop:
            cut = s.text.find(stop, max(0, len(s.text) - new - len(stop) + 1))
            if cut >= 0:
                s.text, s.stop_string_hit = s.text[:cut], True
                return True
        return False

    @staticmethod
    def _stream(s: Sequence, token_ids: list[int], final: bool) -> None:
        """Emit the text that is safe to show (all of it when final) with these token ids."""
        end = len(s.text)
        if not final and s.request.sampling.stop:
            end = max(s.emitted, end - max(len(x) for x in s.request.sampling.stop) + 1)
        if end > s.emitted or token_ids:
            s.handle.emit(StreamEvent(text=s.text[s.emitted:end], token_ids=token_ids))
            s.emitted = end

    # ---- tasks and the end ------------------------------------------------------------------------
    def on_task(self, s: Sequence, idx: int, task: TaskResult) -> bool:
        """A decoder result for task `idx` (any thread); True when it was the request's last one."""
        with self._lock:
            s.tasks[idx] = task
            s.decoders_pending -= 1
            done = s.decoders_pending == 0
        s.handle.emit(StreamEvent(task=task))
        return done

    def complete(self, s: Sequence, reason: str, error: Optional[BaseException] = None) -> None:
        """End the handle with the assembled output (a second call does nothing)."""
        out = self.output(s, reason)
        if error is not None:
            s.handle.fail(out, error)
        else:
            s.handle.finish(out)

    @staticmethod
    def output(s: Sequence, reason: str) -> RequestOutput:
        n = len(s.generated)
        tpot = (s.last_token - s.first_token) / (n - 1) if n > 1 and s.first_token else None
        return RequestOutput(
            request_id=s.request.request_id, text=s.text, token_ids=list(s.generated),
            tasks=[t for t in s.tasks if t is not None], payloads=list(s.payloads), finish_reason=reason,
            prompt_len=s.prompt_len, num_cached_tokens=s.num_cached_tokens,
            queue_time_s=(s.first_scheduled - s.arrival) if s.first_scheduled else 0.0,
            time_to_first_token_s=(s.first_token - s.arrival) if s.first_token else None,
            time_per_output_token_s=tpot, e2e_time_s=time.monotonic() - s.arrival)


def to_task_result(route: str, num_groups: int, res, backend: str) -> TaskResult:
    """A decoder's result object -> the engine's TaskResult (fields by the route's result kind)."""
    t = TaskResult(route=route, num_groups=num_groups, raw=res, backend=backend, kind=get_route(route).result)
    for name in ("boxes", "scores", "labels", "masks", "keypoints", "images"):
        if hasattr(res, name):
            setattr(t, name, getattr(res, name))
    return t
