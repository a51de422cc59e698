"""Pose decoder ([POSE]): output shapes, keypoints inside the image, batching, `unipose.` round trip, errors."""
from __future__ import annotations

import pytest
import torch

from unimlm_engine.config.decoders import PoseConfig
from unimlm_engine.model.decoders.pose import PoseDecoder

LLM = 40
NK = 5


def small_cfg(**kw) -> PoseConfig:
    base = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=64, decoder_ffn_dim=64, num_feature_levels=4, encoder_n_points=2, decoder_n_points=2,
                num_queries=12, num_keypoints=NK, keypoint_decoder_layers=2, max_classes=4, llm_hidden_size=LLM,
                image_short=64, image_long=96, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                window_size=4, score_threshold=0.0, max_detections=7)
    base.update(kw)
    return PoseConfig(**base)


@pytest.fixture(scope="module")
def pose():
    torch.manual_seed(2)
    model = PoseDecoder(small_cfg()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(0.5)
            elif not name.endswith("weight"):
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def _image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _payload(c: int, seed: int) -> torch.Tensor:
    return torch.randn(c, 4, LLM, generator=torch.Generator().manual_seed(50 + seed)) * 0.2


def _check_result(r, h: int, w: int, n_classes: int, n: int):
    assert r.boxes.shape == (n, 4) and r.scores.shape == (n,) and r.labels.shape == (n,)
    assert r.keypoints.shape == (n, NK, 3)
    assert r.labels.dtype == torch.long and int(r.labels.max()) < n_classes
    assert torch.isfinite(r.keypoints).all()
    x, y, vis = r.keypoints.unbind(-1)
    assert ((x >= 0) & (x <= w) & (y >= 0) & (y <= h)).all(), "keypoints outside the image"
    assert ((vis >= 0) & (vis <= 1)).all()
    assert ((r.boxes[:, 0] <= r.boxes[:, 2]) & (r.boxes[:, 1] <= r.boxes[:, 3])).all()
    assert (r.boxes >= 0).all() and (r.boxes[:, 2] <= w).all() and (r.boxes[:, 3] <= h).all()
    assert (r.scores[:-1] >= r.scores[1:]).all()


def test_shapes_and_keypoints_inside_image(pose):
    sizes = [(50, 70), (90, 41), (33, 33)]
    images = [_image(h, w, i) for i, (h, w) in enumerate(sizes)]
    classes = [_payload(2, 0), _payload(1, 1), _payload(3, 2)]
    kpts = [_payload(NK, 10 + i) for i in range(3)]
    results = pose(images, classes, kpts)
    assert len(results) == 3
    for r, (h, w), c in zip(results, sizes, classes):
        _check_result(r, h, w, c.shape[0], pose.cfg.max_detections)
        single = pose([_image(h, w, sizes.index((h, w)))], [c], [kpts[sizes.index((h, w))]])[0]
        torch.testing.assert_close(single.scores, r.scores, atol=1e-4, rtol=0)
        torch.testing.assert_close(single.keypoints, r.keypoints, atol=1e-3, rtol=0)
        torch.testing.assert_close(single.boxes, r.boxes, atol=1e-3, rtol=0)


def test_threshold_filters(pose):
    strict = PoseDecoder(small_cfg(score_threshold=0.999)).eval()
    strict.load_state_dict(pose.state_dict())
    im, c, k = [_image(40, 60, 7)], [_payload(2, 7)], [_payload(NK, 8)]
    loose = pose(im, c, k)[0]
    tight = strict(im, c, k)[0]
    assert len(tight.scores) == int((loose.scores > 0.999).sum())
    _check_result(tight, 40, 60, 2, len(tight.scores))


def test_state_dict_round_trip_with_unipose_prefix(pose, tmp_path):
    sd = {f"unipose.{k}": v for k, v in pose.state_dict().items()}
    assert "unipose.patch2kpt.layers.0.weight" in sd
    assert "unipose.keypoint_decoder.1.encoder_attn.value_proj.weight" in sd
    torch.save(sd, tmp_path / "unipose.pt")
    loaded = torch.load(tmp_path / "unipose.pt", weights_only=True)
    fresh = PoseDecoder(small_cfg()).eval()
    res = fresh.load_state_dict({k.removeprefix("unipose."): v for k, v in loaded.items()}, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    args = ([_image(45, 45, 9)], [_payload(1, 9)], [_payload(NK, 9)])
    torch.testing.assert_close(fresh(*args)[0].keypoints, pose(*args)[0].keypoints, atol=0, rtol=0)


@pytest.mark.parametrize("classes, kpts, match", [
    ([torch.randn(2, 4, LLM + 2)], [torch.randn(NK, 4, LLM)], "llm_hidden_size"),
    ([torch.randn(0, 4, LLM)], [torch.randn(NK, 4, LLM)], "zero classes"),
    ([torch.randn(5, 4, LLM)], [torch.randn(NK, 4, LLM)], "max_classes"),
    ([torch.randn(2, 4, LLM)], [torch.randn(NK - 1, 4, LLM)], "num_keypoints"),
    ([torch.randn(2, 4, LLM)], [torch.randn(NK, 4, LLM - 1)], "llm_hidden_size"),
    ([torch.randn(2, 4, LLM)], [], "one class and one keypoint payload"),
], ids=["class-width", "zero-classes", "too-many-classes", "wrong-keypoint-count", "keypoint-width", "missing"])
def test_bad_inputs_raise(pose, classes, kpts, match):
    with pytest.raises(ValueError, match=match):
        pose([_image(40, 40, 0)], classes, kpts)


def test_zero_size_image_raises(pose):
    with pytest.raises(ValueError, match="zero size"):
        pose([torch.zeros(30, 0, 3, dtype=torch.uint8)], [_payload(1, 0)], [_payload(NK, 0)])


def test_config_validation():
    with pytest.raises(ValueError, match="num_keypoints"):
        small_cfg(num_keypoints=0)
    with pytest.raises(ValueError, match="d_model"):
        small_cfg(d_model=40)
