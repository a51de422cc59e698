"""RoPE frequencies stay fp32 when the model is cast (model/llm.py RotaryEmbedding): a bf16
inv_freq puts ~1 rad of angle error at position 1000 and ~5 rad at 4000."""
import math

import pytest
import torch

from unimlm_engine.config import LLMConfig
from unimlm_engine.model.llm import LLM, RotaryEmbedding

HEAD_DIM, THETA = 128, 10000.0


def _fp64_angles(position: int) -> torch.Tensor:
    inv = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    return position * inv


CASTS = {  # name: (cast, dtype the weights end in)
    "to-bf16": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "half": (lambda m: m.half(), torch.float16),
    "bfloat16": (lambda m: m.bfloat16(), torch.bfloat16),
    "to-fp16-then-fp32": (lambda m: m.half().float(), torch.float32),
}


@pytest.mark.parametrize("cast", list(CASTS))
def test_cast_keeps_fp32_inv_freq_and_angles_at_4000(cast):
    cfg = LLMConfig(vocab_size=64, hidden_size=2 * HEAD_DIM, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192)
    fn, weight_dtype = CASTS[cast]
    model = fn(LLM(cfg))
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == weight_dtype
    rope = model.model.rotary_emb
    assert rope.inv_freq.dtype == torch.float32
    cos, sin = rope.cos_sin(torch.tensor([4000]))
    got = torch.atan2(sin[0, 0, :HEAD_DIM // 2].double(), cos[0, 0, :HEAD_DIM // 2].double())
    want = torch.remainder(_fp64_angles(4000) + math.pi, 2 * math.pi) - math.pi
    diff = torch.remainder(got - want + math.pi, 2 * math.pi) - math.pi
    assert diff.abs().max().item() < 1e-3


def test_bf16_inv_freq_would_be_wrong():
    """The failure the fix prevents: the same angles from a bf16-rounded inv_freq are off by radians."""
    bad = RotaryEmbedding(HEAD_DIM, THETA).inv_freq.bfloat16().double() * 4000
    diff = torch.remainder(bad - _fp64_angles(4000) + math.pi, 2 * math.pi) - math.pi
    assert diff.abs().max().item() > 1.0


def test_inv_freq_follows_the_module_and_stays_out_of_the_state_dict():
    rope = RotaryEmbedding(HEAD_DIM, THETA)
    with torch.device("meta"):
        meta = RotaryEmbedding(HEAD_DIM, THETA)
    assert meta.inv_freq.is_meta
    meta.to_empty(device="cpu")
    torch.testing.assert_close(meta.inv_freq, rope.inv_freq, atol=0, rtol=0)
    assert "inv_freq" not in rope.state_dict()
