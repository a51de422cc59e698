"""Decoder dispatch: routed payloads -> the C++ DecoderBatcher -> decoder worker threads.

When a request's text is done, its payloads are grouped per route (all [DET] groups of a request are
the classes of one detector call; a route with `requires`, like [POSE], also gets the request's groups
of those routes as context) and each (request, route) becomes one batcher item. One worker thread per
route blocks on `next_batch` (GIL released), runs the decoder on the whole batch, through the back end
EngineConfig.decoder_backends chose for the route, and hands each request its TaskResult. A batch that
fails is retried one request at a time, so one bad request cannot fail the others.
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import Callable, Optional

import torch

from .. import _C
from ..config import EngineConfig
from ..model.decoders import DecoderInput
from ..model.decoders.backends import RouteBackend, load_route_backend, parse_backend_spec
from ..routes import RouteError, RouteSpec, all_routes, get_route
from .output import to_task_result
from .sequence import Sequence
from .types import DecoderError, TaskResult


class ValueLog:
    """One decoder's running statistic (its batch sizes, its items' waits in the batcher): the count and sum
    (for the mean) and the functions called with each new value (the server's Prometheus histograms). No
    per-value history is kept, so a long-running server's memory does not grow with the values it logs."""

    def __init__(self):
        self.count = 0
        self.total = 0.0
        self._subscribers: list[Callable[[float], None]] = []
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self.count += 1
            self.total += value
            subscribers = list(self._subscribers)
        for fn in subscribers:
            fn(value)

    def subscribe(self, fn: Callable[[float], None]) -> None:
        """fn(value) for every value added from now on."""
        with self._lock:
            self._subscribers.append(fn)

    def mean(self) -> Optional[float]:
        with self._lock:
            return self.total / self.count if self.count else None

    def __len__(self) -> int:
        return self.count


class DecoderRouter:
    def __init__(self, model, cfg: EngineConfig, on_result: Callable[[Sequence, int, TaskResult], None]):
        self.model = model
        self.cfg = cfg
        self.on_result = on_result
        self.batcher = _C.DecoderBatcher()
        self._tickets: dict[int, tuple[Sequence, int, RouteSpec]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        served = model.decoders.available_routes() if model.decoders is not None else []
        known = set(model.route_ids.values())
        self.available: dict[str, RouteSpec] = {s.token: s for s in served if s.token in known}
        self.backends = self._load_backends()
        policy = _C.DecoderPolicy(max_batch_size=cfg.decoder_max_batch_size,
                                  max_queue_delay_us=int(cfg.decoder_max_queue_delay_ms * 1000),
                                  max_queue_size=max(cfg.max_queue_size, 1) * 8)
        self.batch_sizes: dict[str, ValueLog] = {}  # per decoder: the size of each batch run
        self.queue_delays_s: dict[str, ValueLog] = {}  # per decoder: each item's wait in the batcher
        self._threads = []
        for spec in self.available.values():
            self.batcher.add_decoder(spec.name, policy)
            self.batch_sizes[spec.name] = ValueLog()
            self.queue_delays_s[spec.name] = ValueLog()
            t = threading.Thread(target=self._worker, args=(spec,), name=f"unimlm-decoder-{spec.name}", daemon=True)
            t.start()
            self._threads.append(t)

    def _load_backends(self) -> dict[str, RouteBackend]:
        """EngineConfig.decoder_backends -> route token -> loaded back end (ValueError / FileNotFoundError)."""
        out: dict[str, RouteBackend] = {}
        for key, value in self.cfg.decoder_backends.items():
            _, kind, path = parse_backend_spec(f"{key}={value}")
            routes = [s for s in self.available.values() if s.decoder == key]
            if not routes:
                try:
                    routes = [get_route(key)]
                except RouteError:
                    raise ValueError(f"decoder_backends: {key!r} is neither a route nor a decoder of this model; "
                                     f"routes: {', '.join(s.name for s in self.available.values())}") from None
                if routes[0].token not in self.available:
                    raise ValueError(f"decoder_backends: this model has no decoder for {routes[0].token}")
            backend = load_route_backend(self.model.decoders.decoder_for(routes[0]), routes, kind, path)
            if len(routes) == 1 and not backend.serves(routes[0]):
                raise ValueError(f"decoder_backends: {path} cannot serve {routes[0].token} "
                                 f"(an export without masks serves DET/GRD, not SEG)")
            out.update({r.token: backend for r in routes})
        return out

    def plan(self, seq: Sequence) -> list[tuple[int, RouteSpec]]:
        """One task per route the request used, in registry order; sets `seq.tasks` (routes that cannot
        run get their error TaskResult now) and returns the (task index, route) pairs to submit. Payloads
        of routing tokens in the prompt exist only with Request.run_prompt_routes."""
        used = seq.payloads
        routes = [s for s in all_routes() if any(p.route == s.token for p in used)]
        seq.tasks = [None] * len(routes)
        jobs = []
        for i, spec in enumerate(routes):
            error = None
            if spec.token not in self.available:
                error = DecoderError(f"this model has no decoder for {spec.token}")
            elif spec.requires and not any(p.route in spec.requires for p in used):
                error = DecoderError(f"{spec.token} needs the object classes: at least one "
                                     f"{' or '.join(spec.requires)} group in the same request")
            if error is None:
                jobs.append((i, spec))
            else:
                seq.tasks[i] = TaskResult(route=spec.token, num_groups=sum(p.route == spec.token for p in used),
                                          error=error, kind=spec.result)
        return jobs

    def submit(self, seq: Sequence, idx: int, spec: RouteSpec) -> None:
        """Queue task `idx` of `seq`; a refused submit reports an error TaskResult."""
        deadline_us = 0
        if seq.deadline is not None:
            left = max(seq.deadline - time.monotonic(), 0.0)
            deadline_us = _C.DecoderBatcher.now_us() + int(left * 1e6) + 1
        item_id = next(self._ids)
        with self._lock:
            self._tickets[item_id] = (seq, idx, spec)
        try:
            self.batcher.submit(spec.name, _C.BatchItem(item_id, seq.seq_id, item_id, priority=seq.request.priority,
                                                        deadline_us=deadline_us))
        except Exception as e:  # noqa: BLE001 - queue full or closed: this task fails, others go on
            with self._lock:
                self._tickets.pop(item_id, None)
            n = sum(p.route == spec.token for p in seq.payloads)
            self.on_result(seq, idx, TaskResult(route=spec.token, num_groups=n, error=DecoderError(str(e)),
                                                kind=spec.result))

    def cancel(self, seq: Sequence) -> None:
        self.batcher.cancel_request(seq.seq_id)

    def depths(self) -> dict[str, int]:
        return {s.name: self.batcher.queue_size(s.name) for s in self.available.values()}

    def close(self, timeout: float = 1.0) -> None:
        self.batcher.close()
        for t in self._threads:
            t.join(timeout)

    def mean_batch_size(self) -> dict[str, Optional[float]]:
        return {k: v.mean() for k, v in self.batch_sizes.items()}

    def mean_queue_delay_s(self) -> dict[str, Optional[float]]:
        return {k: v.mean() for k, v in self.queue_delays_s.items()}

    # ---- worker -----------------------------------------------------------------
    def _take(self, items) -> list[tuple[Sequence, int, RouteSpec]]:
        with self._lock:
            return [self._tickets.pop(it.payload) for it in items if it.payload in self._tickets]

    def _worker(self, spec: RouteSpec) -> None:
        while True:
            batch = self.batcher.next_batch(spec.name, 0.1)
            self._take(list(batch.expired) + list(batch.cancelled))  # the engine loop ends those requests
            jobs = self._take(batch.items)
            if jobs:
                now = _C.DecoderBatcher.now_us()
                for it in batch.items:
                    self.queue_delays_s[spec.name].add((now - it.enqueue_us) / 1e6)
                self.batch_sizes[spec.name].add(len(jobs))
                self._run(spec, jobs)
            if batch.closed:
                return

    def _input(self, spec: RouteSpec, seq: Sequence) -> DecoderInput:
        used = seq.payloads
        return DecoderInput(payloads=[p.payload for p in used if p.route == spec.token],
                            image=seq.images[0] if spec.needs_image and seq.images else None,
                            context=[p.payload for p in used if p.route in spec.requires],
                            seed=seq.request.sampling.seed or 0)

    def _run(self, spec: RouteSpec, jobs) -> None:
        inputs = [self._input(spec, s) for s, _, _ in jobs]
        try:
            options = self.cfg.decoder_options.get(spec.token) or self.cfg.decoder_options.get(spec.name) or {}
            with torch.inference_mode():
                results, backend = self.model.decoders.run(spec, inputs, options, self.backends.get(spec.token))
        except Exception as e:  # noqa: BLE001 - isolate the failing request
            if len(jobs) > 1:
                for job in jobs:
                    self._run(spec, [job])
                return
            seq, idx, _ = jobs[0]
            self.on_result(seq, idx, TaskResult(route=spec.token, num_groups=len(inputs[0].payloads), kind=spec.result,
                                                error=DecoderError(f"{spec.token} decoder failed: "
                                                                   f"{type(e).__name__}: {e}")))
            return
        for (seq, idx, _), inp, res in zip(jobs, inputs, results):
            self.on_result(seq, idx, to_task_result(spec.token, len(inp.payloads), res, backend))
