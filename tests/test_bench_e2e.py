"""The HF-transformers serial baseline of benchmarks/bench_e2e.py equals our reference
generation and the engine on tiny requests (issue 7): the correctness check the end-to-end
benchmark relies on before it reports any speedup."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from baselines.hf_serial import BaselineOutput, HFLoRAMoELinear, HFSerialBaseline  # noqa: E402
from bench_e2e import compare  # noqa: E402
from engine_helpers import reference_for  # noqa: E402

from unimlm_engine import Engine  # noqa: E402
from unimlm_engine.engine.types import Request, RequestOutput  # noqa: E402
from unimlm_engine.checkpoint.loader import save_checkpoint  # noqa: E402
from unimlm_engine.model.attention import ContiguousKVCache  # noqa: E402
from unimlm_engine.model.superlink import RoutedPayload  # noqa: E402
from unimlm_engine.ops.lora_moe import lora_moe_per_expert_loop  # noqa: E402
from unimlm_engine.checkpoint.pretrained import load_pretrained  # noqa: E402
from unimlm_engine.sampling import SamplingParams  # noqa: E402
from unimlm_engine.inputs.tokenizer import ByteTokenizer  # noqa: E402

IMAGE = np.kron(np.random.default_rng(0).integers(0, 256, (7, 25, 3), dtype=np.uint8),
                np.ones((8, 8, 1), dtype=np.uint8))  # 56 x 200: a 4x1 grid + thumbnail = 5 tiles


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    """(baseline, engine) loaded from one tiny official-layout checkpoint."""
    model, _ = load_pretrained("tiny-random", device="cpu")
    ckpt = save_checkpoint(model, tmp_path_factory.mktemp("e2e") / "ckpt", tokenizer=ByteTokenizer())
    baseline = HFSerialBaseline.from_checkpoint(ckpt, device="cpu")
    engine_model, tok = load_pretrained(ckpt, device="cpu")
    with Engine(engine_model, tok) as engine:
        yield baseline, engine


def _requests(special):
    det = special["[DET]"]
    return {
        "text": Request(prompt="Say something.", sampling=SamplingParams(max_tokens=9, ignore_eos=True)),
        "image-5-tiles": Request(prompt="What is here?", images=[IMAGE],
                                 sampling=SamplingParams(max_tokens=7, ignore_eos=True)),
        "det-3-groups": Request(prompt="Find them.", images=[IMAGE[:, :56]],
                                sampling=SamplingParams(max_tokens=6, forced_prefix=(det,) * 3, ignore_eos=True)),
    }


@pytest.mark.parametrize("kind", ["text", "image-5-tiles", "det-3-groups"])
def test_baseline_equals_reference_and_engine(sides, kind):
    baseline, engine = sides
    req = _requests(engine.tokenizer.special_ids)[kind]
    base = baseline.run(req)
    ref = reference_for(engine, req)
    out = engine.generate_batch([req])[0]
    assert out.error is None, out.error
    assert base.token_ids == ref.token_ids == out.token_ids
    assert len(base.token_ids) == req.sampling.max_tokens
    assert [(p.route, p.token_index) for p in base.payloads] == [(p.route, p.token_index) for p in ref.payloads]
    for b, r in zip(base.payloads, ref.payloads):
        torch.testing.assert_close(b.payload, r.payload, atol=1e-4, rtol=1e-4)
    assert [t.route for t in base.tasks] == [t.route for t in out.tasks]
    for b, e in zip(base.tasks, out.tasks):
        assert b.num_groups == e.num_groups == 3
        torch.testing.assert_close(b.boxes, e.boxes, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(b.scores, e.scores, atol=1e-3, rtol=1e-3)
    assert base.time_to_first_token_s is not None and base.e2e_time_s >= base.time_to_first_token_s


def test_baseline_payload_is_final_norm_hidden_state(sides):
    """HF's hidden_states[-1] is the final norm's output: equal to our LLM.forward (which
    returns final-norm states) and lm_head of it gives HF's logits."""
    baseline, engine = sides
    embeds = torch.randn(11, baseline.hf.config.hidden_size)
    with torch.no_grad():
        out = baseline.hf(inputs_embeds=embeds[None], output_hidden_states=True, use_cache=False)
        ours = engine.model.llm.forward(embeds, torch.arange(11), ContiguousKVCache(len(engine.model.llm.model.layers)))
        torch.testing.assert_close(out.hidden_states[-1][0], ours, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(baseline.hf.lm_head(out.hidden_states[-1]), out.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 63], ids=["t1", "t63"])
def test_hf_lora_moe_linear_equals_per_expert_loop(tokens):
    torch.manual_seed(tokens)
    lin = HFLoRAMoELinear(40, 24, num_experts=3, rank=2, scaling=4.0).double()
    for p in lin.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(tokens, 40, dtype=torch.float64)
    ref = lora_moe_per_expert_loop(x, lin.weight, lin.lora_router, lin.lora_A, lin.lora_B, 4.0).double()
    torch.testing.assert_close(lin(x[None])[0], ref, atol=1e-5, rtol=1e-5)


def test_benchmark_gate_flags_differences():
    """The benchmark's check (no speedup when it fails) catches tokens and payloads."""
    pay = torch.zeros(4, 8)
    base = BaselineOutput(token_ids=[5, 6, 7], payloads=[RoutedPayload("[DET]", 0, pay)])

    def engine_out(tokens, payload):
        return RequestOutput("r", token_ids=tokens, payloads=[RoutedPayload("[DET]", 0, payload)],
                             finish_reason="length")

    assert compare(engine_out([5, 6, 7], pay + 1e-5), base, atol=1e-3) is None
    assert "tokens differ" in compare(engine_out([5, 6, 8], pay), base, atol=1e-3)
    assert "payload" in compare(engine_out([5, 6, 7], pay + 1.0), base, atol=1e-3)
    assert "payload" in compare(engine_out([5, 6, 7], pay + float("nan")), base, atol=1e-3)
