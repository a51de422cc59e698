"""`unimlm export det --model CHECKPOINT_DIR`: the exported artifacts compute what the engine's decoder for
that directory computes (`load_pretrained(DIR)`), at image sizes and class counts no export was made at; the
decoder-only load equals the engine's load; the export and `convert_checkpoint` show tqdm bars on stderr."""
import json

import numpy as np
import pytest
import torch

from tests.export_helpers import save_tiny
from unimlm_engine.checkpoint.loader import convert_checkpoint
from unimlm_engine.checkpoint.pretrained import load_pretrained
from unimlm_engine.cli.main import main
from unimlm_engine.config.presets import TINY_SEED, get_preset
from unimlm_engine.export.source import load_decoder
from unimlm_engine.export.validate import max_scaled_diff
from unimlm_engine.model import build_model
from unimlm_engine.model.decoders.backends import load_route_backend
from unimlm_engine.model.decoders.detector import pad_payloads
from unimlm_engine.model.decoders.images import gdino_canvas, gdino_image
from unimlm_engine.routes import get_route

TOL = 1e-4


def test_cli_export_of_checkpoint_dir(det_ckpt_export):  # tests/conftest.py: shared with test_engine_backends
    rc, stdout, stderr, out = det_ckpt_export
    assert rc == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["path"] == str(out / "det.onnx") and summary["canvases"] == ["64x96"]
    assert summary["opset"] == 17 and summary["classes"]["max"] == get_preset("tiny-random").detector.max_classes
    assert sorted(p.name for p in out.iterdir()) == ["det.json", "det.onnx"]
    assert "export det (onnx)" in stderr and "canvas" in stderr  # the tqdm bar


@pytest.mark.parametrize("sizes,n_classes", [
    pytest.param([(30, 50), (50, 70), (64, 96)], [3, 9, 1], id="three_images"),
    pytest.param([(45, 60), (100, 140)], [17, 2], id="17_classes"),
    pytest.param([(20, 31)], [4], id="one_image"),
])
def test_export_matches_engine_decoder(det_ckpt, det_ckpt_export, sizes, n_classes):
    """One 64x96 canvas exported (the multi-canvas selection is test_decoder_backends'), batch and classes
    dynamic; every image here resizes onto that canvas (the detector runs each image on its own canvas)."""
    rc, _, stderr, out = det_ckpt_export
    assert rc == 0, stderr
    decoder = load_pretrained(det_ckpt, device="cpu")[0].decoders.gdino
    preset = build_model(get_preset("tiny-random"), seed=TINY_SEED).decoders.gdino
    assert not torch.equal(decoder.patch2query.layers[0].weight, preset.patch2query.layers[0].weight)
    backend = load_route_backend(decoder, [get_route("[DET]")], "onnxruntime", out / "det.onnx")
    g = torch.Generator().manual_seed(len(sizes))
    images = [torch.from_numpy(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))
              for i, (h, w) in enumerate(sizes)]
    pixels, pvalid = gdino_canvas([gdino_image(im, decoder.cfg.image_short, decoder.cfg.image_long)[0]
                                   for im in images])
    assert tuple(pixels.shape[-2:]) == (64, 96)
    payloads, valid = pad_payloads([torch.randn(c, 4, decoder.cfg.llm_hidden_size, generator=g) for c in n_classes],
                                   torch.device("cpu"), torch.float32)
    with torch.no_grad():
        want = decoder.forward_tensors(pixels, pvalid, payloads, valid)
    got = backend.forward(pixels, pvalid, payloads, valid)
    assert got[2] is None and want[2] is None
    assert max_scaled_diff(list(got[:2]), list(want[:2])) < TOL


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_decoder_only_load_equals_engine_load(tmp_path, fmt):
    path = save_tiny(tmp_path, fmt)
    model = load_pretrained(path, device="cpu")[0]
    want = model.decoders.gdino.state_dict()
    got = load_decoder("detector", path).state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_preset_decoder_equals_engine_load():
    model = load_pretrained("tiny-random", device="cpu")[0]
    got, want = load_decoder("detector", "tiny-random").state_dict(), model.decoders.gdino.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_load_decoder_refuses_pose(tmp_path):
    """UniPose ([POSE]) has no export path: the export source refuses it before building anything."""
    with pytest.raises(ValueError, match="only 'detector' has an export wrapper"):
        load_decoder("pose", "tiny-random")


def test_unknown_model_rejected(tmp_path, capsys):
    assert main(["export", "det", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_convert_shows_progress(det_ckpt, tmp_path, capsys):
    convert_checkpoint(det_ckpt.parent / "tiny-bin", tmp_path / "converted", num_shards=3)
    err = capsys.readouterr().err
    assert "convert tiny-bin" in err and "5/5" in err  # 2 shards read + 3 written
