"""Decoder backends: DET results through the ONNX Runtime backend equal the eager backend's (tiny model,
DecoderSet.run_decoder with random payloads), plus the bucket padding and attach/detach logic."""
import numpy as np
import pytest
import torch

from unimlm_engine.model.decoders.backends import (BACKEND_KINDS, DecoderBackend, FixedBucket, load_route_backend,
                                                  make_backend, parse_backend_spec)
from unimlm_engine.export.validate import tiny_detector_export
from unimlm_engine.model.decoders import DecoderInput, DecoderSet
from unimlm_engine.config.presets import get_preset
from unimlm_engine.routes import get_route


@pytest.fixture(scope="module")
def decoder_set():
    ds = DecoderSet(get_preset("tiny")).eval()
    decoder, _, _ = tiny_detector_export()
    ds.gdino.load_state_dict(decoder.state_dict())
    return ds


def _requests(n_classes, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = get_preset("tiny")
    k, hidden = cfg.superlink.num_embs, cfg.llm.hidden_size
    payloads = [[torch.randn(k, hidden, generator=g) for _ in range(c)] for c in n_classes]
    images = [np.random.default_rng(seed + i).integers(0, 256, (h, w, 3), dtype=np.uint8)
              for i, (h, w) in enumerate(sizes)]
    return payloads, images


def _assert_same_detections(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.boxes, b.boxes, atol=1e-2, rtol=1e-4)  # pixels


@pytest.mark.parametrize("n_classes,sizes", [
    pytest.param([3], [(50, 70)], id="one_request"),
    pytest.param([1, 4, 2], [(80, 61), (33, 97), (64, 64)], id="three_requests_batch_chunks"),
])
def test_det_onnxruntime_equals_eager(decoder_set, n_classes, sizes):
    _, path, _ = tiny_detector_export()
    payloads, images = _requests(n_classes, sizes)
    det = [get_route("[DET]")]
    want = decoder_set.run_decoder("[DET]", payloads, images,
                                   backend=load_route_backend(decoder_set.gdino, det, "eager"))
    backend = load_route_backend(decoder_set.gdino, det, "onnxruntime", path)
    assert backend.kind == "onnxruntime"
    got = decoder_set.run_decoder("[DET]", payloads, images, backend=backend)
    assert any(len(r.scores) for r in want), "threshold left no detection to compare"
    _assert_same_detections(got, want)


def test_seg_falls_back_to_eager_without_mask_export(decoder_set):
    _, path, _ = tiny_detector_export()
    payloads, images = _requests([2], [(40, 90)])
    want = decoder_set.run_decoder("[SEG]", payloads, images)
    routes = [get_route(r) for r in ("[DET]", "[GRD]", "[SEG]")]  # every gdino route, as "gdino=..." binds
    backend = load_route_backend(decoder_set.gdino, routes, "onnxruntime", path)
    assert not backend.serves(routes[2]) and backend.serves(routes[0])
    inputs = [DecoderInput(p, im) for p, im in zip(payloads, images)]
    got, used = decoder_set.run("[SEG]", inputs, backend=backend)
    assert used == "eager"
    for a, b in zip(got, want):
        assert torch.equal(a.masks, b.masks) and torch.equal(a.boxes, b.boxes)


class _Echo(DecoderBackend):
    """Records the padded inputs; returns outputs whose values encode their position."""

    def __init__(self):
        self.calls = []

    def run(self, *inputs):
        self.calls.append(inputs)
        b, c = inputs[3].shape
        logits = torch.arange(b * 5 * c, dtype=torch.float32).view(b, 5, c)
        return logits, torch.full((b, 5, 4), float(len(self.calls)))


def test_fixed_bucket_pads_chunks_and_slices():
    echo = _Echo()
    bucket = FixedBucket(echo, "detector", {"batch": 2, "height": 128, "width": 64, "classes": 6}, False)
    pv, valid = torch.ones(3, 3, 64, 64), torch.ones(3, 64, 64, dtype=torch.bool)
    cp, cv = torch.ones(3, 4, 2, 8), torch.ones(3, 4, dtype=torch.bool)
    logits, boxes = bucket(pv, valid, cp, cv)
    assert [tuple(c[0].shape) for c in echo.calls] == [(2, 3, 128, 64)] * 2
    first = echo.calls[0]
    assert not first[1][:, 64:].any() and first[1][:, :64].all()  # padded pixels invalid
    assert not first[3][:, 4:].any() and tuple(first[2].shape) == (2, 6, 2, 8)  # padded classes invalid
    assert torch.equal(echo.calls[1][3][1], echo.calls[1][3][0])  # padded batch row repeats the last real one
    assert tuple(logits.shape) == (3, 5, 4) and tuple(boxes.shape) == (3, 5, 4)
    assert torch.equal(boxes[:, 0, 0], torch.tensor([1.0, 1.0, 2.0]))


def test_fixed_bucket_rejects_larger_canvas():
    bucket = FixedBucket(_Echo(), "detector", {"batch": 1, "height": 64, "width": 64, "classes": 2}, False)
    with pytest.raises(ValueError, match="does not fit the exported bucket"):
        bucket(torch.ones(1, 3, 128, 64), torch.ones(1, 128, 64, dtype=torch.bool), torch.ones(1, 2, 2, 8),
               torch.ones(1, 2, dtype=torch.bool))


def test_make_backend_errors(tmp_path):
    assert set(BACKEND_KINDS) == {"eager", "onnxruntime", "aoti", "tensorrt"}
    with pytest.raises(ValueError, match="unknown decoder backend"):
        make_backend("openvino", tmp_path / "x.onnx")
    with pytest.raises(FileNotFoundError):
        make_backend("onnxruntime", tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="needs the module"):
        make_backend("eager")


def test_backend_rejects_generation_route(decoder_set):
    with pytest.raises(ValueError, match="detector and pose"):
        load_route_backend(decoder_set.sd, [get_route("[GEN]")], "eager")


@pytest.mark.parametrize("spec,want", [
    ("det=onnxruntime:out/det.onnx", ("det", "onnxruntime", "out/det.onnx")),
    ("[SEG]=eager", ("[SEG]", "eager", None)),
    ("gdino=aoti:/a/b:c.pt2", ("gdino", "aoti", "/a/b:c.pt2")),
], ids=["route", "eager-no-path", "colon-in-path"])
def test_parse_backend_spec(spec, want):
    assert parse_backend_spec(spec) == want


@pytest.mark.parametrize("spec,match", [
    ("det", "ROUTE=KIND"), ("det=openvino:x", "unknown kind"), ("det=onnxruntime", "needs the exported file"),
], ids=["no-kind", "unknown-kind", "no-path"])
def test_parse_backend_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_backend_spec(spec)
