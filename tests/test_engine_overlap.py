"""Overlapped scheduling (issue 12): step N+1 is launched before the host reads step N's tokens. The
paths that only exist because of that (a *sampled* routing token whose queries go in one step late, a
request that ended while its next step was already in flight, placeholders across preemption) give
the same tokens and payloads as the reference generation run alone."""
import random

import pytest

import unimlm_engine as ue
from engine_helpers import IMAGES, assert_same_as_reference, reference_for, tiny_model


def _sampled_route_requests(tok, n, seed):
    """Routing tokens the model samples itself (a logit bias, not forced_prefix), greedy and seeded."""
    rng = random.Random(seed)
    sid = tok.special_ids
    reqs = []
    for i in range(n):
        route = rng.choice(["[DET]", "[SEG]", "[GEN]"])
        bias = {sid[route]: rng.choice([8.0, 60.0])}  # 60: every token routes; 8: some do
        sp = ue.SamplingParams(max_tokens=rng.randint(2, 7), logit_bias=bias,
                               temperature=rng.choice([0.0, 0.0, 0.8]), seed=i, top_k=rng.choice([0, 20]))
        text = f"Request {i}: " + "more " * rng.randint(0, 30)
        reqs.append(ue.Request(prompt=text, images=[IMAGES[i % 4]] if i % 3 == 0 else None, sampling=sp))
    return reqs


@pytest.mark.parametrize("cfg", [
    dict(num_kv_blocks=48, max_num_batched_tokens=64, max_num_seqs=8),  # preemption + chunking with placeholders
    dict(num_kv_blocks=512, max_num_batched_tokens=4096, max_num_seqs=64, output_thread=True),
], ids=["small-pool", "roomy-output-thread"])
def test_sampled_routing_tokens_equal_reference(cfg):
    model, tok = tiny_model()
    engine = ue.Engine(model, tok, ue.EngineConfig(**cfg))
    try:
        reqs = _sampled_route_requests(tok, 20, seed=len(cfg))
        outs = engine.generate_batch(reqs)
        routed = 0
        for req, out in zip(reqs, outs):
            assert_same_as_reference(out, reference_for(engine, req))
            routed += len(out.payloads)
            # a routing token as the last token: its queries still ran, then the request ended
            if out.token_ids and out.token_ids[-1] in tok.route_ids:
                assert out.payloads[-1].token_index == len(out.token_ids) - 1
        assert routed > 10
        stats = engine.stats()
        assert stats["kv_blocks_free"] == cfg["num_kv_blocks"]
        if cfg["num_kv_blocks"] == 48:
            assert stats["preemptions"] > 0
    finally:
        engine.close()


def test_stop_while_next_step_in_flight():
    """EOS / stop ids / max_tokens end a request whose next step was already launched: nothing of that
    step leaks into the output, and its KV blocks come back."""
    model, tok = tiny_model()
    engine = ue.Engine(model, tok, ue.EngineConfig(num_kv_blocks=128))
    try:
        free = engine.generate("Count with me", sampling=ue.SamplingParams(max_tokens=10, ignore_eos=True))
        for k in range(1, 10):
            stop_id = free.token_ids[k]
            sp = ue.SamplingParams(max_tokens=10, stop_token_ids=(stop_id,), ignore_eos=True)
            out = engine.generate("Count with me", sampling=sp)
            assert out.token_ids == free.token_ids[:free.token_ids.index(stop_id) + 1]
        assert engine.stats()["kv_blocks_free"] == 128
    finally:
        engine.close()


def test_decode_graph_path_reads_placeholders_on_device():
    """The bucketed static-buffer decode (the CUDA-graph path, run eagerly here) takes the in-flight step's
    samples from the device tensor: the same tokens as the reference, and the path really ran."""
    from unimlm_engine.engine.cuda_graphs import DecodeGraphRunner
    from unimlm_engine.engine.paged_attention import PagedAttention

    model, tok = tiny_model()
    engine = ue.Engine(model, tok, ue.EngineConfig(num_kv_blocks=256))
    runner = engine.runner
    graphs = DecodeGraphRunner(model.llm, PagedAttention(runner.cache), (1, 2, 4, 8), 512, capture=False)
    calls = []
    run = graphs.run
    graphs.run = lambda *a, **k: calls.append(a[4] if len(a) > 4 else k.get("device_ids")) or run(*a, **k)
    runner.graphs = graphs
    try:
        reqs = [ue.Request(prompt=f"Graph path {i}", sampling=ue.SamplingParams(max_tokens=9, ignore_eos=True))
                for i in range(5)]
        for req, out in zip(reqs, engine.generate_batch(reqs)):
            assert_same_as_reference(out, reference_for(engine, req))
        assert sum(c is not None for c in calls) > 5  # steps whose ids came from the device
    finally:
        engine.close()
