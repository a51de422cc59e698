"""Super-link insertion in the reference generation loop (DESIGN.md section 1)."""
import pytest
import torch

from unimlm_engine.model import build_model, reference_generate
from unimlm_engine.model.attention import ContiguousKVCache
from unimlm_engine.config.presets import get_preset
from unimlm_engine.sampling import SamplingParams
from unimlm_engine.inputs.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def tiny():
    model = build_model(get_preset("tiny-random"), seed=0, with_decoders=False)
    tok = ByteTokenizer()
    model.special_ids = dict(tok.special_ids)
    return model, tok


def force_first(token_id):
    def proc(step, logits):
        if step == 0:
            logits = torch.full_like(logits, float("-inf"))
            logits[token_id] = 0.0
        return logits
    return proc


@pytest.mark.parametrize("route", ["[DET]", "[SEG]", "[POSE]", "[GEN]", "[EDIT]"])
def test_forced_route_inserts_queries(tiny, route):
    model, tok = tiny
    rid = tok.special_ids[route]
    k = model.cfg.superlink.num_queries(route)
    prompt = tok.encode("USER: find the cat ASSISTANT:", add_bos=True)
    out = reference_generate(model, prompt, params=SamplingParams(max_tokens=3), route_ids={rid: route},
                             logits_processor=force_first(rid))
    assert out.token_ids[0] == rid and len(out.token_ids) == 3
    p = out.payloads[0]
    assert p.route == route and p.token_index == 0
    assert p.payload.shape == (k, model.cfg.llm.hidden_size)
    # KV: prompt, then 1 + K positions for the routed step, then one per later fed token
    # (the last sampled token is never fed).
    assert out.num_kv_positions == len(prompt) + 1 + k + 1

    # By hand: the payload is the final-norm hidden of the K query positions, and the next
    # token comes from the last query position.
    cache = ContiguousKVCache(model.cfg.llm.num_hidden_layers)
    with torch.no_grad():
        model.llm.forward(model.llm.embed(torch.tensor(prompt)), torch.arange(len(prompt)), cache)
        step = torch.cat([model.llm.embed(torch.tensor([rid])), model.query_embeddings(route)])
        hidden = model.llm.forward(step, torch.arange(len(prompt), len(prompt) + 1 + k), cache)
    assert torch.allclose(p.payload, hidden[1:], atol=1e-6)
    assert out.token_ids[1] == int(torch.argmax(model.llm.logits(hidden[-1])))


def test_det_payload_is_four_queries(tiny):
    model, tok = tiny
    out = reference_generate(model, tok.encode("hi"), params=SamplingParams(max_tokens=2),
                             logits_processor=force_first(tok.special_ids["[DET]"]))
    assert out.payloads[0].payload.shape == (4, model.cfg.llm.hidden_size)


def test_routing_token_as_last_token_still_yields_payload(tiny):
    model, tok = tiny
    rid = tok.special_ids["[SEG]"]
    prompt = tok.encode("hi")
    out = reference_generate(model, prompt, params=SamplingParams(max_tokens=1), logits_processor=force_first(rid))
    assert out.token_ids == [rid] and out.finish_reason == "length"
    assert len(out.payloads) == 1 and out.payloads[0].payload.shape == (4, model.cfg.llm.hidden_size)
    assert out.num_kv_positions == len(prompt) + 1 + 4


def test_no_route_without_route_ids(tiny):
    model, tok = tiny
    rid = tok.special_ids["[DET]"]
    out = reference_generate(model, tok.encode("hi"), params=SamplingParams(max_tokens=2), route_ids={},
                             logits_processor=force_first(rid))
    assert out.token_ids[0] == rid and out.payloads == []
