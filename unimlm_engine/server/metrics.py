"""Prometheus metrics of the server (prometheus_client, one registry per app).

Engine state is read at scrape time from `Engine.stats()` (the C++ scheduler's queue, running set, KV
block pool and preemption count, the decoder batcher's queue depths); per-request latencies are observed
when a request ends (from its RequestOutput); decoder batch sizes and batcher queue delays are observed as
the router logs them (its ValueLogs call the histograms; values logged before the app was built are not in
them).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        for name, doc, value in (
                ("unimlm_queue_depth", "Requests waiting to be scheduled", s["queued"]),
                ("unimlm_running_seqs", "Sequences in the running batch", s["running"]),
                ("unimlm_kv_blocks_total", "KV-cache blocks in the pool", s["kv_blocks_total"]),
                ("unimlm_kv_blocks_free", "Free KV-cache blocks (evictable prefix-cache blocks included)",
                 s["kv_blocks_free"]),
                ("unimlm_kv_blocks_used", "KV-cache blocks held by sequences",
                 s["kv_blocks_total"] - s["kv_blocks_free"]),
                ("unimlm_kv_blocks_cached", "Free blocks that still hold a reusable prefix", s["kv_blocks_cached"])):
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("unimlm_preemptions", "Sequences preempted by the scheduler", value=s["preemptions"])
        depth = GaugeMetricFamily("unimlm_decoder_queue_depth", "Items waiting in a decoder's batcher queue",
                                  labels=["decoder"])
        for name, v in s["decoder_queue_depths"].items():
            depth.add_metric([name], v)
        yield depth


class ServerMetrics:
    def __init__(self, engine):
        self.engine = engine
        self.registry = r = CollectorRegistry()
        r.register(_EngineCollector(engine))
        self.requests = Counter("unimlm_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.finished = Counter("unimlm_request_finished", "Engine requests by finish reason", ["reason"], registry=r)
        self.inflight = Gauge("unimlm_http_requests_in_flight", "Generation requests being served", registry=r)
        self.prompt_tokens = Counter("unimlm_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("unimlm_generation_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.ttft = Histogram("unimlm_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("unimlm_time_per_output_token_seconds", "Mean time between tokens after the first",
                              buckets=_LATENCY, registry=r)
        self.e2e = Histogram("unimlm_e2e_request_latency_seconds", "Arrival to end (tasks included)",
                             buckets=_LATENCY, registry=r)
        self.queue_time = Histogram("unimlm_request_queue_time_seconds", "Arrival to first scheduled",
                                    buckets=_LATENCY, registry=r)
        self.decoder_batch = Histogram("unimlm_decoder_batch_size", "Requests per decoder batch", ["decoder"],
                                       buckets=_BATCH, registry=r)
        self.decoder_delay = Histogram("unimlm_decoder_queue_delay_seconds", "Wait in the decoder batcher",
                                       ["decoder"], buckets=_LATENCY, registry=r)
        router = engine.router
        for logs, hist in ((router.batch_sizes, self.decoder_batch), (router.queue_delays_s, self.decoder_delay)):
            for name, log in logs.items():
                log.subscribe(hist.labels(name).observe)

    def observe_output(self, out) -> None:
        self.finished.labels(out.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(out.prompt_len)
        self.generation_tokens.inc(len(out.token_ids))
        if out.finish_reason not in ("stop", "length"):
            return
        self.e2e.observe(out.e2e_time_s)
        self.queue_time.observe(out.queue_time_s)
        if out.time_to_first_token_s is not None:
            self.ttft.observe(out.time_to_first_token_s)
        if out.time_per_output_token_s is not None:
            self.tpot.observe(out.time_per_output_token_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
