"""Shared pieces of the engine tests."""
import functools

import torch

from unimlm_engine.model import reference_generate
from unimlm_engine.checkpoint.pretrained import load_pretrained
from unimlm_engine.inputs.processor import load_image

IMAGES = ["examples/images/chelsea.png", "examples/images/coffee.png", "examples/images/astronaut.png",
          "examples/images/rocket.jpg"]


@functools.lru_cache(maxsize=1)
def tiny_model():
    """The tiny preset (fp32, CPU), decoders included; built once per test session."""
    return load_pretrained("tiny-random", device="cpu")


def reference_for(engine, request):
    """The foundation's reference generation for one request, run alone."""
    proc = engine.intake.processor
    if request.prompt is not None:
        p = proc(request.prompt, request.images, chat=request.chat)
        ids, pixels = p.input_ids, p.pixel_values
    else:
        images = [load_image(i) for i in (request.images or [])]
        ids, _, pixels, _ = engine.intake._from_ids(request.prompt_token_ids, images)
    ref = reference_generate(engine.model, ids, pixels, params=request.sampling)
    if not request.run_prompt_routes:  # the engine returns prompt-side payloads only when asked to
        ref.payloads = [p for p in ref.payloads if p.source == "generated"]
    return ref


def assert_same_as_reference(out, ref):
    assert out.error is None, out.error
    assert out.token_ids == ref.token_ids
    assert [p.route for p in out.payloads] == [p.route for p in ref.payloads]
    for a, b in zip(out.payloads, ref.payloads):
        assert a.token_index == b.token_index
        torch.testing.assert_close(a.payload, b.payload, atol=1e-4, rtol=1e-4)
