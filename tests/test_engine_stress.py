"""Stress: 16 threads submit 2,000 requests with random cancels and timeouts into an engine
with a small KV pool and a small queue. Every handle ends exactly once, no KV block leaks,
nothing deadlocks, close() returns (issue 5)."""
import random
import threading
import time

import pytest

import unimlm_engine as ue
from engine_helpers import IMAGES, tiny_model

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
