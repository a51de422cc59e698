"""Load generator over the Python API (`unimlm serve-bench`, and benchmarks/bench_e2e.py).

Workload kinds: vqa (one image, free text), text (no image), and every route by its name: det
(image, 1..3 forced [DET] groups), seg, grd (one group), pose (one [DET] class + 17 [POSE]
keypoint groups, COCO person), gen, edit... (forcing.py derives the groups from the route registry and
the decoders), and every span route by its name: imggen, imgseg, layoutgen... (the answer starts with a
sample span, forcing.span_text; needs the tokenizer). Routing tokens and spans are forced through
`SamplingParams.forced_prefix`, because a model with random weights would not emit them by itself; the
decoders then really run.
Arrivals: fixed concurrency (a closed loop of N clients) or Poisson at a request rate.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..engine.types import Request, RequestOutput
from ..routes import RouteError, all_routes, all_span_routes, get_route, get_span_route
from ..sampling import SamplingParams
from .forcing import forced_route_tokens, span_text

TEXT_KINDS = ("vqa", "text")
QUESTIONS = ("What is in this image?", "Describe the scene in detail.", "What colour is the main object?",
             "Is there an animal here?", "Write a short caption.")


def parse_mix(spec: str) -> dict[str, float]:
    """"vqa:0.4,det:0.3,text:0.3" -> normalised weights; ValueError on unknown kinds."""
    mix: dict[str, float] = {}
    for part in spec.split(","):
        name, _, w = part.partition(":")
        name = name.strip().lower()
        if name not in TEXT_KINDS and name not in {s.name for s in all_span_routes()}:
            try:
                get_route(name)
            except RouteError:
                kinds = TEXT_KINDS + tuple(s.name for s in all_routes() + all_span_routes())
                raise ValueError(f"unknown workload kind {name!r}; kinds: {', '.join(kinds)}") from None
        mix[name] = float(w) if w else 1.0
    total = sum(mix.values())
    if total <= 0:
        raise ValueError("workload mix weights must sum to a positive number")
    return {k: v / total for k, v in mix.items()}


def make_request(kind: str, rng: random.Random, model, images: list, max_tokens: int, tokenizer=None) -> Request:
    """kind: "vqa", "text", a route name (a detection route forces 1..3 groups, classes) or a span route
    name (forces a sample span; needs `tokenizer`)."""
    q = rng.choice(QUESTIONS)
    image = [rng.choice(images)] if kind != "text" else None
    forced: tuple[int, ...] = ()
    if kind in {s.name for s in all_span_routes()}:
        if tokenizer is None:
            raise ValueError(f"workload kind {kind!r} (a span route) needs the tokenizer")
        forced = tuple(tokenizer.encode(span_text(get_span_route(kind))))
    elif kind not in TEXT_KINDS:
        spec = get_route(kind)
        forced = forced_route_tokens(model, [spec], lambda s: rng.randint(1, 3) if s.result == "detection"
                                     else 17 if s.result == "pose" else 1)
    sp = SamplingParams(max_tokens=max(max_tokens, len(forced) + 1), forced_prefix=forced, ignore_eos=True)
    return Request(prompt=q, images=image, sampling=sp)


def make_workload(n: int, mix: dict[str, float], model, images: list, max_tokens: int, seed: int = 0,
                  tokenizer=None) -> list[Request]:
    """n requests drawn from `mix`; model: the VisionLLM being served (its vocabulary and decoders);
    tokenizer: its tokenizer (needed for span-route kinds)."""
    rng = random.Random(seed)
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=n)
    return [make_request(k, rng, model, images, max_tokens, tokenizer) for k in kinds]


@dataclass
class BenchResult:
    outputs: list[RequestOutput]
    wall_s: float

    def summary(self) -> dict:
        ok = [o for o in self.outputs if o.ok]
        return latency_summary(len(self.outputs), [o.time_to_first_token_s for o in ok],
                               [o.time_per_output_token_s for o in ok], [o.e2e_time_s for o in ok],
                               sum(len(o.token_ids) for o in ok), self.wall_s)


def latency_summary(n: int, ttft: list, tpot: list, e2e: list, tokens: int, wall_s: float) -> dict:
    """n requests, of them len(e2e) ok with these latencies (None: not measured) and `tokens` generated."""
    def pct(xs, p):
        xs = [x for x in xs if x is not None]
        return float(np.percentile(xs, p)) if xs else None

    return {"requests": n, "ok": len(e2e), "failed": n - len(e2e), "wall_s": wall_s,
            "req_per_s": len(e2e) / wall_s, "output_tok_per_s": tokens / wall_s,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "tpot_p50_s": pct(tpot, 50),
            "tpot_p99_s": pct(tpot, 99), "e2e_p50_s": pct(e2e, 50), "e2e_p99_s": pct(e2e, 99)}


def run_closed_loop(engine, requests: list[Request], concurrency: int, progress=None) -> BenchResult:
    """N clients, each submitting its next request when the previous one finished."""
    it = iter(enumerate(requests))
    lock = threading.Lock()
    outputs: list[Optional[RequestOutput]] = [None] * len(requests)

    def client():
        while True:
            with lock:
                nxt = next(it, None)
            if nxt is None:
                return
            i, req = nxt
            outputs[i] = engine.submit(req).future.result()
            if progress is not None:
                progress.update(1)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(max(1, concurrency))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return BenchResult([o for o in outputs if o is not None], time.perf_counter() - t0)


def run_poisson(engine, requests: list[Request], rate: float, seed: int = 0, progress=None) -> BenchResult:
    """Open loop: arrivals with exponential gaps at `rate` requests/s."""
    rng = random.Random(seed)
    handles = []
    t0 = time.perf_counter()
    for req in requests:
        handles.append(engine.submit(req))
        time.sleep(rng.expovariate(rate))
    outputs = []
    for h in handles:
        outputs.append(h.future.result())
        if progress is not None:
            progress.update(1)
    return BenchResult(outputs, time.perf_counter() - t0)
