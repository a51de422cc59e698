"""Engine API behaviour: streaming, cancel, timeouts, async, bad inputs, close (issue 5)."""
import asyncio
import time

import numpy as np
import pytest

import unimlm_engine as ue
from engine_helpers import IMAGES, tiny_model


@pytest.fixture(scope="module")
def engine():
    model, tok = tiny_model()
    eng = ue.Engine(model, tok, ue.EngineConfig(num_kv_blocks=256, max_queue_size=64))
    yield eng
    eng.close()


def test_stream_yields_deltas_then_final(engine):
    h = engine.submit(ue.Request(prompt="Say something.", sampling=ue.SamplingParams(max_tokens=8, ignore_eos=True)))
    events = list(h.stream(timeout=30))
    assert events[-1].finished and events[-1].output is not None
    tokens = [t for e in events[:-1] for t in e.token_ids]
    out = h.result()
    assert tokens == out.token_ids and len(tokens) == 8
    assert "".join(e.text for e in events[:-1]) == out.text
    assert out.time_to_first_token_s is not None and out.e2e_time_s >= out.time_to_first_token_s


def test_stream_reports_task_results(engine):
    tok = engine.tokenizer
    sp = ue.SamplingParams(max_tokens=2, forced_prefix=(tok.special_ids["[DET]"],))
    h = engine.submit(ue.Request(prompt="Find the cat.", images=[IMAGES[0]], sampling=sp))
    tasks = [e.task for e in h.stream(timeout=60) if e.task is not None]
    out = h.result()
    assert len(tasks) == 1 and tasks[0].route == "[DET]" and tasks[0].error is None
    assert out.tasks[0].boxes.shape[-1] == 4 and out.tasks[0].num_groups == 1


def test_cancel_ends_once(engine):
    h = engine.submit(ue.Request(prompt="Talk for a long time.", sampling=ue.SamplingParams(max_tokens=400,
                                                                                            ignore_eos=True)))
    next(h.stream(timeout=30))  # started
    assert h.cancel()
    out = h.result(timeout=10)
    assert out.finish_reason == "cancelled" and len(out.token_ids) < 400
    assert not h.cancel()  # already ended


def test_timeout(engine):
    h = engine.submit(ue.Request(prompt="Talk.", timeout_s=0.05,
                                 sampling=ue.SamplingParams(max_tokens=2000, ignore_eos=True)))
    out = h.result(timeout=10)
    assert out.finish_reason == "timeout"


def test_generate_async(engine):
    async def main():
        return await asyncio.gather(*[engine.generate_async(f"q{i}", sampling=ue.SamplingParams(max_tokens=3))
                                      for i in range(4)])
    outs = asyncio.run(main())
    assert [len(o.token_ids) for o in outs] == [3, 3, 3, 3]


def test_stop_strings_and_stop_ids(engine):
    free = engine.generate("Hello", sampling=ue.SamplingParams(max_tokens=12))
    stop_tok = free.token_ids[3]
    out = engine.generate("Hello", sampling=ue.SamplingParams(max_tokens=12, stop_token_ids=(stop_tok,)))
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:free.token_ids.index(stop_tok) + 1]
    text = free.text
    if len(text) >= 4:
        stop = text[2:4]
        out = engine.generate("Hello", sampling=ue.SamplingParams(max_tokens=12, stop=(stop,)))
        assert out.finish_reason == "stop" and out.text == text[:text.find(stop)]


def test_seeded_sampling_reproduces(engine):
    sp = dict(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    a = engine.generate("Tell a story", sampling=ue.SamplingParams(**sp))
    b = engine.generate("Tell a story", sampling=ue.SamplingParams(**sp))
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("make,err", [
    (lambda t: ue.Request(prompt_token_ids=[1, 2, 10 ** 6]), ue.InvalidRequestError),
    (lambda t: ue.Request(prompt_token_ids=[1, -5]), ue.InvalidRequestError),
    (lambda t: ue.Request(prompt="x" * 5000), ue.PromptTooLongError),
    (lambda t: ue.Request(prompt="look", images=[b"not an image"]), ue.InvalidImageError),
    (lambda t: ue.Request(prompt="look", images=[np.zeros((0, 4, 3), np.uint8)]), ue.InvalidImageError),
    (lambda t: ue.Request(prompt="a", prompt_token_ids=[1]), ue.InvalidRequestError),
    (lambda t: ue.Request(prompt="a", timeout_s=-1), ue.InvalidRequestError),
], ids=["id-out-of-vocab", "negative-id", "too-long", "undecodable-image", "zero-size-image", "both-prompts",
        "negative-timeout"])
def test_bad_requests_fail_alone(engine, make, err):
    good = engine.submit(ue.Request(prompt="fine", sampling=ue.SamplingParams(max_tokens=3)))
    bad = engine.submit(make(engine.tokenizer))
    with pytest.raises(err):
        bad.result(timeout=30)
    assert bad.future.result().finish_reason == "error"
    assert good.result(timeout=30).finish_reason == "length"


@pytest.mark.parametrize("kwargs,match", [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1.0}, "temperature"),
                                          ({"top_p": 0.0}, "top_p")], ids=["max-tokens-0", "neg-temp", "top-p-0"])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ue.SamplingParams(**kwargs)


def test_queue_full_rejects_clearly():
    model, tok = tiny_model()
    eng = ue.Engine(model, tok, ue.EngineConfig(num_kv_blocks=64, max_queue_size=2, max_num_seqs=1))
    try:
        hs = [eng.submit(ue.Request(prompt="hi", sampling=ue.SamplingParams(max_tokens=50, ignore_eos=True)))
              for _ in range(40)]
        outs = [h.future.result(timeout=60) for h in hs]
        rejected = [o for o in outs if isinstance(o.error, ue.QueueFullError)]
        assert rejected and all("max_queue_size=2" in str(o.error) or "full" in str(o.error) for o in rejected)
        assert all(o.finish_reason == "length" for o in outs if o.error is None)
    finally:
        eng.close()


def test_close_cancels_and_joins_fast():
    model, tok = tiny_model()
    eng = ue.Engine(model, tok, ue.EngineConfig(num_kv_blocks=64))
    hs = [eng.submit(ue.Request(prompt="go", sampling=ue.SamplingParams(max_tokens=500, ignore_eos=True)))
          for _ in range(4)]
    time.sleep(0.2)
    t0 = time.monotonic()
    eng.close()
    assert time.monotonic() - t0 < 2.0
    assert all(h.done() and h.future.result().finish_reason in ("cancelled", "length") for h in hs)
    after = eng.submit(ue.Request(prompt="late"))
    with pytest.raises(ue.EngineClosedError):
        after.result(timeout=1)
    assert not eng.core._thread.is_alive() and not any(t.is_alive() for t in eng.router._threads)
    # the KV pool is freed at close, not when the garbage collector gets to the engine's reference cycles
    # (on a GPU a second engine would otherwise find the card full)
    assert eng.runner.cache.k == [] and eng.runner.cache.v == [] and eng.runner.graphs is None
    assert eng.stats()["memory_bytes"]["kv_pool"] > 0  # stats still report the plan


def test_context_manager_and_stats(engine):
    s = engine.stats()
    for key in ("queued", "running", "kv_blocks_free", "decoder_queue_depths", "iteration_latency_s", "memory_bytes"):
        assert key in s
    assert s["memory_bytes"]["kv_pool"] > 0 and s["memory_bytes"]["weights"] > 0


def test_token_ids_outside_the_vocabulary_fail_only_their_request(engine):
    """An out-of-range logit_bias / forced / stop id would break the batched sampling step for every running
    request (a device assert on CUDA): it is an InvalidRequestError on its own request."""
    victim = engine.submit(ue.Request(prompt="Talk.", sampling=ue.SamplingParams(max_tokens=30, ignore_eos=True)))
    vocab = engine.model.cfg.llm.vocab_size
    for sp in (ue.SamplingParams(logit_bias={vocab + 5: 1.0}), ue.SamplingParams(logit_bias={-1: 100.0}),
               ue.SamplingParams(forced_prefix=(vocab,)), ue.SamplingParams(stop_token_ids=(-3,))):
        out = engine.submit(ue.Request(prompt="bad", sampling=sp)).future.result(10)
        assert isinstance(out.error, ue.InvalidRequestError) and "outside the vocabulary" in str(out.error)
    out = victim.result(timeout=60)
    assert out.error is None and len(out.token_ids) == 30
