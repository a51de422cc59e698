"""The route registry as the unit of extension (issue 11): a new route is one RouteSpec plus one
TaskDecoder class, and the engine serves it; everything route-specific derives from the registry."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import unimlm_engine as ue
from engine_helpers import IMAGES, assert_same_as_reference, reference_for
from unimlm_engine.checkpoint.pretrained import load_pretrained
from unimlm_engine.config import ConfigError, SuperLinkConfig
from unimlm_engine.inputs.tokenizer import ByteTokenizer
from unimlm_engine.model.decoders.base import TaskDecoder, unregister_decoder
from unimlm_engine.routes import (RouteError, RouteSpec, all_routes, get_route, query_tables, register_route,
                                  route_tokens, special_tokens, unregister_route)


@dataclass
class ToyResult:
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


@pytest.fixture
def toy_route():
    """What a developer writes to add a route: one spec, one decoder class. Removed again afterwards."""
    spec = register_route(RouteSpec("[TOY]", table="toy", num_queries="num_embs", decoder="toy"))

    class ToyDecoder(TaskDecoder):
        """One box per group: a linear map of the mean payload, scaled to the image."""

        name = "toy"

        def __init__(self, hidden: int):
            super().__init__()
            self.head = nn.Linear(hidden, 5)

        @classmethod
        def from_model_config(cls, cfg):
            return cls(cfg.llm.hidden_size)

        def run(self, route, inputs, options, tensor_forward=None):
            out = []
            for inp in inputs:
                h = self.head(torch.stack(inp.payloads).mean(1).float()).sigmoid()  # [G, 5]
                size = torch.tensor([inp.image.width, inp.image.height] * 2, dtype=h.dtype)
                out.append(ToyResult(h[:, :4] * size, h[:, 4], torch.arange(len(inp.payloads))))
            return out

    yield spec, ToyDecoder
    unregister_route("[TOY]")
    unregister_decoder("toy")


def test_new_route_served_through_engine(toy_route):
    spec, toy_cls = toy_route
    model, tok = load_pretrained("tiny-random", device="cpu")  # built while [TOY] is registered
    assert tok.special_ids["[TOY]"] == tok.vocab_size - 1 == model.cfg.llm.vocab_size - 1  # appended: no id moved
    assert model.query_table("toy").shape == (4, model.cfg.llm.hidden_size)
    assert isinstance(model.decoders.toy, toy_cls)
    toy = tok.special_ids["[TOY]"]
    engine = ue.Engine(model, tok, ue.EngineConfig(num_kv_blocks=128))
    try:
        reqs = [ue.Request(prompt="Find it.", images=[IMAGES[i]],
                           sampling=ue.SamplingParams(max_tokens=4, forced_prefix=(toy,) * (i + 1)))
                for i in range(3)]
        outs = engine.generate_batch(reqs)
        for req, out in zip(reqs, outs):
            assert_same_as_reference(out, reference_for(engine, req))
            (task,) = [t for t in out.tasks if t.route == "[TOY]"]
            assert task.error is None and task.backend == "eager" and task.kind == "detection"
            assert task.num_groups == out.token_ids.count(toy) >= len(req.sampling.forced_prefix)
            want = model.decoders.toy.run(spec, [_input(out, req)], {})[0]
            torch.testing.assert_close(task.boxes, want.boxes)
            js = task.to_json()
            assert js["name"] == "toy" and len(js["boxes"]) == task.num_groups
    finally:
        engine.close()


def _input(out, req):
    from unimlm_engine.inputs.processor import load_image
    from unimlm_engine.model.decoders import DecoderInput

    return DecoderInput([p.payload for p in out.payloads if p.route == "[TOY]"],
                        load_image(req.images[0]).convert("RGB"))


def test_registry_drives_tables_tokens_and_k(toy_route):
    assert route_tokens()[-1] == "[TOY]" and special_tokens()[-1] == "[TOY]"
    assert query_tables() == {"det": "num_embs", "pose": "num_embs", "gen": "num_embs_gen", "edit": "num_embs_gen",
                              "toy": "num_embs"}
    assert SuperLinkConfig(num_embs=3).num_queries("[TOY]") == 3 == SuperLinkConfig(num_embs=3).num_queries("toy")
    assert ByteTokenizer().route_ids[ByteTokenizer().special_ids["[TOY]"]] == "[TOY]"


def test_builtin_routes():
    assert [s.token for s in all_routes()] == ["[DET]", "[GRD]", "[SEG]", "[POSE]", "[GEN]", "[EDIT]"]
    assert get_route("pose").requires == ("[DET]", "[GRD]") and get_route("[SEG]").options["with_masks"]
    assert {get_route(r).decoder for r in ("det", "grd", "seg")} == {"gdino"}
    assert get_route("[GEN]").prompt_query_tokens(3) == ("[EMB]",) * 3
    assert get_route("[DET]").prompt_query_tokens(4) == ("[EMB]", "[EMB2]", "[EMB3]", "[EMB4]")


@pytest.mark.parametrize("spec,match", [
    (dict(token="DET2", table="det", num_queries="num_embs", decoder="gdino"), "look like"),
    (dict(token="[X]", table="det", num_queries="num_embs_gen", decoder="gdino"), "table 'det' has K"),
    (dict(token="[X]", table="x", num_queries="num_embs", decoder="d", requires=("[NOPE]",)), "unknown routes"),
    (dict(token="[X]", table="x", num_queries="nope", decoder="d"), "num_queries"),
    (dict(token="[X]", table="x", num_queries="num_embs", decoder="d", result="text"), "result"),
    (dict(token="[DET]", table="det", num_queries="num_embs", decoder="gdino"), "already registered"),
], ids=["bad-token", "table-k-clash", "unknown-requires", "bad-k-field", "bad-result", "duplicate"])
def test_bad_specs(spec, match):
    with pytest.raises(RouteError, match=match):
        register_route(RouteSpec(**spec))


def test_unknown_route_errors():
    with pytest.raises(RouteError, match="unknown route 'FOO'; routes: DET, GRD"):
        get_route("FOO")
    with pytest.raises(ConfigError, match="unknown route"):
        SuperLinkConfig().num_queries("[FOO]")
    with pytest.raises(RouteError, match="built-in"):
        unregister_route("[DET]")


def test_a_super_link_route_cannot_take_a_span_route_name():
    from unimlm_engine.routes import RouteError, RouteSpec, register_route

    with pytest.raises(RouteError, match="already registered"):
        register_route(RouteSpec("[BOX]", table="det", num_queries="num_embs", decoder="gdino"))
