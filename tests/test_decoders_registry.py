"""DecoderSet: official prefixes, per-route dispatch against direct decoder calls, request grouping, errors."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from unimlm_engine.model.decoders import DecoderSet, GenerationResult, build_tiny_pipeline
from unimlm_engine.config.presets import tiny_random
from unimlm_engine.routes import get_route

HIDDEN = 256  # tiny preset llm hidden
K_DET, K_GEN = 4, 8  # tiny preset super-link queries


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def small_cfg(pipe_root=None):
    """The tiny preset (its UniPose is already small) with local tiny pipelines."""
    cfg = tiny_random()
    if pipe_root is not None:
        cfg.gen = dataclasses.replace(cfg.gen, pipeline_dir=str(pipe_root / "gen"))
        cfg.edit = dataclasses.replace(cfg.edit, pipeline_dir=str(pipe_root / "edit"))
    return cfg


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry_pipes")
    build_tiny_pipeline(str(root / "gen"), cross_attention_dim=32, seed=1)
    build_tiny_pipeline(str(root / "edit"), cross_attention_dim=32, seed=1, edit=True)
    torch.manual_seed(0)
    return DecoderSet(small_cfg(root)).eval()


def groups(n, k=K_DET, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(k, HIDDEN, generator=g) for _ in range(n)]


def rgb(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _arr(im):
    return np.asarray(im, dtype=np.int16)


def test_state_dict_prefixes(decoders):
    keys = list(decoders.state_dict())
    assert {k.split(".")[0] for k in keys} == {"gdino", "unipose", "sd", "ip2p"}
    for prefix in ("gdino", "unipose", "sd", "ip2p"):
        sub = {f"{prefix}.{k}" for k in getattr(decoders, prefix).state_dict()}
        assert sub == {k for k in keys if k.startswith(prefix + ".")}
    assert "sd.llm2sd_mapper_queries" in keys and "ip2p.emb_proj.0.weight" in keys


def test_only_configured_decoders_exist():
    cfg = small_cfg()
    cfg.detector, cfg.pose, cfg.edit = None, None, None
    ds = DecoderSet(cfg)
    assert {k.split(".")[0] for k in ds.state_dict()} == {"sd"}
    assert ds.gdino is None and ds.unipose is None and ds.ip2p is None
    for route in ("[DET]", "[SEG]", "[POSE]", "[EDIT]"):
        with pytest.raises(ValueError, match="no .* decoder configured"):
            ds.run_decoder(route, [groups(1, K_GEN if route == "[EDIT]" else K_DET)], [rgb(8, 8)])


def test_gen_groups_and_seeds(decoders):
    payloads = [groups(2, K_GEN, seed=1), groups(1, K_GEN, seed=2)]
    res = decoders.run_decoder("[GEN]", payloads, [None, rgb(5, 5)], num_inference_steps=2, seeds=[5, 9])
    assert all(isinstance(r, GenerationResult) and r.route == "[GEN]" for r in res)
    assert [r.seeds for r in res] == [[5, 6], [9]] and [len(r.images) for r in res] == [2, 1]
    direct = decoders.sd.generate(payloads[0][1].unsqueeze(0), seeds=[6], num_inference_steps=2)[0]
    assert np.abs(_arr(direct) - _arr(res[0].images[1])).max() <= 1
    assert res[1].image.size == (32, 32)


def test_edit_uses_each_requests_image(decoders):
    payloads = [groups(1, K_GEN, seed=3), groups(1, K_GEN, seed=3)]
    images = [rgb(24, 40, seed=1), np.asarray(rgb(16, 16, seed=2))]
    res = decoders.run_decoder("[EDIT]", payloads, images, num_inference_steps=2, seeds=[1, 1])
    assert [r.image.size for r in res] == [(40, 24), (16, 16)]
    direct = decoders.ip2p.generate(payloads[0][0].unsqueeze(0), seeds=[1], images=[images[0]], num_inference_steps=2)
    assert np.abs(_arr(direct[0]) - _arr(res[0].image)).max() <= 1


@pytest.mark.parametrize("route", ["[DET]", "[GRD]", "[SEG]"], ids=lambda r: r.strip("[]"))
def test_detector_routes_match_direct_call(decoders, route):
    payloads = [groups(3, seed=4), groups(1, seed=5)]
    images = [rgb(40, 50, seed=3), rgb(30, 20, seed=4)]
    res = decoders.run_decoder(route, payloads, images)
    # the route's own options: SEG with_masks, GRD the official top-1 box
    ref = decoders.gdino(images, [torch.stack(g) for g in payloads], **get_route(route).options)
    assert len(res) == 2
    for r, e, im, p in zip(res, ref, images, payloads):
        torch.testing.assert_close(r.boxes, e.boxes)
        torch.testing.assert_close(r.labels, e.labels)
        assert len(r.scores) == (1 if route == "[GRD]" else min(100, decoders.gdino.cfg.num_queries * len(p)))
        assert (r.masks is not None) == (route == "[SEG]")
        if r.masks is not None:
            assert tuple(r.masks.shape[1:]) == (im.height, im.width)
            assert torch.equal(r.masks, e.masks)


def test_pose_route_matches_direct_call(decoders):
    det, kpts = [groups(2, seed=6)], [groups(17, seed=7)]
    img = rgb(40, 50, seed=5)
    res = decoders.run_decoder("[POSE]", kpts, [img], det_payloads=det)
    ref = decoders.unipose([img], [torch.stack(det[0])], [torch.stack(kpts[0])])
    assert res[0].keypoints.shape[1:] == (17, 3)
    torch.testing.assert_close(res[0].keypoints, ref[0].keypoints)
    torch.testing.assert_close(res[0].boxes, ref[0].boxes)


IMG = rgb(8, 8)
ERRORS = {
    "unknown-route": ("[FOO]", [groups(1)], [IMG], {}, "unknown route"),
    "empty-batch": ("[DET]", [], [], {}, "empty batch"),
    "zero-groups": ("[DET]", [[]], [IMG], {}, "zero payload groups"),
    "wrong-width": ("[DET]", [[torch.randn(K_DET, HIDDEN + 1)]], [IMG], {}, "payload shape"),
    "wrong-k": ("[GEN]", [[torch.randn(K_DET, HIDDEN)]], [None], {}, "payload shape"),
    "not-a-list": ("[DET]", [torch.randn(2, K_DET, HIDDEN)], [IMG], {}, "list of"),
    "257-classes": ("[DET]", [[torch.zeros(K_DET, HIDDEN)] * 257], [IMG], {}, "257 classes, at most 256"),
    "zero-size-image": ("[DET]", [groups(1)], [Image.new("RGB", (0, 8))], {}, "zero size"),
    "zero-size-array": ("[SEG]", [groups(1)], [np.zeros((4, 0, 3), np.uint8)], {}, "zero size"),
    "float-array-image": ("[DET]", [groups(1)], [np.zeros((4, 4, 3), np.float32)], {}, "uint8"),
    "det-without-image": ("[DET]", [groups(1)], [None], {}, "needs an input image"),
    "edit-without-image": ("[EDIT]", [groups(1, K_GEN)], [None], {}, "needs an input image"),
    "image-count": ("[GEN]", [groups(1, K_GEN)], [None, None], {}, "1 payload lists but 2 images"),
    "pose-no-det": ("[POSE]", [groups(17)], [IMG], {}, "det_payloads"),
    "pose-keypoints": ("[POSE]", [groups(69)], [IMG], {"det_payloads": [groups(1)]}, "keypoints: 69 groups"),
    "pose-det-width": ("[POSE]", [groups(17)], [IMG], {"det_payloads": [[torch.randn(K_DET, 3)]]}, "det_payloads"),
    "gen-bad-opt": ("[GEN]", [groups(1, K_GEN)], [None], {"strength": 0.5}, "unknown options"),
    "det-bad-opt": ("[DET]", [groups(1)], [IMG], {"seeds": [1]}, "unknown options"),
    "gen-seed-count": ("[GEN]", [groups(1, K_GEN)], [None], {"seeds": [1, 2]}, "2 seeds for 1 requests"),
}


@pytest.mark.parametrize("case", list(ERRORS), ids=list(ERRORS))
def test_errors(decoders, case):
    route, payloads, images, opts, match = ERRORS[case]
    with pytest.raises(ValueError, match=match):
        decoders.run_decoder(route, payloads, images, **opts)


def test_bad_config_type():
    with pytest.raises(ValueError, match="ModelConfig"):
        DecoderSet(tiny_random().gen)
