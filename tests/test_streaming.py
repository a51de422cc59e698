"""What handle.stream() yields is what RequestOutput.text says (issue 11): deltas concatenate to the final
text, including characters the detokenizer holds back until the end and text a stop string cuts."""
import random

import pytest

import unimlm_engine as ue
from engine_helpers import IMAGES, tiny_model


@pytest.fixture(scope="module", params=[False, True], ids=["inline-output", "output-thread"])
def engine(request):
    model, tok = tiny_model()
    eng = ue.Engine(model, tok, ue.EngineConfig(num_kv_blocks=256, output_thread=request.param))
    yield eng
    eng.close()


def _streamed(handle):
    events = list(handle.stream(timeout=60))
    assert events[-1].finished
    return "".join(e.text for e in events[:-1]), events


def test_readme_stream_example_yields_final_text(engine):
    """The README's stream example, verbatim in substance."""
    handle = engine.submit(ue.Request(prompt="Find the cup.", images=["examples/images/coffee.png"],
                                      sampling=ue.SamplingParams(max_tokens=8, forced_prefix=(
                                          engine.tokenizer.special_ids["[DET]"],)),
                                      priority=0, timeout_s=30))
    text, events = _streamed(handle)
    result = handle.result()
    assert text == result.text
    assert [e.task.route for e in events if e.task is not None] == ["[DET]"]
    assert result.tasks[0].boxes.shape[-1] == 4 and result.payloads[0].payload.shape == (4, 256)


def test_held_back_bytes_are_streamed_before_the_end(engine):
    """The byte tokenizer emits partial UTF-8 sequences; an unfinished one is flushed as a last delta."""
    flushed = 0
    for i in range(12):
        h = engine.submit(ue.Request(prompt=f"Say {i}", sampling=ue.SamplingParams(max_tokens=7, temperature=1.0,
                                                                                    seed=i, ignore_eos=True)))
        text, events = _streamed(h)
        out = h.result()
        assert text == out.text
        flushed += bool(events[-2].text) and not events[-2].token_ids  # the end-of-text delta carried text
    assert flushed > 0, "no request ended with held-back bytes; the flush path was not exercised"


def test_stop_strings_never_stream_cut_text(engine):
    rng = random.Random(0)
    checked = 0
    for i in range(10):
        prompt = f"Tell me about item {i}."
        free = engine.generate(prompt, sampling=ue.SamplingParams(max_tokens=16, ignore_eos=True))
        text = free.text
        if len(text) < 6:
            continue
        a = rng.randrange(1, len(text) - 3)
        stop = text[a:a + rng.randint(2, 4)]
        h = engine.submit(ue.Request(prompt=prompt, sampling=ue.SamplingParams(max_tokens=16, ignore_eos=True,
                                                                               stop=(stop, "\x00never"))))
        streamed, _ = _streamed(h)
        out = h.result()
        assert out.finish_reason == "stop" and out.text == text[:text.find(stop)]
        assert streamed == out.text
        checked += 1
    assert checked >= 5


def test_cancelled_request_streams_its_partial_text(engine):
    h = engine.submit(ue.Request(prompt="Go on.", images=[IMAGES[0]],
                                 sampling=ue.SamplingParams(max_tokens=500, ignore_eos=True)))
    it = h.stream(timeout=60)
    first = next(it)
    h.cancel()
    rest = list(it)
    out = h.result()
    assert out.finish_reason == "cancelled" and rest[-1].finished
    assert first.text + "".join(e.text for e in rest[:-1]) == out.text


def test_a_token_the_detokenizer_rejects_fails_only_its_request(engine, monkeypatch):
    """One request's output error (here: its detokenizer raises on one id, as a tokenizer smaller than the
    model's vocabulary would) ends that request with an EngineError and the text streamed so far; the
    requests decoded in the same steps lose no token and no text."""
    from unimlm_engine.inputs import detokenizer

    bad = engine.tokenizer.encode("Z", add_bos=False)[-1]
    real_step = detokenizer._ByteDecoder.step

    def step(self, tok):
        if tok == bad:
            raise IndexError(f"test: id {tok} cannot be decoded")
        return real_step(self, tok)

    monkeypatch.setattr(detokenizer._ByteDecoder, "step", step)
    ab = engine.tokenizer.encode("ab", add_bos=False)
    victim = engine.submit(ue.Request(prompt="one", sampling=ue.SamplingParams(
        max_tokens=12, ignore_eos=True, forced_prefix=(*ab, bad))))
    mates = [engine.submit(ue.Request(prompt=f"two {i}", sampling=ue.SamplingParams(
        max_tokens=12, ignore_eos=True, logit_bias={bad: -1e4}))) for i in range(3)]
    streamed, _ = _streamed(victim)
    assert streamed == "ab"
    with pytest.raises(ue.EngineError, match="output processing failed at token"):
        victim.result(timeout=60)
    for h in mates:
        text, _ = _streamed(h)
        out = h.result(timeout=60)
        assert out.error is None and len(out.token_ids) == 12
        assert text == out.text == engine.tokenizer.decode(out.token_ids)
