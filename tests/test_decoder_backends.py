"""Decoder backends: DET results through the ONNX Runtime backend equal the eager backend's (tiny model,
DecoderSet.run_decoder with random payloads and images of several sizes), plus the canvas bucket selection
(exact canvases, as the official detector's exports run; the by-valid-extent mode with padding / cropping,
right only for a padding-invariant decoder) and batch chunking of BucketedBackend; UniPose ([POSE]) is refused."""
import numpy as np
import pytest
import torch

from unimlm_engine.model.decoders.backends import (BACKEND_KINDS, Bucket, BucketedBackend, DecoderBackend,
                                                  load_route_backend, make_backend, parse_backend_spec)
from unimlm_engine.export.validate import tiny_detector_export
from unimlm_engine.model.decoders import DecoderInput, DecoderSet
from unimlm_engine.config.presets import get_preset
from unimlm_engine.routes import get_route


@pytest.fixture(scope="module")
def decoder_set():
    ds = DecoderSet(get_preset("tiny-random")).eval()
    decoder, _, _ = tiny_detector_export()
    ds.gdino.load_state_dict(decoder.state_dict())
    return ds


def _requests(n_classes, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = get_preset("tiny-random")
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


@pytest.mark.parametrize("n_classes,sizes,canvases", [
    pytest.param([3], [(50, 70)], [(64, 96)], id="one_request_landscape"),
    pytest.param([1, 4, 2], [(80, 61), (33, 97), (70, 97)], [(96, 64), (64, 96)], id="three_requests_two_canvases"),
    pytest.param([2, 11], [(90, 50), (60, 45)], [(96, 64)], id="portrait_11_classes_one_chunk"),
])
def test_det_onnxruntime_equals_eager(decoder_set, monkeypatch, n_classes, sizes, canvases):
    """The export has canvases 64x96 and 96x64, batch 1..2: the detector runs each canvas's requests (in
    chunks of at most 2) on the bucket of exactly that canvas."""
    _, path, _ = tiny_detector_export()
    payloads, images = _requests(n_classes, sizes)
    det = [get_route("[DET]")]
    want = decoder_set.run_decoder("[DET]", payloads, images,
                                   backend=load_route_backend(decoder_set.gdino, det, "eager"))
    backend = load_route_backend(decoder_set.gdino, det, "onnxruntime", path)
    assert backend.kind == "onnxruntime"
    used, select = [], BucketedBackend.select

    def spy(self, *need):
        bucket = select(self, *need)
        used.append((bucket.height, bucket.width))
        return bucket

    monkeypatch.setattr(BucketedBackend, "select", spy)
    got = decoder_set.run_decoder("[DET]", payloads, images, backend=backend)
    assert used == canvases
    _assert_same_detections(got, want)


def test_det_canvas_without_export_is_a_clear_error(decoder_set):
    """A 40x300 image resizes to 13x96: its 32x96 canvas was not exported."""
    _, path, _ = tiny_detector_export()
    payloads, images = _requests([2], [(40, 300)])
    backend = load_route_backend(decoder_set.gdino, [get_route("[DET]")], "onnxruntime", path)
    with pytest.raises(ValueError, match="no exported bucket for the 32x96 canvas"):
        decoder_set.run_decoder("[DET]", payloads, images, backend=backend)


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
    """Records the padded inputs; returns outputs whose values encode their position (and masks)."""

    def __init__(self, name=""):
        self.calls, self.name = [], name

    def run(self, *inputs):
        assert all(x.is_contiguous() for x in inputs)  # AOTI packages read inputs with the traced strides
        self.calls.append(inputs)
        b, c = inputs[3].shape
        h, w = inputs[0].shape[-2:]
        logits = torch.arange(b * 5 * c, dtype=torch.float32).view(b, 5, c)
        return logits, torch.full((b, 5, 4), float(len(self.calls))), torch.ones(b, 5, h // 4, w // 4)


def _inputs(b, h, w, c, valid_hw=None, valid_c=None):
    pv, valid = torch.zeros(b, 3, h, w), torch.zeros(b, h, w, dtype=torch.bool)
    vh, vw = valid_hw or (h, w)
    valid[:, :vh, :vw] = True
    pv[:, :, :vh, :vw] = 1.0
    cv = torch.zeros(b, c, dtype=torch.bool)
    cv[:, :valid_c or c] = True
    return pv, valid, torch.ones(b, c, 2, 8), cv


def _buckets(canvases, batch=(1, 8), classes=(1, 256)):
    return [Bucket(_Echo(f"{h}x{w}"), h, w, batch, classes) for h, w in canvases]


def test_bucketed_pads_chunks_and_slices():
    echo = _Echo()
    bucket = BucketedBackend([Bucket(echo, 128, 64, (2, 2), (6, 6))], "detector", False)
    logits, boxes = bucket(*_inputs(3, 64, 64, 4))
    assert [tuple(c[0].shape) for c in echo.calls] == [(2, 3, 128, 64)] * 2
    first = echo.calls[0]
    assert not first[1][:, 64:].any() and first[1][:, :64].all()  # padded pixels invalid
    assert not first[3][:, 4:].any() and tuple(first[2].shape) == (2, 6, 2, 8)  # padded classes invalid
    assert torch.equal(echo.calls[1][3][1], echo.calls[1][3][0])  # padded batch row repeats the last real one
    assert tuple(logits.shape) == (3, 5, 4) and tuple(boxes.shape) == (3, 5, 4)
    assert torch.equal(boxes[:, 0, 0], torch.tensor([1.0, 1.0, 2.0]))


@pytest.mark.parametrize("canvas,valid_hw,want", [
    pytest.param((64, 64), (64, 64), "64x64", id="square_exact"),
    pytest.param((128, 128), (40, 100), "64x128", id="landscape_extent_in_big_canvas"),
    pytest.param((128, 64), (100, 64), "128x64", id="portrait"),
    pytest.param((128, 128), (65, 64), "128x64", id="one_row_over"),
    pytest.param((128, 128), (100, 100), "128x128", id="largest"),
])
def test_bucket_selection_by_valid_extent(canvas, valid_hw, want):
    buckets = _buckets([(128, 128), (64, 128), (64, 64), (128, 64)])
    runner = BucketedBackend(buckets, "detector", True)
    logits, boxes, masks = runner(*_inputs(2, *canvas, 3, valid_hw))
    ran = [b.backend.name for b in buckets if b.backend.calls]
    assert ran == [want]
    h, w = (int(x) for x in want.split("x"))
    (call,) = next(b.backend for b in buckets if b.backend.calls).calls
    assert tuple(call[0].shape) == (2, 3, h, w) and int(call[1].sum()) == 2 * valid_hw[0] * valid_hw[1]
    assert tuple(masks.shape) == (2, 5, canvas[0] // 4, canvas[1] // 4)  # back to the call's canvas
    assert masks[:, :, :h // 4, :w // 4].eq(1).all() and masks[:, :, h // 4:].eq(0).all()


def test_unused_classes_dropped_and_logits_restored():
    (bucket,) = _buckets([(64, 64)])
    runner = BucketedBackend([bucket], "detector", False)
    logits, _ = runner(*_inputs(2, 64, 64, 6, valid_c=3))
    assert tuple(bucket.backend.calls[0][3].shape) == (2, 3)  # invalid trailing classes not sent
    assert tuple(logits.shape) == (2, 5, 6)
    assert torch.isinf(logits[..., 3:]).all() and (logits[..., 3:] < 0).all()  # like eager's padded classes
    assert torch.equal(logits[..., :3], torch.arange(30, dtype=torch.float32).view(2, 5, 3))


def test_batch_chunks_choose_buckets_per_chunk():
    buckets = _buckets([(64, 64), (128, 128)], batch=(1, 2))
    runner = BucketedBackend(buckets, "detector", False)
    pv, valid, cp, cv = _inputs(5, 128, 128, 2, (64, 64))
    valid[2, :100, :100] = True  # only the second chunk (rows 2, 3) needs the big canvas
    logits, boxes = runner(pv, valid, cp, cv)
    small, big = buckets[0].backend, buckets[1].backend
    assert [tuple(c[0].shape) for c in small.calls] == [(2, 3, 64, 64), (1, 3, 64, 64)]
    assert [tuple(c[0].shape) for c in big.calls] == [(2, 3, 128, 128)]
    assert tuple(logits.shape) == (5, 5, 2) and tuple(boxes.shape) == (5, 5, 4)


def test_static_min_batch_and_classes_padded():
    (bucket,) = _buckets([(64, 64)], batch=(4, 4), classes=(8, 8))
    logits, boxes = BucketedBackend([bucket], "detector", False)(*_inputs(1, 64, 64, 3))
    (call,) = bucket.backend.calls
    assert tuple(call[2].shape) == (4, 8, 2, 8) and tuple(call[3].shape) == (4, 8)
    assert tuple(logits.shape) == (1, 5, 3) and tuple(boxes.shape) == (1, 5, 4)


@pytest.mark.parametrize("canvas,valid_hw,classes", [
    pytest.param((128, 64), (128, 64), 2, id="canvas"), pytest.param((64, 64), (64, 64), 9, id="classes"),
])
def test_bucketed_rejects_what_fits_no_bucket(canvas, valid_hw, classes):
    runner = BucketedBackend(_buckets([(64, 64), (64, 128)], classes=(1, 8)), "detector", False)
    with pytest.raises(ValueError, match="do not fit the exported buckets"):
        runner(*_inputs(1, *canvas, classes, valid_hw))


def test_exact_canvas_mode_runs_only_the_matching_bucket():
    buckets = _buckets([(64, 96), (96, 96)], batch=(1, 2))
    runner = BucketedBackend(buckets, "detector", True, exact_canvas=True)
    logits, boxes, masks = runner(*_inputs(3, 64, 96, 2, (40, 50)))
    small, big = buckets[0].backend, buckets[1].backend
    assert [tuple(c[0].shape) for c in small.calls] == [(2, 3, 64, 96), (1, 3, 64, 96)] and not big.calls
    assert tuple(masks.shape) == (3, 5, 16, 24)
    with pytest.raises(ValueError, match="no exported bucket for the 64x64 canvas"):
        runner(*_inputs(1, 64, 64, 2))


def test_bucketed_backend_is_detector_only():
    """The former pose network's bucketed path is gone: only the detector has exports."""
    with pytest.raises(ValueError, match="only the detector has an export"):
        BucketedBackend(_buckets([(64, 64)]), "pose", False)


def test_pre_official_detector_record_rejected(tmp_path, decoder_set):
    (tmp_path / "det.onnx").write_bytes(b"")
    (tmp_path / "det.json").write_text('{"decoder": "detector", "buckets": [{"height": 64, "width": 64}]}')
    with pytest.raises(ValueError, match="before the official gdino layout"):
        load_route_backend(decoder_set.gdino, [get_route("[DET]")], "onnxruntime", tmp_path / "det.onnx")


def test_record_without_buckets_rejected(tmp_path, decoder_set):
    (tmp_path / "det.onnx").write_bytes(b"")
    (tmp_path / "det.json").write_text('{"decoder": "detector", "shape": {"batch": 1}}')
    with pytest.raises(ValueError, match="export again"):
        load_route_backend(decoder_set.gdino, [get_route("[DET]")], "onnxruntime", tmp_path / "det.onnx")


def test_make_backend_errors(tmp_path):
    assert set(BACKEND_KINDS) == {"eager", "onnxruntime", "aoti", "tensorrt"}
    with pytest.raises(ValueError, match="unknown decoder backend"):
        make_backend("openvino", tmp_path / "x.onnx")
    with pytest.raises(FileNotFoundError):
        make_backend("onnxruntime", tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="needs the module"):
        make_backend("eager")


def test_backend_rejects_generation_route(decoder_set):
    with pytest.raises(ValueError, match="serve the detector only"):
        load_route_backend(decoder_set.sd, [get_route("[GEN]")], "eager")


def test_backend_refuses_unipose(decoder_set):
    with pytest.raises(ValueError, match="UniPose.*no export path"):
        load_route_backend(decoder_set.unipose, [get_route("[POSE]")], "eager")


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
