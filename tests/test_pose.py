"""[POSE] decoder (UniPose) on the tiny preset: result schema, the `unipose.` round trip through the public
checkpoint loader, image handling and errors. Numerical fidelity to the official code:
tests/test_unipose_official.py."""
from __future__ import annotations

import pytest
import torch

from unimlm_engine.config.presets import tiny
from unimlm_engine.model.decoders.pose import PoseDecoder, eval_size

LLM = 256  # tiny preset


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Spin-waiting threads cost far more than they gain on the shared, loaded 2-core test box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pose():
    torch.manual_seed(2)
    model = PoseDecoder(tiny().pose).eval()
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


def test_state_dict_round_trip_through_loader(pose, tmp_path):
    """The tiny model saved with official key names loads back with 0 missing / 0 unexpected keys."""
    from unimlm_engine.checkpoint.loader import load_checkpoint, save_checkpoint
    from unimlm_engine.model import build_model
    from unimlm_engine.inputs.tokenizer import ByteTokenizer

    model = build_model(tiny(), seed=0)
    path = save_checkpoint(model, tmp_path / "ckpt", tokenizer=ByteTokenizer())
    loaded, _, report = load_checkpoint(path, device="cpu")
    keys = {k for k in loaded.decoders.unipose.state_dict()}
    assert {"backbone.0.norm3.weight", "input_proj.3.0.weight", "projection_kpt_llava.layers.2.bias",
            "transformer.decoder.hw_append.weight", "transformer.encoder.fusion_layers.0.gam_v"} <= keys
    assert "unipose" not in report.not_loaded
    for k, v in model.decoders.unipose.state_dict().items():
        assert torch.equal(v, loaded.decoders.unipose.state_dict()[k]), k


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
