"""[POSE] decoder (UniPose) on the tiny preset: result schema, the `unipose.` round trip through the public
checkpoint loader, image handling and errors. Numerical fidelity to the official code:
tests/test_unipose_official.py."""
from __future__ import annotations

import pytest
import torch

from unimlm_engine.config.presets import tiny_random
from unimlm_engine.model.decoders.pose import PoseDecoder, eval_size

LLM = 256  # tiny preset


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def pose():
    torch.manual_seed(2)
    model = PoseDecoder(tiny_random().pose).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(0.3)
    return model


def _image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _groups(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(50 + seed)
    return [torch.randn(4, LLM, generator=g) * 0.2 for _ in range(n)]


def test_result_schema(pose):
    (r,) = pose([_image(45, 70, 1)], [_groups(2, 1)], [_groups(5, 2)])
    n = min(100, 50 * 2)  # eval_pose: top min(100, 50 * C), no threshold
    assert r.boxes.shape == (n, 4) and r.scores.shape == (n,) and r.labels.shape == (n,)
    assert r.keypoints.shape == (n, 5, 3) and r.labels.dtype == torch.long and int(r.labels.max()) < 2
    assert torch.all(r.keypoints[..., 2] == 1) and torch.isfinite(r.keypoints).all()
    assert (r.scores[:-1] >= r.scores[1:]).all()


@pytest.mark.parametrize("dedup", [False, True], ids=["all-keys", "aliases-dropped"])
def test_official_layout_checkpoint_loads(tmp_path, dedup):
    """The tiny model's unipose.* weights taken from tests/unipose_reference.py (official key names and
    shapes) load through the public loader with 0 missing / 0 unexpected keys, also when the shared heads are
    stored under one name only (transformers' safetensors save_pretrained drops aliased names)."""
    import json

    from safetensors.torch import load_file, save_file

    from tests.unipose_reference import ReferenceUniPose
    from unimlm_engine.checkpoint.loader import load_checkpoint, save_checkpoint
    from unimlm_engine.inputs.tokenizer import ByteTokenizer
    from unimlm_engine.model import build_model

    cfg = tiny_random()
    ref = ReferenceUniPose(cfg.pose.to_dict(), cfg.pose.swin_params)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    want = ref.state_dict()
    model = build_model(cfg, seed=0)
    assert set(model.decoders.unipose.state_dict()) == set(want)
    model.decoders.unipose.load_state_dict(want, strict=True)
    path = save_checkpoint(model, tmp_path / "ckpt", tokenizer=ByteTokenizer(), fmt="safetensors")
    dropped = 0
    if dedup:  # keep the first name of every group of aliased unipose tensors, as save_pretrained does
        first: dict = {}
        for k, v in want.items():
            first.setdefault(v.data_ptr(), k)
        index = json.loads((path / "model.safetensors.index.json").read_text())
        for shard in sorted(set(index["weight_map"].values())):
            sd = load_file(str(path / shard))
            keep = {k: v for k, v in sd.items()
                    if not k.startswith("unipose.") or first[want[k[8:]].data_ptr()] == k[8:]}
            dropped += len(sd) - len(keep)
            save_file(keep, str(path / shard), metadata={"format": "pt"})
            index["weight_map"] = {k: f for k, f in index["weight_map"].items() if f != shard or k in keep}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
        assert dropped > 0
    loaded, _, report = load_checkpoint(path, device="cpu")
    assert "unipose" not in report.not_loaded
    got = loaded.decoders.unipose.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_official_resize():
    """transform_coco.resize (size 800, max 1333), hand-computed."""
    assert eval_size(640, 480, 800, 1333) == (800, 1066)
    assert eval_size(480, 640, 800, 1333) == (1066, 800)
    assert eval_size(2000, 500, 800, 1333) == (333, 1332)
    assert eval_size(800, 600, 600, 1000) == (600, 800)


def test_zero_size_image_raises(pose):
    with pytest.raises(ValueError, match="uint8"):
        pose([torch.zeros(30, 0, 3, dtype=torch.uint8)], [_groups(1, 0)], [_groups(3, 0)])


@pytest.mark.parametrize("classes, kpts, match", [
    (lambda: [torch.randn(4, LLM + 2)], lambda: _groups(3, 0), "object classes"),
    (lambda: _groups(1, 0), lambda: [torch.randn(4, LLM - 1)], "keypoints"),
], ids=["class-width", "keypoint-width"])
def test_bad_widths(pose, classes, kpts, match):
    with pytest.raises(ValueError, match=match):
        pose([_image(40, 40, 0)], [classes()], [kpts()])


def test_bf16_runs(pose):
    """bf16 weights (as served on CUDA): MSDA runs in fp32 as in the official module; results are finite."""
    import copy

    half = copy.deepcopy(pose).to(torch.bfloat16)
    (r,) = half([_image(40, 52, 3)], [_groups(1, 3)], [_groups(17, 4)])
    assert r.keypoints.shape == (50, 17, 3) and torch.isfinite(r.keypoints).all() and torch.isfinite(r.boxes).all()


def test_too_few_feature_tokens_raise():
    """num_queries above the image's feature tokens: a typed error, not a topk crash."""
    import dataclasses

    cfg = dataclasses.replace(tiny_random().pose, num_queries=200)
    model = PoseDecoder(cfg).eval()
    with pytest.raises(ValueError, match="fewer than num_queries=200"):
        model([_image(40, 40, 0)], [_groups(1, 0)], [_groups(3, 0)])
