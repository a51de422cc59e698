"""Stress: 16 threads submit 2,000 requests with random cancels and timeouts into an engine
with a small KV pool and a small queue. Every handle ends exactly once, no KV block leaks,
nothing deadlocks, close() returns (issue 5)."""
import random
import threading
import time

import numpy as np
import pytest

import unimlm_engine as ue
from engine_helpers import IMAGES, tiny_model
from unimlm_engine.routes import span_tokens

THREADS, TOTAL = 16, 2000


def _finished_events(handle) -> int:
    n = sum(e.finished for e in handle.stream(timeout=1))  # the backlog, up to the first final event
    while not handle._events.empty():
        n += handle._events.get_nowait().finished
    return n


@pytest.mark.timeout(600)
@pytest.mark.parametrize("output_thread", [False, True], ids=["inline-output", "output-thread"])
def test_stress_every_handle_ends_once(output_thread):
    model, tok = tiny_model()
    cfg = ue.EngineConfig(num_kv_blocks=48, max_queue_size=32, max_num_seqs=16, max_num_batched_tokens=256,
                          output_thread=output_thread,
                          decoder_max_batch_size=4)
    eng = ue.Engine(model, tok, cfg)
    handles, lock = [], threading.Lock()
    det = tok.special_ids["[DET]"]

    def worker(wid):
        rng = random.Random(wid)
        for i in range(TOTAL // THREADS):
            kind = rng.random()
            sp = ue.SamplingParams(max_tokens=rng.randint(1, 6), ignore_eos=True)
            if kind < 0.05:
                req = ue.Request(prompt="find it", images=[IMAGES[0]], sampling=ue.SamplingParams(
                    max_tokens=2, forced_prefix=(det,)))
            else:
                ids = [1] + [rng.randrange(3, 259) for _ in range(rng.randint(1, 60))]
                req = ue.Request(prompt_token_ids=ids, sampling=sp,
                                 timeout_s=rng.choice([None, None, None, 0.001, 0.05]),
                                 priority=rng.randint(0, 3))
            h = eng.submit(req)
            with lock:
                handles.append(h)
            if rng.random() < 0.1:
                time.sleep(rng.random() * 0.002)
                h.cancel()
            if rng.random() < 0.3:
                time.sleep(0.001)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "submitters deadlocked"
    assert len(handles) == TOTAL
    outs = [h.future.result(timeout=120) for h in handles]
    reasons = {}
    for h, o in zip(handles, outs):
        assert _finished_events(h) == 1, "a handle must end exactly once"
        key = type(o.error).__name__ if o.error else o.finish_reason
        reasons[key] = reasons.get(key, 0) + 1
        assert o.finish_reason in ("length", "stop", "cancelled", "timeout", "error")
        if o.finish_reason == "error":
            assert isinstance(o.error, ue.QueueFullError), o.error
    # all four endings happened, so the paths were really exercised
    assert {"length", "cancelled", "timeout", "QueueFullError"} <= set(reasons), reasons
    deadline = time.monotonic() + 10
    while eng.stats()["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.01)
    s = eng.stats()
    assert s["active_requests"] == 0 and s["running"] == 0 and s["queued"] == 0
    assert s["kv_blocks_free"] == cfg.num_kv_blocks, "KV blocks leaked"
    t0 = time.monotonic()
    eng.close()
    assert time.monotonic() - t0 < 2.0


SPAN_TEXTS = ("<IMGSEG>dog</IMGSEG><BOX>dog:[0.1, 0.2, 0.6, 0.9]</BOX> ok", "<IMGGEN>a car</IMGGEN>",
              "<IMGEDIT>snow</IMGEDIT>", "<LAYOUTGEN>pets</LAYOUTGEN><BOX>cat:[0, 0, 0.5, 0.5]</BOX>",
              "<IMGEDIT>hat</IMGEDIT><BOX>hat:[0.2, 0, 0.6, 0.3]</BOX>", "<IMGSEG>x", "<BOX>a:[0.5, 0.1]</BOX>",
              "<IMGFOO>y</IMGFOO>")


def _both_link_kinds():
    """The tiny preset plus the tiny span experts: super-link routes and span routes in one engine."""
    from unimlm_engine.config import ExpertConfig
    from unimlm_engine.config.presets import tiny_random
    from unimlm_engine.inputs.tokenizer import ByteTokenizer
    from unimlm_engine.model import build_model
    from unimlm_engine.routes import span_tokens

    cfg = tiny_random()
    cfg.llm.vocab_size += len(span_tokens())
    cfg.experts = ExpertConfig(tiny=True, num_inference_steps=1, guidance_scale=1.0, image_size=32)
    model = build_model(cfg, seed=0)
    tok = ByteTokenizer(extra_special=span_tokens())
    model.special_ids = dict(tok.special_ids)
    return model, tok


@pytest.mark.timeout(600)
@pytest.mark.parametrize("output_thread", [False, True], ids=["inline-output", "output-thread"])
def test_stress_with_span_routes_every_handle_ends_once(output_thread):
    """8 threads x 40 requests into an engine serving both link kinds: plain text, forced [DET], and forced
    span texts (good and bad spans), with random cancels and timeouts. Every handle ends exactly once,
    every finished span request reports each of its spans, no KV block leaks, close() returns."""
    model, tok = _both_link_kinds()
    cfg = ue.EngineConfig(num_kv_blocks=48, max_queue_size=32, max_num_seqs=16, max_num_batched_tokens=256,
                          decoder_max_batch_size=4, output_thread=output_thread)
    eng = ue.Engine(model, tok, cfg)
    image = (np.arange(24 * 32 * 3) % 251).astype(np.uint8).reshape(24, 32, 3)
    det = tok.special_ids["[DET]"]
    # the up-to-3 sampled tokens after a forced span text must not open another span (random weights may)
    no_spans = {tok.token_to_id(t): -100.0 for t in span_tokens()}
    handles, lock = [], threading.Lock()

    def worker(wid):
        rng = random.Random(wid)
        for _ in range(40):
            kind = rng.random()
            timeout = rng.choice([None, None, None, 0.001, 0.05])
            if kind < 0.3:
                ids = tok.encode(rng.choice(SPAN_TEXTS))
                req = ue.Request(prompt="go", images=[image], timeout_s=timeout, sampling=ue.SamplingParams(
                    max_tokens=len(ids) + rng.randint(0, 3), forced_prefix=tuple(ids), ignore_eos=True,
                    logit_bias=no_spans))
            elif kind < 0.35:
                req = ue.Request(prompt="find it", images=[image], sampling=ue.SamplingParams(
                    max_tokens=2, forced_prefix=(det,)))
            else:
                ids = [1] + [rng.randrange(3, 259) for _ in range(rng.randint(1, 40))]
                req = ue.Request(prompt_token_ids=ids, timeout_s=timeout,
                                 sampling=ue.SamplingParams(max_tokens=rng.randint(1, 6), ignore_eos=True))
            h = eng.submit(req)
            with lock:
                handles.append((req, h))
            if rng.random() < 0.1:
                time.sleep(rng.random() * 0.002)
                h.cancel()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "submitters deadlocked"
    spans_seen = 0
    for req, h in handles:
        out = h.future.result(timeout=120)
        assert _finished_events(h) == 1, "a handle must end exactly once"
        assert out.finish_reason in ("length", "stop", "cancelled", "timeout", "error")
        if out.finish_reason == "length" and req.sampling.forced_prefix and len(req.sampling.forced_prefix) > 1:
            assert len(out.spans) == 1 and out.spans[0].span[0] == 0, (out.text, out.spans)
            spans_seen += 1
    assert spans_seen > 0
    deadline = time.monotonic() + 10
    while eng.stats()["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.01)
    s = eng.stats()
    assert s["active_requests"] == 0 and s["kv_blocks_free"] == cfg.num_kv_blocks
    t0 = time.monotonic()
    eng.close()
    assert time.monotonic() - t0 < 2.0
