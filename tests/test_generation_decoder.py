"""[GEN] / [EDIT] decoder: payload mapper against an fp64 reference, tiny diffusers pipelines end to end."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unimlm_engine.config.decoders import GenConfig
from unimlm_engine.model.decoders.generation import GenerationDecoder, build_tiny_pipeline, load_local_pipeline

ODD = GenConfig(llm_hidden_size=63, num_embs=7, mapper_dim=20, mapper_layers=2, mapper_heads=4, num_prompt_tokens=77)
TINY = GenConfig(llm_hidden_size=48, num_embs=8, mapper_dim=32, mapper_layers=1, mapper_heads=4, num_prompt_tokens=77)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny UNet's ops are too small to gain from threads; on a shared, loaded 2-core
    machine OpenMP spin-waiting made them ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _attn(x, kv, p, pre, heads):
    """Multi-head attention from the nn.MultiheadAttention parameters `pre`.in_proj_* / out_proj.*."""
    d = x.shape[-1]
    w, b = p[pre + "in_proj_weight"], p[pre + "in_proj_bias"]
    q, k, v = F.linear(x, w[:d], b[:d]), F.linear(kv, w[d:2 * d], b[d:2 * d]), F.linear(kv, w[2 * d:], b[2 * d:])
    split = lambda t: t.unflatten(-1, (heads, d // heads)).transpose(1, 2)  # noqa: E731  [B, H, T, dh]
    s = split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5
    o = (s.softmax(-1) @ split(v)).transpose(1, 2).flatten(2)
    return F.linear(o, p[pre + "out_proj.weight"], p[pre + "out_proj.bias"])


def _ln(x, p, pre):
    return F.layer_norm(x, x.shape[-1:], p[pre + ".weight"], p[pre + ".bias"], 1e-5)


def _ffn(x, p, pre):
    return F.linear(F.relu(F.linear(x, p[pre + "linear1.weight"], p[pre + "linear1.bias"])),
                    p[pre + "linear2.weight"], p[pre + "linear2.bias"])


def reference_mapper(payload, state, cfg):
    """fp64 pre-norm encoder-decoder written out: payload [B, K, H] -> [B, 77, d]."""
    p = {k: v.double() for k, v in state.items()}
    x = F.linear(F.gelu(F.linear(payload.double(), p["emb_proj.0.weight"], p["emb_proj.0.bias"])),
                 p["emb_proj.2.weight"], p["emb_proj.2.bias"])
    for i in range(cfg.mapper_layers):
        e = f"llm2sd_mapper.encoder.layers.{i}."
        h = _ln(x, p, e + "norm1")
        x = x + _attn(h, h, p, e + "self_attn.", cfg.mapper_heads)
        x = x + _ffn(_ln(x, p, e + "norm2"), p, e)
    mem = _ln(x, p, "llm2sd_mapper.encoder.norm")
    y = p["llm2sd_mapper_queries"].expand(payload.shape[0], -1, -1)
    for i in range(cfg.mapper_layers):
        e = f"llm2sd_mapper.decoder.layers.{i}."
        h = _ln(y, p, e + "norm1")
        y = y + _attn(h, h, p, e + "self_attn.", cfg.mapper_heads)
        y = y + _attn(_ln(y, p, e + "norm2"), mem, p, e + "multihead_attn.", cfg.mapper_heads)
        y = y + _ffn(_ln(y, p, e + "norm3"), p, e)
    return _ln(y, p, "llm2sd_mapper.decoder.norm")


@pytest.mark.parametrize("batch", [1, 3], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("cfg", [ODD, TINY], ids=["odd-h63-k7-d20-L2", "tiny-h48-k8-d32-L1"])
def test_mapper_matches_fp64_reference(cfg, batch):
    dec = GenerationDecoder(cfg).eval()
    payload = torch.randn(batch, cfg.num_embs, cfg.llm_hidden_size)
    with torch.no_grad():
        out = dec(payload)
    assert out.shape == (batch, cfg.num_prompt_tokens, cfg.mapper_dim)
    ref = reference_mapper(payload, dec.state_dict(), cfg)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_batched_mapper_equals_per_item():
    dec = GenerationDecoder(ODD).eval()
    payload = torch.randn(ODD.num_embs, 5, ODD.llm_hidden_size).transpose(0, 1)  # non-contiguous batch
    with torch.no_grad():
        batched = dec(payload)
        single = torch.cat([dec(payload[i]) for i in range(5)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_official_parameter_names():
    keys = set(GenerationDecoder(TINY).state_dict())
    for k in ("llm2sd_mapper_queries", "emb_proj.0.weight", "emb_proj.2.bias",
              "llm2sd_mapper.encoder.layers.0.self_attn.in_proj_weight",
              "llm2sd_mapper.decoder.layers.0.multihead_attn.out_proj.weight", "llm2sd_mapper.decoder.norm.weight"):
        assert k in keys
    assert not any(k.startswith(("sd_unet", "sd_vae", "unet", "vae")) for k in keys)


@pytest.mark.parametrize("bad,match", [
    (torch.randn(8, 47), "width 47"),
    (torch.randn(2, 9, 48), "9 query vectors"),
    (torch.randn(8), r"\[K, hidden\]"),
    (torch.ones(8, 48, dtype=torch.int64), "floating point"),
], ids=["width", "num-queries", "1d", "int"])
def test_bad_payload(bad, match):
    with pytest.raises(ValueError, match=match):
        GenerationDecoder(TINY)(bad)


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    build_tiny_pipeline(str(root / "gen"), cross_attention_dim=TINY.mapper_dim, seed=3)
    build_tiny_pipeline(str(root / "edit"), cross_attention_dim=TINY.mapper_dim, seed=3, edit=True)
    return root


def _decoder(root, edit=False):
    dec = GenerationDecoder(dataclasses.replace(TINY, pipeline_dir=str(root / ("edit" if edit else "gen"))),
                            edit=edit).eval()
    return dec


def _arr(im):
    return np.asarray(im, dtype=np.int16)


def test_gen_end_to_end_deterministic(pipeline_dirs):
    dec = _decoder(pipeline_dirs)
    payload = torch.randn(2, TINY.num_embs, TINY.llm_hidden_size)
    a = dec.generate(payload, seeds=[7, 8], num_inference_steps=2)
    assert [im.size for im in a] == [(32, 32), (32, 32)] and all(im.mode == "RGB" for im in a)
    fresh = _decoder(pipeline_dirs)
    fresh.load_state_dict(dec.state_dict())
    b = fresh.generate(payload, seeds=[7, 8], num_inference_steps=2)  # reloaded from disk
    assert all(np.array_equal(_arr(x), _arr(y)) for x, y in zip(a, b))
    single = dec.generate(payload[1:], seeds=[8], num_inference_steps=2)[0]
    assert np.abs(_arr(single) - _arr(a[1])).max() <= 1  # image i depends on payload i and seed i only
    other = dec.generate(payload[:1], seeds=[9], num_inference_steps=2)[0]
    assert not np.array_equal(_arr(other), _arr(a[0]))
    sized = dec.generate(payload[:1], seeds=[7], num_inference_steps=2, height=48, width=16)[0]
    assert sized.size == (16, 48)


def test_fp64_mapper_feeds_fp32_pipeline(pipeline_dirs):
    dec = _decoder(pipeline_dirs)
    payload = torch.randn(1, TINY.num_embs, TINY.llm_hidden_size)
    want = dec.generate(payload, seeds=[4], num_inference_steps=2)[0]
    dec64 = _decoder(pipeline_dirs)
    dec64.load_state_dict(dec.state_dict())
    dec64.double()
    assert dec64.pipeline.unet.dtype == torch.float32  # CPU pipelines load in fp32 whatever the mapper dtype
    got = dec64.generate(payload.double(), seeds=[4], num_inference_steps=2)[0]
    assert np.abs(_arr(got) - _arr(want)).max() <= 1


def test_negative_embeds_zero_without_text_encoder(pipeline_dirs):
    dec = _decoder(pipeline_dirs)
    neg = dec.negative_prompt_embeds()
    assert dec.pipeline.text_encoder is None
    torch.testing.assert_close(neg, torch.zeros(1, 77, TINY.mapper_dim))


def test_edit_uses_input_image(pipeline_dirs):
    dec = _decoder(pipeline_dirs, edit=True)
    payload = torch.randn(1, TINY.num_embs, TINY.llm_hidden_size).expand(3, -1, -1)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    other = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    square = Image.new("RGB", (16, 16), (255, 0, 0))
    out = dec.generate(payload, seeds=[1, 1, 1], images=[img, square, other], num_inference_steps=2)
    assert [im.size for im in out] == [(40, 24), (16, 16), (40, 24)]
    assert not np.array_equal(_arr(out[0]), _arr(out[2]))  # same payload and seed, different input image
    again = dec.generate(payload[:1], seeds=[1], images=[img], num_inference_steps=2)[0]
    assert np.abs(_arr(again) - _arr(out[0])).max() <= 1
    with pytest.raises(ValueError, match="one input image per payload"):
        dec.generate(payload[:1], seeds=[1], num_inference_steps=2)
    with pytest.raises(ValueError, match="non-empty PIL"):
        dec.generate(payload[:1], seeds=[1], images=[np.asarray(img)], num_inference_steps=2)


def test_pipeline_loading_errors(pipeline_dirs, tmp_path):
    with pytest.raises(ValueError, match="no pipeline_dir"):
        GenerationDecoder(TINY).pipeline
    with pytest.raises(ValueError, match="not a diffusers directory"):
        load_local_pipeline(str(tmp_path / "missing"))
    gen_pipe = load_local_pipeline(str(pipeline_dirs / "gen"))
    with pytest.raises(ValueError, match="input channels"):
        GenerationDecoder(TINY, edit=True).set_pipeline(gen_pipe)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        GenerationDecoder(ODD).set_pipeline(gen_pipe)


def test_generate_argument_errors(pipeline_dirs):
    dec = _decoder(pipeline_dirs)
    payload = torch.randn(2, TINY.num_embs, TINY.llm_hidden_size)
    with pytest.raises(ValueError, match="1 seeds for 2 payloads"):
        dec.generate(payload, seeds=[1])
    with pytest.raises(ValueError, match="num_inference_steps"):
        dec.generate(payload, seeds=[1, 2], num_inference_steps=0)


def _tiny_text_encoder(tmp_path):
    """A random CLIP text encoder (width = mapper_dim) and a character-level CLIP tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"))
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=TINY.mapper_dim, intermediate_size=37,
                                      num_attention_heads=4, num_hidden_layers=1, max_position_embeddings=77))
    return te.eval(), tok


def test_negative_embeds_from_text_encoder(tmp_path):
    pipe = build_tiny_pipeline(str(tmp_path / "pipe"), cross_attention_dim=TINY.mapper_dim, seed=2)
    te, tok = _tiny_text_encoder(tmp_path)
    pipe.register_modules(text_encoder=te, tokenizer=tok)
    pipe.save_pretrained(str(tmp_path / "pipe"))
    dec = GenerationDecoder(dataclasses.replace(TINY, pipeline_dir=str(tmp_path / "pipe"))).eval()
    assert dec.pipeline.text_encoder is not None  # loaded from the directory, not dropped
    neg = dec.negative_prompt_embeds()
    ids = tok("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        want = te(ids)[0]
    assert neg.shape == (1, 77, TINY.mapper_dim) and neg.abs().sum() > 0
    torch.testing.assert_close(neg, want)
    payload = torch.randn(1, TINY.num_embs, TINY.llm_hidden_size)
    assert dec.generate(payload, seeds=[0], num_inference_steps=2)[0].size == (32, 32)
