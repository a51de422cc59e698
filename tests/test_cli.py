"""`unimlm generate`: the task-result JSON schema (RLE masks, base64 or saved images), exit codes, and
arguments checked before the model loads (issue 11)."""
import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from unimlm_engine.checkpoint import pretrained
from unimlm_engine.cli.main import main
from unimlm_engine.outputs.schema import mask_to_rle, rle_to_mask

IMAGE = "examples/images/chelsea.png"


def _run(capsys, *argv):
    code = main(["generate", "--model", "tiny-random", "--prompt", "Where is the cat?", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_carries_masks_and_images(capsys):
    code, out, err = _run(capsys, "--image", IMAGE, "--route", "DET,SEG,GEN", "--json", "--max-tokens", "4")
    assert code == 0, err
    res = json.loads(out)
    det, seg, gen = res["tasks"]
    h, w = Image.open(IMAGE).size[::-1]
    assert det["kind"] == "detection" and det["backend"] == "eager" and "masks" not in det
    assert all(len(b) == 4 for b in det["boxes"]) and len(det["scores"]) == len(det["labels"]) == len(det["boxes"])
    assert seg["kind"] == "segmentation" and len(seg["masks"]) == len(seg["boxes"]) > 0
    masks = [rle_to_mask(m) for m in seg["masks"]]
    assert all(m.shape == (h, w) and m.dtype == bool for m in masks)
    (img,) = gen["images"]
    png = Image.open(io.BytesIO(base64.b64decode(img["data"])))
    assert img["format"] == "png" and png.size == (img["width"], img["height"]) and gen["seeds"] == [0]
    assert res["finish_reason"] in ("stop", "length") and res["error"] is None


def test_save_dir_names_image_files(capsys, tmp_path):
    code, out, err = _run(capsys, "--image", IMAGE, "--route", "GEN,DET", "--json", "--save-dir", str(tmp_path))
    assert code == 0, err
    det, gen = json.loads(out)["tasks"]
    (img,) = gen["images"]
    assert "data" not in img and os.path.isfile(img["path"]) and Image.open(img["path"]).size == (img["width"],
                                                                                              img["height"])
    assert (tmp_path / "0_det_0.png").is_file() and "boxes" in det


def test_failed_task_exits_nonzero(capsys, monkeypatch):
    from unimlm_engine.model.decoders.detector import DetectorDecoder

    def boom(self, *a, **k):
        raise RuntimeError("detector exploded")

    monkeypatch.setattr(DetectorDecoder, "run", boom)
    code, out, err = _run(capsys, "--image", IMAGE, "--route", "DET")
    assert code == 1
    assert "task [DET] failed" in err and "detector exploded" in err
    assert json.loads(out.strip().splitlines()[-1])["error"].startswith("DecoderError")


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(pretrained, "load_pretrained", refuse)


@pytest.mark.parametrize("argv,match", [
    (["--route", "DET,FOO"], "unknown route 'FOO'; routes: DET, GRD, SEG, POSE, GEN, EDIT"),
    (["--image", "no/such.png"], "--image no/such.png: no such file"),
    (["--image", "README.md"], "--image README.md"),
    (["--decoder-backend", "det"], "ROUTE=KIND"),
    (["--decoder-backend", "det=onnxruntime:missing.onnx"], "missing.onnx not found"),
    (["--decoder-backend", "foo=eager"], "unknown route 'foo'"),
    (["--max-tokens", "0"], "max_tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--model", "no-such-model"], "neither a preset"),
    (["--device", "tpu"], "--device tpu"),
], ids=["unknown-route", "missing-image", "undecodable-image", "backend-syntax", "backend-missing-file",
        "backend-unknown-route", "max-tokens", "temperature", "unknown-model", "unknown-device"])
def test_bad_arguments_fail_before_loading(capsys, no_model_load, argv, match):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("unimlm: error: ") and match in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_cuda_device_without_cuda(capsys, no_model_load):
    code, out, err = _run(capsys, "--device", "cuda")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "--device cuda" in line and "use --device cpu" in line


def test_no_third_party_notices():
    """A whole CLI run (subprocess: fresh imports) prints nothing on stderr but the saved-file lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "DIFFUSERS_", "PYTHONWARN"))}
    p = subprocess.run([sys.executable, "-m", "unimlm_engine.cli.main", "generate", "--model", "tiny-random", "--image",
                        IMAGE, "--prompt", "hi", "--route", "GEN,EDIT", "--max-tokens", "3"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip() == "", p.stderr


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 13), (64, 33)]:
        m = rng.random(shape) > 0.5
        rle = mask_to_rle(torch.from_numpy(m))
        assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
        assert np.array_equal(rle_to_mask(rle), m)
