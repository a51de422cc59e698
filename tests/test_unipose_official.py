"""UniPose ([POSE]) against tests/unipose_reference.py, an independent transcription of the official
modeling_unipose.py forward + eval_pose.py post-processing (fp32, CPU).

Official-layout state dicts come from the reference module (official key names and shapes); the engine
loads them with 0 missing / 0 unexpected keys. Checked: raw outputs (pred_logits [50, 100], pred_boxes,
pred_keypoints [50, 204]) and post-processed results within 1e-4, for 3 / 17 / 68 keypoints and 1 / 3 / 5
classes on odd image sizes, one request at a time and batched (several canvases in one call); the
prepare_for_mask quirks against the official loops; the config rules.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.unipose_reference import ReferenceUniPose, nested, official_image, post_process_pose
from unimlm_engine.config.decoders import PoseConfig
from unimlm_engine.model.decoders.base import DecoderInput
from unimlm_engine.model.decoders.pose import PoseDecoder, post_process
from unimlm_engine.model.decoders.unipose.network import group_self_attention
from unimlm_engine.routes import get_route

HIDDEN, K = 48, 4
SWIN = (32, (1, 1, 1, 1), (1, 2, 4, 8), 4)  # a small backbone (the swin_params extension)
OFFICIAL = dict(backbone="tiny_test", hidden_dim=256, nheads=4, enc_layers=1, dec_layers=3, dim_feedforward=64,
                num_queries=60, num_feature_levels=4, enc_n_points=2, dec_n_points=2, return_interm_indices=[1, 2, 3],
                num_body_points=68, num_box_decoder_layers=2, l_hidden_size=HIDDEN, pe_temperatureH=20,
                pe_temperatureW=20)
# (keypoints, classes, image (h, w)): requests 0 and 2 share the 64x96 canvas, request 1 has its own
CASES = [(3, 1, (57, 83)), (17, 3, (61, 45)), (68, 5, (40, 100))]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _official_weights(ref: torch.nn.Module, seed: int = 1) -> dict:
    """Random weights in a range where scores do not saturate (ties would make the top-k order arbitrary)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in ref.state_dict().items():
        if k.endswith("relative_position_index"):
            sd[k] = v
        elif k == "transformer.decoder.norm.weight":
            sd[k] = 0.05 * (1 + 0.1 * torch.randn(v.shape, generator=g))
        elif v.dim() == 1 and ("norm" in k or k.startswith("input_proj") and ".1." in k) and k.endswith("weight"):
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = (0.04 if v.dim() > 1 else 0.05) * torch.randn(v.shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = ReferenceUniPose(OFFICIAL, SWIN).eval()
    ref.load_state_dict(_official_weights(ref))
    cfg = PoseConfig.from_dict({**OFFICIAL, "swin_params": SWIN, "image_short": 64, "image_long": 96})
    eng = PoseDecoder(cfg).eval()
    res = eng.load_state_dict(ref.state_dict(), strict=False)
    assert res.missing_keys == [] and res.unexpected_keys == []
    return ref, eng


@pytest.fixture(scope="module")
def requests():
    g = torch.Generator().manual_seed(7)
    rng = np.random.RandomState(3)
    out = []
    for nk, nc, (h, w) in CASES:
        im = Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8))
        out.append((im, [torch.randn(K, HIDDEN, generator=g) for _ in range(nc)],
                    [torch.randn(K, HIDDEN, generator=g) for _ in range(nk)]))
    return out


def _text_query(objs, kpts):
    tq = dict(obj_querys=torch.zeros(1, 100, K, HIDDEN), obj_query_masks=torch.zeros(1, 100, dtype=torch.bool),
              kpt_querys=torch.zeros(1, 100, K, HIDDEN), kpt_query_masks=torch.zeros(1, 100, dtype=torch.bool))
    tq["obj_querys"][0, :len(objs)], tq["obj_query_masks"][0, :len(objs)] = torch.stack(objs), True
    tq["kpt_querys"][0, :len(kpts)], tq["kpt_query_masks"][0, :len(kpts)] = torch.stack(kpts), True
    return tq


@pytest.fixture(scope="module")
def official(models, requests):
    """The reference, one request at a time: raw outputs and eval_pose results."""
    ref, _ = models
    out = []
    for im, objs, kpts in requests:
        t, m = nested([official_image(im, 64, 96)])
        raw = ref(t, m, _text_query(objs, kpts))
        res = post_process_pose(*raw, [(im.height, im.width)], len(objs), len(kpts))[0]
        out.append((tuple(r[0] for r in raw), res))
    return out


def _close(a, b, what):
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    assert torch.equal(fa, fb), f"{what}: -inf pattern differs"
    assert torch.equal(a[~fa], b[~fb]), what
    err = (a[fa] - b[fb]).abs().max().item() if fa.any() else 0.0
    assert err <= 1e-4, f"{what}: max abs err {err}"


def _check(raw, res, want_raw, want, nk):
    for a, b, name in zip(raw, want_raw, ("pred_logits", "pred_boxes", "pred_keypoints")):
        _close(a, b, name)
    assert raw[0].shape == (50, 100) and raw[1].shape == (50, 4) and raw[2].shape == (50, 204)
    assert torch.equal(res.labels, want["labels"])
    _close(res.scores, want["scores"], "scores")
    _close(res.boxes, want["boxes"], "boxes")
    _close(res.keypoints, want["keypoints"].view(-1, nk, 3), "keypoints")


def test_state_dict_is_the_official_layout(models):
    ref, eng = models
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in eng.state_dict().items()}
    assert got == want
    # the shared heads are stored under both official paths
    assert "transformer.decoder.bbox_embed.2.layers.0.weight" in got and "pose_hw_embed.0.layers.2.bias" in got


def test_batched_call_matches_official_per_request(models, requests, official):
    """One call, three requests on two canvases (two sub-batches), against the official one at a time."""
    _, eng = models
    raws, sizes = eng.raw_outputs(*zip(*requests))
    for (_, objs, kpts), raw, size, (want_raw, want) in zip(requests, raws, sizes, official):
        res = post_process(*raw, len(objs), len(kpts), size)
        _check(raw, res, want_raw, want, len(kpts))
        assert len(res.scores) == min(100, 50 * len(objs))
        assert res.keypoints.shape[1:] == (len(kpts), 3) and torch.all(res.keypoints[..., 2] == 1)


def test_task_decoder_route_one_at_a_time(models, requests, official):
    """Through the TaskDecoder interface ([POSE] groups = keypoints, [DET] context = classes), one request."""
    _, eng = models
    route = get_route("[POSE]")
    im, objs, kpts = requests[1]
    res = eng.run(route, [DecoderInput(payloads=kpts, image=im, context=objs)], {})[0]
    want_raw, want = official[1]
    assert torch.equal(res.labels, want["labels"])
    _close(res.scores, want["scores"], "scores")
    _close(res.boxes, want["boxes"], "boxes")
    _close(res.keypoints, want["keypoints"].view(-1, len(kpts), 3), "keypoints")
    inputs = [DecoderInput(payloads=kpts, image=im, context=objs)]
    with pytest.raises(ValueError, match="unknown options"):
        eng.run(route, inputs, {"threshold": 0.5})
    with pytest.raises(ValueError, match="no exported back end"):
        eng.run(route, inputs, {}, tensor_forward=lambda *a: None)


def test_group_mask_matches_official_loops(models):
    ref, _ = models
    km = torch.zeros(3, 69, dtype=torch.bool)
    km[:, 0] = True
    for i, n in enumerate((3, 17, 68)):
        km[i, 1:1 + n] = True
    want = ref.prepare_for_mask(km).view(3, OFFICIAL["nheads"], 3450, 3450)[:, :1]
    got = ~group_self_attention(km, 50)
    assert torch.equal(got, want)
    # the quirks: rows past 50*68 see every other block; the last 68-group's rows see past 50*68
    assert not want[0, 0, 3449, :3381].any() and not want[0, 0, 3332, 3400:].any()


def test_bad_inputs(models, requests):
    _, eng = models
    im, objs, kpts = requests[0]
    with pytest.raises(ValueError, match="keypoints: 69 groups"):
        eng([im], [objs], [[kpts[0]] * 69])
    with pytest.raises(ValueError, match="object classes: 0 groups"):
        eng([im], [[]], [kpts])
    with pytest.raises(ValueError, match="object classes: 101 groups"):
        eng([im], [[objs[0]] * 101], [kpts])
    with pytest.raises(ValueError, match="same K"):
        eng([im], [objs], [[torch.randn(K + 1, HIDDEN)]])
    with pytest.raises(ValueError, match="one class and one keypoint"):
        eng([im], [objs, objs], [kpts])


def test_config_rules():
    full = {**OFFICIAL, "backbone": "swin_L_384_22k", "lr": 1e-4, "dn_number": 100, "set_cost_class": 2.0}
    c = PoseConfig.from_dict(full)  # the official JSON's training keys are ignored
    assert c.swin() == (192, (2, 2, 18, 2), (6, 12, 24, 48), 12)
    with pytest.raises(ValueError, match="missing backbone"):
        PoseConfig.from_dict({k: v for k, v in OFFICIAL.items() if k != "backbone"})
    for bad, match in (({"hidden_dim": 128}, "hidden_dim"), ({"num_body_points": 17}, "num_body_points"),
                       ({"num_queries": 49}, "num_queries"), ({"dec_layers": 2}, "dec_layers"),
                       ({"return_interm_indices": [2, 3]}, "return_interm_indices"),
                       ({"backbone": "resnet50"}, "unknown backbone")):
        with pytest.raises(ValueError, match=match):
            PoseConfig.from_dict({**OFFICIAL, **bad})
    with pytest.raises(ValueError, match="swin_params"):
        PoseConfig.from_dict({**full, "swin_params": SWIN})
    c = PoseConfig.from_dict({**OFFICIAL, "swin_params": SWIN})
    assert PoseConfig.from_dict(c.to_dict()) == c
