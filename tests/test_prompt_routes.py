"""Routing tokens already in the prompt get their K query positions at prefill (issue 11): the engine's
marker path (intake + runner) equals the reference generation, for both prompt spellings (bare routing
token: K positions inserted; routing token followed by its [EMB] tokens: those positions replaced)."""
import numpy as np
import pytest

import unimlm_engine as ue
from engine_helpers import IMAGES, assert_same_as_reference, reference_for, tiny_model
from unimlm_engine.engine.superlink import SuperLinks


@pytest.fixture(scope="module")
def engine():
    model, tok = tiny_model()
    eng = ue.Engine(model, tok, ue.EngineConfig(num_kv_blocks=256, max_num_batched_tokens=48))
    yield eng
    eng.close()


EMB4 = "[EMB][EMB2][EMB3][EMB4]"
PROMPTS = {
    "bare-det": "USER: find the cat ASSISTANT: cat[DET], dog[DET]</s>USER: and now? ASSISTANT:",
    "spelled-det": f"USER: find the cat ASSISTANT: cat[DET]{EMB4}, dog[DET]{EMB4}</s>USER: more ASSISTANT:",
    "mixed-routes": f"cat[DET]{EMB4} person[DET] nose[POSE] eye[POSE]{EMB4} seg[SEG] draw[GEN]" + "[EMB]" * 8,
    "gen-partial-spelling": "draw[GEN][EMB][EMB] it",  # 2 of K=8 [EMB]: not the spelling, 8 inserted
}


@pytest.mark.parametrize("name", list(PROMPTS), ids=list(PROMPTS))
def test_prompt_routes_equal_reference(engine, name):
    tok = engine.tokenizer
    ids = tok.encode(PROMPTS[name], add_bos=True)
    seg = (tok.special_ids["[SEG]"],)
    reqs = [ue.Request(prompt_token_ids=ids, sampling=ue.SamplingParams(max_tokens=6)),
            ue.Request(prompt=PROMPTS[name], images=[IMAGES[1]], sampling=ue.SamplingParams(max_tokens=6)),
            ue.Request(prompt_token_ids=ids, sampling=ue.SamplingParams(max_tokens=4, forced_prefix=seg)),
            # the same ids again, now asking for the prompt's payloads: the prefix cache holds the
            # prompt's KV but not its hidden states, so the query positions must be computed again
            ue.Request(prompt_token_ids=ids, run_prompt_routes=True,
                       sampling=ue.SamplingParams(max_tokens=4, forced_prefix=seg))]
    outs = engine.generate_batch(reqs[:3])
    outs.append(engine.generate_batch(reqs[3:])[0])
    n_prompt = sum(tid in tok.route_ids for tid in ids)
    for req, out in zip(reqs, outs):
        assert_same_as_reference(out, reference_for(engine, req))
        sources = [p.source for p in out.payloads]
        assert sources[:n_prompt] == (["prompt"] * n_prompt if req.run_prompt_routes else sources[:n_prompt])
        assert "prompt" not in sources or req.run_prompt_routes
    first = min(i for i, t in enumerate(ids) if t in tok.route_ids)
    if first >= 2 * engine.config.block_size:  # whole blocks before the first query still come from the cache
        assert 0 < outs[3].num_cached_tokens <= first + 1
    assert [p.token_index for p in outs[3].payloads if p.source == "prompt"] == \
        [i for i, t in enumerate(ids) if t in tok.route_ids]
    assert [t.route for t in outs[2].tasks] == ["[SEG]"]  # prompt routes are not decoded by default


def test_spelled_queries_replace_bare_ones_insert(engine):
    tok, links = engine.tokenizer, SuperLinks(engine.model)
    det = tok.special_ids["[DET]"]
    spelled = tok.encode(f"a[DET]{EMB4}b")
    out, pending, where = links.expand_prompt(spelled)
    assert len(out) == len(spelled) and out[2:6] == links.markers("[DET]") and pending[0].start == 2
    bare = tok.encode("a[DET]b")
    out, pending, where = links.expand_prompt(bare)
    assert out == bare[:2] + links.markers("[DET]") + bare[2:]
    assert list(where) == [0, 1, 6] and pending[0].token_index == 1 and pending[0].rows.shape[0] == 4
    assert det in out


def test_image_positions_move_with_inserted_queries(engine):
    """A routing token before the image shifts the image's positions: features still land on them."""
    req = ue.Request(prompt="[DET] then <image> what is it?", images=[IMAGES[0]], chat=False,
                     sampling=ue.SamplingParams(max_tokens=5))
    out = engine.generate_batch([req])[0]
    assert_same_as_reference(out, reference_for(engine, req))
    seq_ids = engine.intake.processor(req.prompt, [IMAGES[0]], chat=False).input_ids.tolist()
    assert out.prompt_len == len(seq_ids) + 4


def test_run_prompt_routes_decodes_them(engine):
    tok = engine.tokenizer
    ids = tok.encode(f"USER: <image> detect cat, dog ASSISTANT: cat[DET]{EMB4}, dog[DET]{EMB4}", add_bos=True)
    req = ue.Request(prompt_token_ids=ids, images=[IMAGES[0]], run_prompt_routes=True,
                     sampling=ue.SamplingParams(max_tokens=1))
    out = engine.generate_batch([req])[0]
    assert out.error is None and [t.route for t in out.tasks] == ["[DET]"]
    assert out.tasks[0].num_groups == 2 and out.tasks[0].error is None
    groups = [p.payload for p in out.payloads if p.source == "prompt"]
    direct = engine.model.decoders.run_decoder("[DET]", [groups], [_image(IMAGES[0])])[0]
    np.testing.assert_allclose(out.tasks[0].boxes.numpy(), direct.boxes.numpy(), rtol=1e-5, atol=1e-4)


def _image(path):
    from unimlm_engine.inputs.processor import load_image

    return load_image(path)
