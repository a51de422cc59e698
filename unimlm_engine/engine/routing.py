"""Decoder dispatch: routed payloads -> the C++ DecoderBatcher -> decoder worker threads.

When a request's text is done, its payloads are grouped per route (all [DET] groups of a
request are the classes of one detector call; [POSE] also takes the request's [DET]
groups as object classes) and each (request, route) becomes one batcher item. One worker
thread per decoder blocks on `next_batch` (GIL released), runs the decoder on the whole
batch and hands each request its TaskResult. A batch that fails is retried one request at a
time, so one bad request cannot fail the others.
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import Callable, Optional

import torch

from .. import _C
from ..config import EngineConfig
from .sequence import Sequence
from .types import DecoderError, TaskResult

ROUTE_DECODER = {"[DET]": "det", "[GRD]": "grd", "[SEG]": "seg", "[POSE]": "pose", "[GEN]": "gen", "[EDIT]": "edit"}
ROUTE_ORDER = tuple(ROUTE_DECODER)


def to_task_result(route: str, num_groups: int, res) -> TaskResult:
    t = TaskResult(route=route, num_groups=num_groups, raw=res)
    for name in ("boxes", "scores", "labels", "masks", "keypoints", "images"):
        if hasattr(res, name):
            setattr(t, name, getattr(res, name))
    return t


class DecoderRouter:
    def __init__(self, model, cfg: EngineConfig, on_result: Callable[[Sequence, int, TaskResult], None]):
        self.model = model
        self.cfg = cfg
        self.on_result = on_result
        self.batcher = _C.DecoderBatcher()
        self._tickets: dict[int, tuple[Sequence, int, str]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.available = set(self._available_routes())
        policy = _C.DecoderPolicy(max_batch_size=cfg.decoder_max_batch_size,
                                  max_queue_delay_us=int(cfg.decoder_max_queue_delay_ms * 1000),
                                  max_queue_size=max(cfg.max_queue_size, 1) * 8)
        self.batch_sizes: dict[str, list[int]] = {}
        self._threads = []
        for route in sorted(self.available, key=ROUTE_ORDER.index):
            name = ROUTE_DECODER[route]
            self.batcher.add_decoder(name, policy)
            self.batch_sizes[name] = []
            t = threading.Thread(target=self._worker, args=(route,), name=f"unimlm-decoder-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def _available_routes(self):
        d = self.model.decoders
        if d is None:
            return []
        cfg = self.model.cfg
        have = {"[DET]": cfg.detector, "[GRD]": cfg.detector, "[SEG]": cfg.detector, "[POSE]": cfg.pose,
                "[GEN]": cfg.gen, "[EDIT]": cfg.edit}
        return [r for r, c in have.items() if c is not None]

    def plan(self, seq: Sequence) -> list[tuple[int, str]]:
        """One task per route the request used, in ROUTE_ORDER; sets `seq.tasks` (routes
        without a decoder get their error TaskResult now) and returns the (task index,
        route) pairs to submit."""
        routes = [r for r in ROUTE_ORDER if any(p.route == r for p in seq.payloads)]
        seq.tasks = [None] * len(routes)
        jobs = []
        has_classes = any(p.route in ("[DET]", "[GRD]") for p in seq.payloads)
        for i, route in enumerate(routes):
            error = None
            if route not in self.available:
                error = DecoderError(f"this model has no decoder for {route}")
            elif route == "[POSE]" and not has_classes:
                error = DecoderError("[POSE] needs the object classes: at least one [DET] group in the same request")
            if error is None:
                jobs.append((i, route))
            else:
                seq.tasks[i] = TaskResult(route=route, num_groups=sum(p.route == route for p in seq.payloads),
                                          error=error)
        return jobs

    def submit(self, seq: Sequence, idx: int, route: str) -> None:
        """Queue task `idx` of `seq`; a refused submit reports an error TaskResult."""
        deadline_us = 0
        if seq.deadline is not None:
            left = max(seq.deadline - time.monotonic(), 0.0)
            deadline_us = _C.DecoderBatcher.now_us() + int(left * 1e6) + 1
        item_id = next(self._ids)
        with self._lock:
            self._tickets[item_id] = (seq, idx, route)
        try:
            self.batcher.submit(ROUTE_DECODER[route], _C.BatchItem(item_id, seq.seq_id, item_id,
                                                                   priority=seq.request.priority,
                                                                   deadline_us=deadline_us))
        except Exception as e:  # noqa: BLE001 - queue full or closed: this task fails, others go on
            with self._lock:
                self._tickets.pop(item_id, None)
            n = sum(p.route == route for p in seq.payloads)
            self.on_result(seq, idx, TaskResult(route=route, num_groups=n, error=DecoderError(str(e))))

    def cancel(self, seq: Sequence) -> None:
        self.batcher.cancel_request(seq.seq_id)

    def depths(self) -> dict[str, int]:
        return {ROUTE_DECODER[r]: self.batcher.queue_size(ROUTE_DECODER[r]) for r in self.available}

    def close(self, timeout: float = 1.0) -> None:
        self.batcher.close()
        for t in self._threads:
            t.join(timeout)

    # ---- worker -----------------------------------------------------------------
    def _take(self, items) -> list[tuple[Sequence, int, str]]:
        with self._lock:
            return [self._tickets.pop(it.payload) for it in items if it.payload in self._tickets]

    def _worker(self, route: str) -> None:
        name = ROUTE_DECODER[route]
        while True:
            batch = self.batcher.next_batch(name, 0.1)
            self._take(list(batch.expired) + list(batch.cancelled))  # the engine loop ends those requests
            jobs = self._take(batch.items)
            if jobs:
                self.batch_sizes[name].append(len(jobs))
                self._run(route, jobs)
            if batch.closed:
                return

    def _inputs(self, route: str, jobs):
        payloads = [[p.payload for p in s.payloads if p.route == route] for s, _, _ in jobs]
        images = [s.images[0] if s.images else None for s, _, _ in jobs]
        opts = dict(self.cfg.decoder_options.get(route, {}))
        if route == "[POSE]":
            opts["det_payloads"] = [[p.payload for p in s.payloads if p.route in ("[DET]", "[GRD]")]
                                    for s, _, _ in jobs]
        if route in ("[GEN]", "[EDIT]"):
            opts.setdefault("seeds", [s.request.sampling.seed or 0 for s, _, _ in jobs])
        return payloads, images, opts

    def _run(self, route: str, jobs) -> None:
        try:
            payloads, images, opts = self._inputs(route, jobs)
            with torch.inference_mode():
                results = self.model.run_decoder(route, payloads, images, **opts)
        except Exception as e:  # noqa: BLE001 - isolate the failing request
            if len(jobs) > 1:
                for job in jobs:
                    self._run(route, [job])
                return
            seq, idx, _ = jobs[0]
            self.on_result(seq, idx, TaskResult(route=route, num_groups=len(payloads[0]) if payloads else 0,
                                                error=DecoderError(f"{route} decoder failed: {type(e).__name__}: {e}")))
            return
        for (seq, idx, _), groups, res in zip(jobs, payloads, results):
            self.on_result(seq, idx, to_task_result(route, len(groups), res))

    def mean_batch_size(self) -> dict[str, Optional[float]]:
        return {k: (sum(v) / len(v) if v else None) for k, v in self.batch_sizes.items()}
