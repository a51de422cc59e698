"""Checkpoint directories: official layout round trips, convert, and clear errors (issue 2)."""
import json
import shutil

import pytest
import torch

from unimlm_engine.config import ModelConfig
from unimlm_engine.checkpoint.loader import CheckpointError, convert_checkpoint, load_checkpoint, save_checkpoint
from unimlm_engine.model import build_model
from unimlm_engine.config.presets import UnknownPresetError, get_preset
from unimlm_engine.inputs.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = get_preset("tiny-random")
    model = build_model(cfg, seed=7, with_decoders=False)
    path = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny-random", tokenizer=ByteTokenizer())
    return path, model


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_official_layout_files(ckpt):
    path, _ = ckpt
    names = sorted(p.name for p in path.iterdir())
    assert "pytorch_model.bin.index.json" in names and "config.json" in names
    assert [n for n in names if n.endswith(".bin")] == ["pytorch_model-00001-of-00002.bin",
                                                          "pytorch_model-00002-of-00002.bin"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "visionllmv2" and cfg["llm_config"]["model_type"] == "llama"
    keys = json.loads((path / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert any(k.startswith("vis_encoder.vision_model.") for k in keys)
    assert {"vl_bridge.0.weight", "llm.lm_head.weight", "emb_embeddings_det.weight", "emb_embeddings_gen.weight"} <= set(keys)


def test_round_trip_same_weights(ckpt):
    path, model = ckpt
    loaded, tok, report = load_checkpoint(path, with_decoders=False)
    assert report.loaded == len(model.state_dict())
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert loaded.special_ids["[DET]"] == tok.special_ids["[DET]"]


def test_convert_to_safetensors_and_load(ckpt, tmp_path):
    path, model = ckpt
    out = convert_checkpoint(path, tmp_path / "st", num_shards=3)
    assert len(list(out.glob("model-*.safetensors"))) == 3
    loaded, _, _ = load_checkpoint(out, with_decoders=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_decoder_and_unserved_keys_reported_not_loaded(ckpt, tmp_path):
    path = _copy(ckpt[0], tmp_path)
    # (region_encoder.* loads when config.json has use_region_encoder: tests/test_regions_engine.py)
    extra = {"gdino.some.weight": torch.zeros(2)}
    torch.save(extra, path / "pytorch_model-extra.bin")
    index = json.loads((path / "pytorch_model.bin.index.json").read_text())
    index["weight_map"].update({k: "pytorch_model-extra.bin" for k in extra})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    _, _, report = load_checkpoint(path, with_decoders=False)
    assert report.not_loaded == {"gdino": 1}


def test_truncated_shard_names_file(ckpt, tmp_path):
    path = _copy(ckpt[0], tmp_path)
    shard = path / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin.*truncated or corrupt"):
        load_checkpoint(path, with_decoders=False)


def test_missing_shard_file(ckpt, tmp_path):
    path = _copy(ckpt[0], tmp_path)
    (path / "pytorch_model-00001-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="missing: pytorch_model-00001-of-00002.bin"):
        load_checkpoint(path, with_decoders=False)


def test_missing_and_unexpected_keys(ckpt, tmp_path):
    path = _copy(ckpt[0], tmp_path)
    shard = path / "pytorch_model-00001-of-00002.bin"
    sd = torch.load(shard, weights_only=True)
    dropped = sorted(sd)[0]
    del sd[dropped]
    torch.save(sd, shard)
    with pytest.raises(CheckpointError, match=f"1 missing keys .*first: {dropped}"):
        load_checkpoint(path, with_decoders=False)
    sd.update({f"llm.model.bogus{i}.weight": torch.zeros(1) for i in range(7)}, **{"vl_bridge.9.weight": torch.zeros(1)})
    torch.save(sd, shard)
    # one error for both kinds: counts per prefix and the first few names
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, with_decoders=False)
    msg = str(err.value)
    assert f"1 missing keys ({dropped.split('.')[0]}: 1), first: {dropped}" in msg
    assert "8 unexpected keys (llm: 7, vl_bridge: 1), first: llm.model.bogus0.weight" in msg
    assert "... and 3 more" in msg and "pytorch_model-00001-of-00002.bin" in msg


def test_config_that_does_not_match_weights(ckpt, tmp_path):
    path = _copy(ckpt[0], tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["llm_config"]["intermediate_size"] = 640
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch for llm\.model\.layers\.\d\.mlp\..*config.json does not"):
        load_checkpoint(path, with_decoders=False)


@pytest.mark.parametrize("content,match", [("{not json", "invalid JSON"), ('{"model_type": "llava"}', "visionllmv2"),
                                           ('{"model_type": "visionllmv2"}', "vis_encoder_config")],
                         ids=["bad-json", "wrong-model-type", "no-vision"])
def test_bad_config(tmp_path, content, match):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path)


def test_not_a_directory_and_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(get_preset("tiny-random").to_official_dict()))
    with pytest.raises(CheckpointError, match="no weights found"):
        load_checkpoint(tmp_path)


def test_official_config_round_trip():
    for name in ("tiny-random", "visionllm-v2-7b"):
        cfg = get_preset(name)
        again = ModelConfig.from_official_dict(json.loads(json.dumps(cfg.to_official_dict())))
        assert again == cfg


def test_official_config_fields_read():
    d = get_preset("visionllm-v2-7b").to_official_dict()
    assert "lora_moe" not in d and d["llm_config"]["vocab_size"] == 32026
    assert d["use_gdino"] and d["use_unipose"] and d["use_sd"] and d["use_ip2p"]
    assert d["ip2p_config"]["sd_model_id"] == "checkpoints/instruct-pix2pix" and d["ip2p_config"]["num_embed_tokens"] == 64
    d["llm_config"]["num_key_value_heads"] = None  # LlamaConfig default: MHA
    cfg = ModelConfig.from_official_dict(d)
    assert cfg.lora_moe is None and cfg.llm.num_key_value_heads == 32 and cfg.vision.output_layer == -2
    assert cfg.llm.hidden_size == 4096 and cfg.vision.image_size == 336 and cfg.superlink.num_embs_gen == 64


def test_unknown_preset():
    with pytest.raises(UnknownPresetError, match="unknown preset 'huge'.*tiny"):
        get_preset("huge")


@pytest.mark.parametrize("kwargs,match", [({"num_attention_heads": 3}, "divide"), ({"num_key_value_heads": 3}, "multiple"),
                                          ({"vocab_size": 0}, "vocab_size")], ids=["heads", "kv-heads", "vocab"])
def test_llm_config_validation(kwargs, match):
    from unimlm_engine.config import LLMConfig

    with pytest.raises(ValueError, match=match):
        LLMConfig(**kwargs)


def test_official_generation_configs_read():
    """sd.json / ip2p.json (the official StableDiffusionWithLLMEmbConfig / InstructPix2PixWithLLMEmbConfig)."""
    from unimlm_engine.config.decoders import GenConfig

    official = {"architectures": ["InstructPix2PixWithLLMEmbConfig"], "llm_hidden_size": 64, "sd_hidden_size": 32,
                "num_queries": 77, "num_encoder_layers": 2, "num_decoder_layers": 2, "trigger_token": "[EDIT]",
                "sd_model_id": "checkpoints/instruct-pix2pix", "num_embed_tokens": 8, "cfg_scale": 7.5}
    g = GenConfig.from_dict(official)
    assert (g.llm_hidden_size, g.mapper_dim, g.num_prompt_tokens, g.mapper_layers, g.num_embs, g.pipeline_dir,
            g.mapper_heads) == (64, 32, 77, 2, 8, "checkpoints/instruct-pix2pix", 8)
    assert {k: g.to_dict()[k] for k in ("sd_hidden_size", "num_queries", "num_encoder_layers", "num_decoder_layers",
                                        "num_embed_tokens", "sd_model_id")} == {k: official[k] for k in (
        "sd_hidden_size", "num_queries", "num_encoder_layers", "num_decoder_layers", "num_embed_tokens", "sd_model_id")}
    with pytest.raises(ValueError, match="num_encoder_layers"):
        GenConfig.from_dict({**official, "num_decoder_layers": 1})
