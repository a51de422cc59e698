"""Continuous batching, paging, chunked prefill, prefix sharing and preemption change
nothing: every request's output equals the reference generation run alone (issue 5)."""
import random

import pytest

import unimlm_engine as ue
from engine_helpers import IMAGES, assert_same_as_reference, reference_for, tiny_model


def _requests(tok, n, seed):
    rng = random.Random(seed)
    routes = [["[DET]"], ["[SEG]"], ["[DET]", "[SEG]", "[DET]"], ["[GEN]"], ["[DET]"] + ["[POSE]"] * 17]
    reqs = []
    for i in range(n):
        kind = i % 4
        forced = ()
        if kind == 3:  # routed: force routing tokens (POSE: one class, 17 keypoints)
            forced = tuple(tok.special_ids[r] for r in routes[(i // 4) % len(routes)])
        # requests without an image must not sample a route that needs one (random weights do, now and then)
        no_routes = {tid: -100.0 for tid in tok.route_ids} if kind in (0, 1) else {}
        sp = ue.SamplingParams(max_tokens=rng.randint(len(forced) + 1, len(forced) + 12), forced_prefix=forced,
                               logit_bias=no_routes)
        text = "Tell me about this " + "very " * rng.randint(0, 40) + f"thing number {i}."
        if kind == 1:  # no chat template, ids given directly
            reqs.append(ue.Request(prompt_token_ids=tok.encode(text, add_bos=True), sampling=sp))
        elif kind in (2, 3):
            reqs.append(ue.Request(prompt=text, images=[rng.choice(IMAGES)], sampling=sp))
        else:
            reqs.append(ue.Request(prompt=text, sampling=sp))
    return reqs


@pytest.mark.parametrize("cfg", [
    dict(num_kv_blocks=40, max_num_batched_tokens=64, max_num_seqs=8),     # tiny pool: preemption, chunking
    dict(num_kv_blocks=512, max_num_batched_tokens=4096, max_num_seqs=64),  # roomy: big batches
], ids=["small-pool-chunked", "roomy"])
def test_concurrent_requests_equal_reference(cfg):
    model, tok = tiny_model()
    engine = ue.Engine(model, tok, ue.EngineConfig(**cfg))
    try:
        reqs = _requests(tok, 24, seed=len(cfg))
        outs = engine.generate_batch(reqs)
        stats = engine.stats()
        for req, out in zip(reqs, outs):
            assert_same_as_reference(out, reference_for(engine, req))
            routed = [p.route for p in out.payloads]
            assert [t.route for t in out.tasks] == sorted(set(routed), key=["[DET]", "[GRD]", "[SEG]", "[POSE]",
                                                                              "[GEN]", "[EDIT]"].index)
            assert all(t.error is None for t in out.tasks), [t.error for t in out.tasks]
        assert stats["kv_blocks_free"] == cfg["num_kv_blocks"]
        if cfg["num_kv_blocks"] == 40:
            assert stats["preemptions"] > 0  # the path was really exercised
        assert any(o.num_cached_tokens > 0 for o in outs) or stats["kv_blocks_cached"] > 0
    finally:
        engine.close()


def test_prefix_sharing_reuses_image_and_system_prompt_blocks():
    model, tok = tiny_model()
    engine = ue.Engine(model, tok, ue.EngineConfig(num_kv_blocks=128))
    try:
        sp = ue.SamplingParams(max_tokens=6)
        first = engine.generate("What is this?", images=[IMAGES[1]], sampling=sp)
        same = engine.generate("What is this?", images=[IMAGES[1]], sampling=sp)
        other_image = engine.generate("What is this?", images=[IMAGES[2]], sampling=sp)
        assert first.num_cached_tokens == 0
        # everything but the last prompt token can come from the cache
        assert same.num_cached_tokens >= (same.prompt_len - 1) // 16 * 16 - 16 and same.num_cached_tokens > 0
        assert same.token_ids == first.token_ids
        # a different image shares only the system prompt before the image tokens
        p = engine.intake.processor("What is this?", [IMAGES[2]])
        assert 0 < other_image.num_cached_tokens <= p.image_spans[0][0]
        req = ue.Request(prompt="What is this?", images=[IMAGES[2]], sampling=sp)
        assert_same_as_reference(other_image, reference_for(engine, req))
    finally:
        engine.close()
