"""RequestHandle: what `Engine.submit` returns. Ends exactly once (done, cancelled,
timed out, or failed); `result()`, `stream()` and `await` all observe that one end.

Events are built lazily: until someone calls `stream()`, text deltas are kept as plain strings
and ids (the output thread emits one per token: most callers of `generate` never stream), and
the first `stream()` call delivers them as one merged delta, then the task events and the end in
their order. The deltas a stream yields still concatenate to the output's text and token ids.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from typing import AsyncIterator, Callable, Iterator, Optional, Sequence

from .types import EngineError, RequestOutput, StreamEvent


class RequestHandle:
    def __init__(self, request_id: str, canceller: Optional[Callable[["RequestHandle"], None]] = None):
        self.request_id = request_id
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._events: "queue.SimpleQueue[StreamEvent]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._canceller = canceller
        self._ended = False
        self._streaming = False  # set once, under the lock, after the backlog went into _events
        self._text: list[str] = []  # backlog while nobody streams: text deltas and their ids,
        self._ids: list[int] = []  # then the other events in order (all text precedes them)
        self._backlog: list[StreamEvent] = []
        self._notify: Optional[Callable[[], None]] = None  # astream(): wakes its event loop after a put
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

    async def aresult(self) -> RequestOutput:
        """The output, awaited on the running event loop (result() without blocking a thread; a failed
        request raises its error). If the awaiting task is cancelled, the request is cancelled too."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def deliver(f: concurrent.futures.Future) -> None:
            def set_result() -> None:
                if not fut.done():
                    fut.set_result(f.result())
            try:
                loop.call_soon_threadsafe(set_result)
            except RuntimeError:  # the loop is closed
                pass

        self.future.add_done_callback(deliver)  # not asyncio.wrap_future: cancelling that cancels self.future
        try:
            out: RequestOutput = await fut
        except asyncio.CancelledError:
            self.cancel()
            raise
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
        self._start_streaming()
        while True:
            ev = self._events.get(timeout=timeout)
            yield ev
            if ev.finished:
                return

    async def astream(self) -> AsyncIterator[StreamEvent]:
        """The async twin of stream(): the same events, awaited on the running event loop (no thread
        blocks; the engine wakes the loop with call_soon_threadsafe after each event). Leaving the
        iteration before the end (break, aclose, a cancelled task: a client that went away) cancels
        the request, so its KV blocks are freed."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def notify() -> None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop is closed: nobody listens any more
                pass

        self._notify = notify
        self._start_streaming()
        finished = False
        try:
            while True:
                try:
                    ev = self._events.get_nowait()
                except queue.Empty:
                    wake.clear()  # then look again: an event put before the clear is not lost
                    try:
                        ev = self._events.get_nowait()
                    except queue.Empty:
                        await wake.wait()
                        continue
                finished = ev.finished
                yield ev
                if finished:
                    return
        finally:
            self._notify = None
            if not finished:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self.astream()

    def _start_streaming(self) -> None:
        with self._lock:
            if self._streaming:
                return
            if self._text:
                self._events.put(StreamEvent("".join(self._text), tuple(self._ids)))
            for ev in self._backlog:
                self._events.put(ev)
            self._text, self._ids, self._backlog = [], [], []
            self._streaming = True

    # ---- engine side ------------------------------------------------------------
    def emit_text(self, text: str, token_ids: Sequence[int]) -> None:
        """A text delta and the ids it came from (the output thread, once per token)."""
        if self._streaming:  # set once and never cleared: an unlocked read is safe
            if not self._ended:
                self._events.put(StreamEvent(text, tuple(token_ids)))
                if (notify := self._notify) is not None:
                    notify()
            return
        with self._lock:
            if self._ended:
                return
            if self._streaming:
                self._put(StreamEvent(text, tuple(token_ids)))
            else:
                self._text.append(text)
                self._ids.extend(token_ids)

    def emit(self, event: StreamEvent) -> None:
        """Any other event (a task result)."""
        with self._lock:
            if not self._ended:
                self._put(event)

    def _put(self, event: StreamEvent) -> None:
        if self._streaming:
            self._events.put(event)
            if (notify := self._notify) is not None:
                notify()
        else:
            self._backlog.append(event)

    def finish(self, output: RequestOutput) -> bool:
        """Ends the handle; returns False (and does nothing) if it had already ended."""
        with self._lock:
            if self.future.done():
                return False
            self._ended = True
            self._put(StreamEvent(finished=True, output=output))
            self.future.set_result(output)
            return True

    def fail(self, output: RequestOutput, error: BaseException) -> bool:
        output.error = error if isinstance(error, BaseException) else EngineError(str(error))
        output.finish_reason = "error"
        return self.finish(output)
