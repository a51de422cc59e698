"""Equivalence against Hugging Face transformers on random weights, fp32 (issue 2)."""
import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from unimlm_engine.config import LLMConfig, VisionConfig  # noqa: E402
from unimlm_engine.checkpoint.loader import load_checkpoint, read_shard, find_shards, save_checkpoint  # noqa: E402
from unimlm_engine.model import build_model, reference_generate  # noqa: E402
from unimlm_engine.model.attention import ContiguousKVCache  # noqa: E402
from unimlm_engine.model.llm import LLM  # noqa: E402
from unimlm_engine.model.vision import VisionTower  # noqa: E402
from unimlm_engine.config.presets import get_preset  # noqa: E402
from unimlm_engine.sampling import SamplingParams  # noqa: E402
from unimlm_engine.inputs.tokenizer import ByteTokenizer  # noqa: E402


def _hf_llama(cfg: LLMConfig):
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        attn_implementation="eager")
    return transformers.LlamaForCausalLM(hf_cfg).eval()


@pytest.mark.parametrize("image_size,output_layer", [(56, -2), (42, -1), (56, -3)], ids=["56px-l-2", "42px-l-1", "56px-l-3"])
def test_clip_tower_equals_hf(image_size, output_layer):
    cfg = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       image_size=image_size, patch_size=14, output_layer=output_layer)
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=image_size,
        patch_size=14, hidden_act="quick_gelu", attn_implementation="eager")).eval()
    ours = VisionTower(cfg).eval()
    # transformers 5 names CLIPVisionModel's keys without the `vision_model.` level that
    # official checkpoints (written with transformers 4) carry; ours keep the official names.
    sd = {k if k.startswith("vision_model.") else "vision_model." + k: v for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not missing and all("position_ids" in k for k in unexpected)
    pixels = torch.randn(3, 3, image_size, image_size)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[output_layer][:, 1:]
        got = ours(pixels)
    assert got.shape == ref.shape == (3, cfg.tokens_per_tile, 64)
    assert (got - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)], ids=["mha", "gqa2", "mqa"])
def test_llm_logits_equal_hf(heads, kv_heads):
    cfg = LLMConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=heads, num_key_value_heads=kv_heads)
    hf = _hf_llama(cfg)
    ours = LLM(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (37,))
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0]
        got = ours.logits(ours.forward(ours.embed(ids), torch.arange(37), ContiguousKVCache(2)))
    assert (got - ref).abs().max() <= 1e-4


def _text_only_cfg():
    cfg = get_preset("tiny-random")
    return dataclasses.replace(cfg, lora_moe=None, detector=None, pose=None, gen=None, edit=None)


def _hf_from_checkpoint(path, cfg):
    hf = _hf_llama(cfg.llm)
    sd = {}
    for f in find_shards(path):
        sd.update({k[len("llm."):]: v for k, v in read_shard(f).items() if k.startswith("llm.")})
    hf.load_state_dict(sd, strict=True)
    return hf


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_greedy_generation_equals_hf_generate(tmp_path, fmt):
    cfg = _text_only_cfg()
    save_checkpoint(build_model(cfg, seed=3), tmp_path / "ckpt", tokenizer=ByteTokenizer(), fmt=fmt)
    model, tok, report = load_checkpoint(tmp_path / "ckpt")
    hf = _hf_from_checkpoint(tmp_path / "ckpt", cfg)
    prompt = tok.encode("A chat between a user and an assistant. USER: hello ASSISTANT:", add_bos=True)
    ours = reference_generate(model, prompt, params=SamplingParams(max_tokens=24), route_ids={})
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, num_beams=1)[0, len(prompt):]
    assert ours.token_ids == ref.tolist()


def test_image_prompt_generation_equals_hf_inputs_embeds(tmp_path):
    """Vision features scattered into <im_patch> positions: our loop == HF generate(inputs_embeds)."""
    cfg = _text_only_cfg()
    save_checkpoint(build_model(cfg, seed=5), tmp_path / "ckpt", tokenizer=ByteTokenizer())
    model, tok, _ = load_checkpoint(tmp_path / "ckpt")
    hf = _hf_from_checkpoint(tmp_path / "ckpt", cfg)
    patch = tok.special_ids["<im_patch>"]
    pixels = torch.randn(2, 3, 56, 56)
    prompt = tok.encode("USER: ", add_bos=True) + [patch] * (2 * cfg.vision.tokens_per_tile) + tok.encode(" what? ASSISTANT:")
    ours = reference_generate(model, prompt, [pixels], SamplingParams(max_tokens=16), route_ids={})
    with torch.no_grad():
        embeds = model.embed_inputs(torch.tensor(prompt), model.encode_images(pixels))
        ref = hf.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=16, do_sample=False, num_beams=1)[0]
    assert ours.token_ids == ref.tolist()[-len(ours.token_ids):] and len(ref) == len(ours.token_ids)
