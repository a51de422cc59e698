"""Span dispatch: completed span groups (spans.py) -> the C++ DecoderBatcher -> expert worker threads.

The second link kind of the one router (DecoderRouter, routing.py): span routes get their own queues in
the same `_C.DecoderBatcher` ("span-<name>"), with the same batching policy (max batch size, queue delay,
priority, deadline) and the same cancellation by request id, and one worker thread each. A group is
submitted the moment the output side completes it, so expert calls run while the text goes on, batched
across requests. A group that cannot run (its parse error, a task with no route, no expert, no image)
gets its error TaskResult at once; a batch that fails is retried one request at a time.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import torch

from .. import _C
from ..model.decoders import DecoderInput, check_image
from ..routes import GROUNDING_TASK, SpanRouteSpec, all_span_routes, span_route_for
from .output import to_task_result
from .routing import ValueLog
from .sequence import Sequence
from .spans import SpanGroup
from .types import DecoderError, TaskResult

Job = tuple[Sequence, int, SpanRouteSpec, SpanGroup]


class SpanRouter:
    def __init__(self, model, cfg, router, on_result: Callable[[Sequence, int, TaskResult], None]):
        self.model, self.cfg, self.router, self.on_result = model, cfg, router, on_result
        self.batcher = router.batcher
        decoders = model.decoders
        self.available: dict[str, SpanRouteSpec] = {}
        if decoders is not None:
            self.available = {s.name: s for s in all_span_routes() if decoders._modules.get(s.decoder) is not None}
        self._tickets: dict[int, Job] = {}
        self._lock = threading.Lock()
        policy = _C.DecoderPolicy(max_batch_size=cfg.decoder_max_batch_size,
                                  max_queue_delay_us=int(cfg.decoder_max_queue_delay_ms * 1000),
                                  max_queue_size=max(cfg.max_queue_size, 1) * 8)
        self._threads = []
        for spec in self.available.values():
            self.batcher.add_decoder(self.queue(spec), policy)
            router.batch_sizes[self.queue(spec)] = ValueLog()
            t = threading.Thread(target=self._worker, args=(spec,), name=f"unimlm-span-{spec.name}", daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def queue(spec: SpanRouteSpec) -> str:
        return f"span-{spec.name}"

    def tasks(self) -> tuple[str, ...]:
        """The task tags the output side parses for: those of the served routes (empty: no span parsing)."""
        return tuple(dict.fromkeys(s.task for s in self.available.values()))

    def submit(self, seq: Sequence, idx: int, group: SpanGroup, dispatch: bool = True) -> None:
        """Queue span `idx` of `seq`; a span that cannot run reports its error TaskResult now."""
        spec = span_route_for(group.task, group.box_spans)
        error = group.error
        if error is None:
            error = self._check(seq, group, spec)
        if error is None and not dispatch:
            error = f"not run: the request ended ({seq.finish_reason or 'cancelled'}) before the span was complete"
        if error is not None:
            name = spec.name if spec is not None else _fallback_name(group)
            self.on_result(seq, idx, self._error(name, group, error))
            return
        deadline_us = 0
        if seq.deadline is not None:
            deadline_us = _C.DecoderBatcher.now_us() + int(max(seq.deadline - time.monotonic(), 0.0) * 1e6) + 1
        item_id = next(self.router._ids)
        with self._lock:
            self._tickets[item_id] = (seq, idx, spec, group)
        try:
            self.batcher.submit(self.queue(spec), _C.BatchItem(item_id, seq.seq_id, item_id,
                                                               priority=seq.request.priority, deadline_us=deadline_us))
        except Exception as e:  # noqa: BLE001 - queue full or closed: this span fails, others go on
            with self._lock:
                self._tickets.pop(item_id, None)
            self.on_result(seq, idx, self._error(spec.name, group, str(e)))

    def _check(self, seq: Sequence, group: SpanGroup, spec: Optional[SpanRouteSpec]) -> Optional[str]:
        task = f"<{group.task}>"
        if spec is None:
            if group.box_spans:
                return f"{task} takes no <BOX> (no span route for {task} with boxes)"
            return f"{task} needs at least one <BOX> after it"
        if spec.name not in self.available:
            return f"this model has no expert for span route {spec.name} ({spec.decoder})"
        if spec.needs_image and not seq.images:
            return f"span route {spec.name} ({task}) needs an input image and the request has none"
        return None

    @staticmethod
    def _error(name: str, group: SpanGroup, msg: str) -> TaskResult:
        from ..routes import find_route

        try:
            kind = find_route(name).result
        except ValueError:
            kind = None
        return TaskResult(route=name, num_groups=max(len(group.boxes), 1), error=DecoderError(msg), kind=kind,
                          span=(group.start, group.end), span_text=group.text)

    def depths(self) -> dict[str, int]:
        return {self.queue(s): self.batcher.queue_size(self.queue(s)) for s in self.available.values()}

    def close(self, timeout: float = 1.0) -> None:
        """After the router closed the batcher: the workers see `closed` and return."""
        for t in self._threads:
            t.join(timeout)

    # ---- workers ----------------------------------------------------------------
    def _take(self, items) -> list[Job]:
        with self._lock:
            return [self._tickets.pop(it.payload) for it in items if it.payload in self._tickets]

    def _worker(self, spec: SpanRouteSpec) -> None:
        name = self.queue(spec)
        while True:
            batch = self.batcher.next_batch(name, 0.1)
            self._take(list(batch.expired) + list(batch.cancelled))  # the engine loop ends those requests
            jobs = self._take(batch.items)
            if jobs:
                self.router.batch_sizes[name].add(len(jobs))
                self._run(spec, jobs)
            if batch.closed:
                return

    def _input(self, spec: SpanRouteSpec, seq: Sequence, group: SpanGroup) -> DecoderInput:
        image = check_image(spec.name, 0, seq.images[0], True) if spec.needs_image else None
        return DecoderInput(payloads=[], image=image, seed=(seq.request.sampling.seed or 0) + group.start,
                            text=group.text, boxes=[b for _, b in group.boxes], phrases=[p for p, _ in group.boxes])

    def _run(self, spec: SpanRouteSpec, jobs: list[Job]) -> None:
        try:
            inputs = [self._input(spec, s, g) for s, _, _, g in jobs]
            options = {**spec.options, **(self.cfg.decoder_options.get(spec.name) or {})}
            with torch.inference_mode():
                results = self.model.decoders.decoder_for(spec).run(spec, inputs, options)
        except Exception as e:  # noqa: BLE001 - isolate the failing request
            if len(jobs) > 1:
                for job in jobs:
                    self._run(spec, [job])
                return
            seq, idx, _, group = jobs[0]
            self.on_result(seq, idx, self._error(spec.name, group, f"{spec.name} expert failed: "
                                                                   f"{type(e).__name__}: {e}"))
            return
        for (seq, idx, _, group), res in zip(jobs, results):
            t = to_task_result(spec.name, max(len(group.boxes), 1), res, "eager")
            t.span, t.span_text = (group.start, group.end), group.text
            self.on_result(seq, idx, t)


def _fallback_name(group: SpanGroup) -> str:
    """The name an error result carries when no route matched: the task tag, lower case."""
    return "box" if group.task == GROUNDING_TASK else group.task.lower()
