"""Checkpoints with some tools disabled, and the EDIT UNet that comes from the checkpoint (issue 13).

The official config decides which modules exist (`use_gdino`, `use_unipose`, `use_sd`, `use_ip2p`; a
disabled tool's config is written as null), the four `emb_embeddings_*` tables always exist, and the
InstructPix2Pix UNet is trained in the official code, so `ip2p.sd_unet.*` must be the UNet that runs.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import unimlm_engine as ue
from unimlm_engine.checkpoint.loader import load_checkpoint, save_checkpoint
from unimlm_engine.checkpoint.pretrained import load_pretrained
from unimlm_engine.config.presets import get_preset
from unimlm_engine.inputs.processor import load_image
from unimlm_engine.inputs.tokenizer import ByteTokenizer
from unimlm_engine.model import build_model

pytest.importorskip("diffusers")

IMAGE = "examples/images/chelsea.png"


def _add_shard(path, name, tensors):
    """Write `tensors` as one more shard of the checkpoint directory and list it in the index."""
    torch.save(tensors, path / name)
    index = json.loads((path / "pytorch_model.bin.index.json").read_text())
    index["weight_map"].update({k: name for k in tensors})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def det_only(tmp_path_factory):
    cfg = dataclasses.replace(get_preset("tiny-random"), pose=None, gen=None, edit=None)
    path = save_checkpoint(build_model(cfg, seed=11), tmp_path_factory.mktemp("det_only") / "ckpt",
                           tokenizer=ByteTokenizer())
    return path


def test_disabled_tools_are_null_and_tables_exist(det_only):
    d = json.loads((det_only / "config.json").read_text())
    assert d["use_gdino"] and not d["use_unipose"] and not d["use_sd"] and not d["use_ip2p"]
    assert d["unipose_config"] is None and d["sd_config"] is None and d["ip2p_config"] is None
    keys = json.loads((det_only / "pytorch_model.bin.index.json").read_text())["weight_map"]
    # all four query tables exist whatever the tools
    assert {f"emb_embeddings_{t}.weight" for t in ("det", "pose", "gen", "edit")} <= set(keys)
    assert not any(k.startswith(("unipose.", "sd.", "ip2p.")) for k in keys)
    model, _, report = load_checkpoint(det_only)
    assert model.decoders.unipose is None and model.decoders.sd is None and model.decoders.ip2p is None
    assert report.not_loaded == {}


def test_request_for_a_disabled_route_fails_alone(det_only):
    with ue.Engine.from_pretrained(str(det_only), device="cpu") as engine:
        ids = engine.tokenizer.special_ids

        def forced(*routes):
            return ue.SamplingParams(max_tokens=2, forced_prefix=tuple(ids[r] for r in routes))

        handles = [engine.submit(ue.Request(prompt="Draw a cat.", images=[IMAGE], sampling=forced("[GEN]"))),
                   engine.submit(ue.Request(prompt="Pose.", images=[IMAGE], sampling=forced("[DET]", "[POSE]"))),
                   engine.submit(ue.Request(prompt="Find the cat.", images=[IMAGE], sampling=forced("[DET]")))]
        gen, pose, det = [h.result(timeout=120) for h in handles]
        assert gen.error is None and [t.route for t in gen.tasks] == ["[GEN]"]
        assert isinstance(gen.tasks[0].error, ue.DecoderError) and "no decoder for [GEN]" in str(gen.tasks[0].error)
        pose_task = next(t for t in pose.tasks if t.route == "[POSE]")
        assert isinstance(pose_task.error, ue.DecoderError) and "no decoder for [POSE]" in str(pose_task.error)
        # the detector is there and the engine goes on serving
        assert det.tasks[0].error is None and det.tasks[0].boxes.shape[-1] == 4
        again = engine.generate("Still there?", sampling=ue.SamplingParams(max_tokens=3))
        assert again.error is None and len(again.token_ids) == 3


@pytest.fixture(scope="module")
def edit_ckpt(tmp_path_factory):
    """A tiny model with [EDIT] only; the stock pipeline (seed 0) sits beside the checkpoint, and the checkpoint
    stores a different, "fine-tuned" UNet (seed 5) under ip2p.sd_unet.* plus frozen VAE weights."""
    from unimlm_engine.model.decoders import build_tiny_pipeline

    root = tmp_path_factory.mktemp("edit")
    cfg = get_preset("tiny-random")
    cfg = dataclasses.replace(cfg, detector=None, pose=None, gen=None,
                              edit=dataclasses.replace(cfg.edit, pipeline_dir="ip2p-pipeline"))
    path = save_checkpoint(build_model(cfg, seed=3), root / "ckpt", tokenizer=ByteTokenizer())
    stock = build_tiny_pipeline(str(path / "ip2p-pipeline"), cross_attention_dim=cfg.edit.mapper_dim, seed=0,
                                edit=True)
    tuned = build_tiny_pipeline(str(root / "tuned"), cross_attention_dim=cfg.edit.mapper_dim, seed=5, edit=True)
    shard = {f"ip2p.sd_unet.{k}": v.clone() for k, v in tuned.unet.state_dict().items()}
    shard.update({f"ip2p.sd_vae.{k}": v.clone() for k, v in stock.vae.state_dict().items()})
    _add_shard(path, "pytorch_model-ip2p.bin", shard)
    return path, stock, tuned


def test_edit_runs_the_checkpoint_unet(edit_ckpt):
    path, stock, tuned = edit_ckpt
    _, _, report = load_checkpoint(path)
    assert report.not_loaded == {"ip2p": len(stock.vae.state_dict())}  # the frozen VAE copy is skipped
    model, _ = load_pretrained(str(path), device="cpu")
    dec = model.decoders.ip2p
    assert dec.staged_components == ("unet",)
    unet = dec.pipeline.unet  # attaching the pipeline applies the staged weights
    assert dec.staged_components == ()
    for k, v in tuned.unet.state_dict().items():
        assert torch.equal(unet.state_dict()[k], v), k
    payload = torch.randn(1, dec.cfg.num_embs, dec.cfg.llm_hidden_size, generator=torch.Generator().manual_seed(0))
    img = load_image(IMAGE).resize((32, 32))
    got = dec.generate(payload, [7], images=[img], num_inference_steps=2)[0]
    # reference: the same mapper with the stock pipeline's components but the tuned UNet; the stock UNet differs
    dec.set_pipeline(type(stock)(**{**stock.components, "unet": tuned.unet}))
    want = dec.generate(payload, [7], images=[img], num_inference_steps=2)[0]
    dec.set_pipeline(stock)
    other = dec.generate(payload, [7], images=[img], num_inference_steps=2)[0]
    got, want, other = (np.asarray(x).astype(np.int16) for x in (got, want, other))
    # the same UNet weights, loaded into a fresh module vs the in-memory one: equal up to float summation
    # order (measured 2026-12-07, diffusers 0.42.1: one channel of one pixel off by 1 of 3,072); the stock
    # UNet moves almost every value (mean |diff| ~19 levels)
    assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.01
    assert np.abs(got - other).mean() > 5


def test_edit_unet_that_does_not_fit_is_a_clear_error(edit_ckpt, tmp_path):
    import shutil

    path, _, _ = edit_ckpt
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    shard = torch.load(bad / "pytorch_model-ip2p.bin", weights_only=True)
    shard.pop(sorted(k for k in shard if k.startswith("ip2p.sd_unet."))[0])
    torch.save(shard, bad / "pytorch_model-ip2p.bin")
    model, _ = load_pretrained(str(bad), device="cpu")
    with pytest.raises(ValueError, match=r"ip2p.sd_unet: checkpoint weights do not fit .*\(1 missing, first: conv_in.bias\)"):
        model.decoders.ip2p.pipeline


def test_edit_without_checkpoint_unet_is_reported(tmp_path):
    """A checkpoint with [EDIT] but no ip2p.sd_unet.* loads, and the report says the pipeline's own UNet runs."""
    cfg = get_preset("tiny-random")
    cfg = dataclasses.replace(cfg, detector=None, pose=None, gen=None)
    path = save_checkpoint(build_model(cfg, seed=3), tmp_path / "ckpt", tokenizer=ByteTokenizer())
    _, _, report = load_checkpoint(path)
    assert report.stock_components == ["ip2p.unet"]


def test_differing_copies_of_a_shared_tensor_are_refused(tmp_path):
    """The detector's shared heads may be written once or twice, but two different copies are an error."""
    from unimlm_engine.checkpoint.loader import CheckpointError

    cfg = dataclasses.replace(get_preset("tiny-random"), pose=None, gen=None, edit=None)
    path = save_checkpoint(build_model(cfg, seed=11), tmp_path / "ckpt", tokenizer=ByteTokenizer())
    index = json.loads((path / "pytorch_model.bin.index.json").read_text())["weight_map"]
    key = "gdino.model.decoder.bbox_embed.0.layers.0.weight"
    assert key in index and "gdino.bbox_embed.0.layers.0.weight" in index
    load_checkpoint(path)  # written twice, equal: fine
    shard = path / index[key]
    sd = torch.load(shard, weights_only=True)
    sd[key] = sd[key] + 1
    torch.save(sd, shard)
    with pytest.raises(CheckpointError, match="one tensor in the model .* differ in the checkpoint"):
        load_checkpoint(path)
