"""RequestHandle: what `Engine.submit` returns. Ends exactly once (done, cancelled,
timed out, or failed); `result()`, `stream()` and `await` all observe that one end."""
from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Callable, Iterator, Optional

from .types import EngineError, RequestOutput, StreamEvent


class RequestHandle:
    def __init__(self, request_id: str, canceller: Optional[Callable[["RequestHandle"], None]] = None):
        self.request_id = request_id
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._events: "queue.SimpleQueue[StreamEvent]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._canceller = canceller
        self._ended = False  # a plain flag: emit() is on the hot path (one call per token)
        self.seq_id: Optional[int] = None

    # ---- user side -------------------------------------------------------------
    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: Optional[float] = None) -> RequestOutput:
        """Blocks for the output. Raises the request's error when it failed (finish_reason
        "error"); a cancelled or timed-out request returns its partial output."""
        out: RequestOutput = self.future.result(timeout)
        if out.finish_reason == "error" and out.error is not None:
            raise out.error
        return out

    def cancel(self) -> bool:
        """Asks the engine to cancel; False when the request had already ended."""
        if self.done() or self._canceller is None:
            return False
        self._canceller(self)
        return True

    def stream(self, timeout: Optional[float] = None) -> Iterator[StreamEvent]:
        """Yields text deltas and task results as they come; the last event has finished=True.
        `timeout` bounds the wait for each event (queue.Empty past it)."""
        while True:
            ev = self._events.get(timeout=timeout)
            yield ev
            if ev.finished:
                return

    # ---- engine side ------------------------------------------------------------
    def emit(self, event: StreamEvent) -> None:
        if not self._ended:
            self._events.put(event)

    def finish(self, output: RequestOutput) -> bool:
        """Ends the handle; returns False (and does nothing) if it had already ended."""
        with self._lock:
            if self.future.done():
                return False
            self._ended = True
            self._events.put(StreamEvent(finished=True, output=output))
            self.future.set_result(output)
            return True

    def fail(self, output: RequestOutput, error: BaseException) -> bool:
        output.error = error if isinstance(error, BaseException) else EngineError(str(error))
        output.finish_reason = "error"
        return self.finish(output)
