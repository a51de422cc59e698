"""Span routes end to end (issue 15): forced text holding each span kind goes through the engine of the
tiny-unified preset; each expert's result is checked against the library run directly (SAM masks inside
their boxes, GLIGEN, InstructPix2Pix, Stable Diffusion), calls are batched across requests, results
stream while the text goes on, and every bad span yields an error TaskResult while the request and the
engine go on."""
import functools
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import unimlm_engine as ue
from unimlm_engine.checkpoint.pretrained import load_pretrained
from unimlm_engine.model.decoders import DecoderInput
from unimlm_engine.outputs.schema import rle_to_mask
from unimlm_engine.engine.spans import parse_box
from unimlm_engine.routes import get_span_route

IMG = (np.arange(40 * 48 * 3) % 251).astype(np.uint8).reshape(40, 48, 3)  # H=40, W=48
SEG = "Here: <IMGSEG>dog</IMGSEG><BOX>dog:[0.188, 0.3, 0.594, 0.944]</BOX> <BOX>cat:[0.5, 0, 1, 0.5]</BOX> ok"
LAYOUT = "<LAYOUTGEN>a dog and a cat</LAYOUTGEN> <BOX>dog:[0.1,0.1,0.5,0.5]</BOX><BOX>cat:[0.5,0.5,0.9,0.9]</BOX>."
EDIT = "Done: <IMGEDIT>make it snow</IMGEDIT>."
GEN = "<IMGGEN>a red car</IMGGEN>"
EDIT_BOX = "<IMGEDIT>add a t-shirt</IMGEDIT><BOX>t-shirt:[0.226, 0.193, 0.758, 0.615]</BOX>"


@functools.lru_cache(maxsize=1)
def unified():
    return load_pretrained("tiny-unified", device="cpu")


@pytest.fixture(scope="module")
def engine():
    model, tok = unified()
    eng = ue.Engine(model, tok, ue.EngineConfig(decoder_max_batch_size=8, decoder_max_queue_delay_ms=300))
    yield eng
    eng.close()


def _request(tok, text, image=True, extra=0, seed=0):
    ids = tok.encode(text)
    return ue.Request(prompt="answer", images=[IMG] if image else None,
                      sampling=ue.SamplingParams(max_tokens=len(ids) + extra, forced_prefix=tuple(ids),
                                                 ignore_eos=True, seed=seed))


def _expert(name):
    model, _ = unified()
    return model.decoders.decoder_for(get_span_route(name))


def _pixels(box, w=48, h=40):
    return np.array(box, dtype=np.float64) * [w, h, w, h]


def _same_image(a, b, what):
    a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert a.shape == b.shape, what
    assert np.abs(a - b).max() <= 2, what  # batched vs single-request UNet calls: float rounding only


def test_each_expert_batched_across_requests(engine):
    """8 concurrent requests, two of each image kind plus SAM ones; every result equals the library's own
    output for that span, and the span calls were batched."""
    model, tok = unified()
    texts = [SEG, LAYOUT, EDIT, GEN, SEG, GEN, EDIT, EDIT_BOX]
    handles = [engine.submit(_request(tok, t, seed=i)) for i, t in enumerate(texts)]
    outs = [h.result(timeout=120) for h in handles]
    for t, o in zip(texts, outs):
        assert o.text == t and o.finish_reason == "length"
        assert len(o.spans) == 1 and o.spans[0].error is None, o.spans[0].error
    sizes = engine.stats()["decoder_mean_batch_size"]
    assert sizes["span-imggen"] == 2 and sizes["span-imgseg"] == 2 and sizes["span-imgedit"] == 2, sizes

    seg = outs[0].spans[0]
    assert seg.route == "imgseg" and seg.span == (SEG.index("<IMGSEG>"), SEG.index(" ok")) and seg.span_text == "dog"
    assert seg.phrases == ["dog", "cat"] and seg.masks.shape == (2, 40, 48)
    boxes = [(0.188, 0.3, 0.594, 0.944), (0.5, 0.0, 1.0, 0.5)]
    np.testing.assert_allclose(seg.boxes.numpy(), [_pixels(b) for b in boxes], rtol=1e-6)
    sam, proc = _expert("imgseg").model  # reference: transformers' SAM on the same boxes, then the box
    with torch.no_grad():
        enc = proc(images=[IMG], input_boxes=[[_pixels(b).tolist() for b in boxes]], return_tensors="pt")
        ref = proc.image_processor.post_process_masks(sam(**enc, multimask_output=False).pred_masks,
                                                      enc["original_sizes"], enc["reshaped_input_sizes"])[0][:, 0]
    ys, xs = np.mgrid[0:40, 0:48] + 0.5
    for i, b in enumerate(boxes):
        x1, y1, x2, y2 = _pixels(b)
        inside = (xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2)
        got = seg.masks[i].numpy()
        assert not (got & ~inside).any(), "mask pixels outside the box"
        np.testing.assert_array_equal(got, ref[i].numpy() & inside)
    js = outs[0].to_json()["spans"][0]
    assert js["span"] == {"start": seg.span[0], "end": seg.span[1], "text": "dog"} and js["kind"] == "segmentation"
    np.testing.assert_array_equal(rle_to_mask(js["masks"][1]), seg.masks[1].numpy())

    for i, name in ((1, "layoutgen"), (2, "imgedit"), (3, "imggen"), (7, "imgedit_box")):
        sp = outs[i].spans[0]
        assert sp.route == name and len(sp.images) == 1 and sp.raw.seeds == [i + sp.span[0]]
        box_text = texts[i][sp.span[0]:sp.span[1]]
        boxes = [parse_box(b.split("</BOX>")[0]) for b in box_text.split("<BOX>")[1:]]
        inp = DecoderInput([], image=Image.fromarray(IMG) if name.startswith("imgedit") else None,
                           seed=sp.raw.seeds[0], text=sp.span_text, boxes=[b for _, b in boxes],
                           phrases=[lb for lb, _ in boxes])
        ref = _expert(name).run(get_span_route(name), [inp], {})[0]  # alone, unbatched
        _same_image(sp.images[0], ref.images[0], name)
    assert outs[2].spans[0].images[0].size[1] == 40 and outs[7].spans[0].images[0].size == (48, 40)


def test_results_stream_while_text_goes_on(engine):
    """A span early in a long text: its expert starts before the last token, and its TaskResult event
    comes in the stream before the final event."""
    model, tok = unified()
    starts = []
    seg = _expert("imgseg")
    run = seg.run

    def timed(*a, **k):
        starts.append(time.monotonic())
        return run(*a, **k)

    seg.run = timed
    try:
        t0 = time.monotonic()
        h = engine.submit(_request(tok, SEG, extra=300))
        events = list(h.stream(timeout=60))
    finally:
        del seg.run
    out = events[-1].output
    assert out.finish_reason == "length" and len(out.token_ids) == len(tok.encode(SEG)) + 300
    last_token = t0 + out.time_to_first_token_s + out.time_per_output_token_s * (len(out.token_ids) - 1)
    assert starts and starts[0] < last_token, "the expert ran only after the text was done"
    kinds = ["task" if e.task is not None else "end" if e.finished else "text" for e in events]
    assert kinds.count("task") == 1 and kinds.index("task") < kinds.index("end")
    assert "".join(e.text for e in events) == out.text


def test_bad_spans_are_error_results(engine):
    """Each bad-span case: the text is kept, the span has a clear error, the request ends normally and
    the other spans of the same request still run."""
    model, tok = unified()
    cases = [
        ("<IMGSEG>dog", True, "still open at the end of the text"),
        ("<IMGSEG>dog</IMGSEG><BOX>dog:[0.1, 0.2, 0.3]</BOX>", True, "expected 4 coordinates"),
        ("<IMGSEG>dog</IMGSEG><BOX>dog:[0.1, x, 0.3, 0.4]</BOX>", True, "coordinates must be numbers"),
        ("<IMGSEG>dog</IMGSEG><BOX>dog:[0.1, 0.2, 1.5, 0.4]</BOX>", True, "coordinates must be in [0, 1]"),
        ("<IMGSEG>dog</IMGSEG><BOX>dog:[0.6, 0.2, 0.3, 0.4]</BOX>", True, "needs x1 <= x2"),
        ("<IMGFOO>paint it</IMGFOO>", True, "unknown task token <IMGFOO>"),
        ("<IMGEDIT>make it snow</IMGEDIT>", False, "needs an input image and the request has none"),
        ("<IMGSEG>dog</IMGSEG> no box", True, "<IMGSEG> needs at least one <BOX>"),
    ]
    handles = [engine.submit(_request(tok, t + " <IMGGEN>ok</IMGGEN>", image=img)) for t, img, _ in cases]
    for (text, _, error), h in zip(cases, handles):
        out = h.result(timeout=120)
        assert out.text == text + " <IMGGEN>ok</IMGGEN>" and out.finish_reason == "length"
        bad = [s for s in out.spans if s.error is not None]
        assert len(bad) == 1 and error in str(bad[0].error), (text, [str(s.error) for s in out.spans])
        assert bad[0].span[0] == 0 and "error" in bad[0].to_json()
        if "<BOX>" in text:  # a malformed box still names the route its span asked for
            assert bad[0].route == "imgseg" and bad[0].kind == "segmentation"
        if "still open" not in error:  # the span after it ran
            assert out.spans[-1].route == "imggen" and out.spans[-1].error is None
    # the engine goes on
    assert engine.submit(_request(tok, GEN)).result(timeout=60).spans[0].error is None


def test_expert_that_raises_fails_only_its_span(engine):
    model, tok = unified()
    gen = _expert("imggen")
    run = gen.run

    def flaky(route, inputs, options, tensor_forward=None):
        if any("boom" in i.text for i in inputs):
            raise RuntimeError("boom in the expert")
        return run(route, inputs, options)

    gen.run = flaky
    try:
        hs = [engine.submit(_request(tok, t)) for t in ("<IMGGEN>boom</IMGGEN>", GEN, GEN)]
        outs = [h.result(timeout=60) for h in hs]
    finally:
        del gen.run
    assert "imggen expert failed: RuntimeError: boom in the expert" in str(outs[0].spans[0].error)
    assert outs[0].finish_reason == "length" and outs[0].text == "<IMGGEN>boom</IMGGEN>"
    assert all(o.spans[0].error is None and o.spans[0].images for o in outs[1:])


def test_concurrent_submitters_each_end_once(engine):
    model, tok = unified()
    texts = [SEG, GEN, "<IMGSEG>x", EDIT, "<BOX>dog:[0.1, 0.1, 0.4, 0.4]</BOX>"]
    handles, lock = [], threading.Lock()

    def worker(w):
        for i in range(4):
            h = engine.submit(_request(tok, texts[(w + i) % len(texts)]))
            with lock:
                handles.append(h)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outs = [h.result(timeout=120) for h in handles]
    assert all(o.finish_reason == "length" and len(o.spans) == 1 for o in outs)
    box = [o for o in outs if o.text.startswith("<BOX>")][0].spans[0]
    assert box.route == "box" and box.error is None
    np.testing.assert_allclose(box.boxes.numpy(), [[4.8, 4.0, 19.2, 16.0]], rtol=1e-5)


def test_stop_string_cuts_spans_and_lora_moe_llm_matches_reference(engine):
    """A stop string ends the text: only spans before it run. And the tiny-unified LLM (LoRA-MoE FFN
    through the fused op) served by the engine gives the reference generation's tokens."""
    from engine_helpers import assert_same_as_reference, reference_for

    model, tok = unified()
    ids = tok.encode("<IMGGEN>a car</IMGGEN> END <IMGGEN>a boat</IMGGEN>")
    out = engine.submit(ue.Request(prompt="go", sampling=ue.SamplingParams(
        max_tokens=len(ids), forced_prefix=tuple(ids), stop=["END"]))).result(timeout=60)
    assert out.text == "<IMGGEN>a car</IMGGEN> " and out.finish_reason == "stop"
    assert [(s.route, s.span_text, s.error) for s in out.spans] == [("imggen", "a car", None)]
    req = ue.Request(prompt="Describe the image.", images=[IMG], sampling=ue.SamplingParams(max_tokens=12))
    assert_same_as_reference(engine.submit(req).result(timeout=60), reference_for(engine, req))
