"""AOTInductor packages of the tiny detector (UniPose for [POSE] has no export path), loaded back and checked against
eager at image sizes, batch sizes and class counts other than the ones traced (one canvas per package, batch and
classes dynamic; the detector's images on exactly the package's canvas). A compile takes minutes on 2 shared CPU
cores: every case is marked slow. These tests caught the MSDA output layout mismatch (non-contiguous reference output vs contiguous
fake) that ops/msda.py now avoids."""
import json

import pytest

from unimlm_engine.export.aoti import load_aoti
from unimlm_engine.export.source import load_decoder
from unimlm_engine.export.validate import compare
from unimlm_engine.export.wrappers import ExportShape

TOL = 1e-4


@pytest.mark.slow
def test_aoti_cli_export_matches_eager_and_serves_through_backend(tmp_path):
    """`unimlm export det --format aoti` (one compile: they take minutes): the record names the package; loaded
    back, it equals eager at batch sizes, class counts and image extents other than the traced ones; the
    runtime's back end runs images of its 64x96 canvas (valid 50x96)."""
    import torch

    from unimlm_engine.export.cli import export_decoder
    from unimlm_engine.export.validate import max_scaled_diff
    from unimlm_engine.model.decoders.backends import load_route_backend
    from unimlm_engine.routes import get_route

    rec = export_decoder("det", "tiny-random", "aoti", out=tmp_path, canvases="64x96", progress=False)
    assert rec["path"] == str(tmp_path / "det.pt2") and "opset" not in rec
    meta = json.loads((tmp_path / "det.json").read_text())
    assert meta["buckets"][0]["files"] == {"aoti": "det.pt2"}
    decoder = load_decoder("detector", "tiny-random")
    run = load_aoti(tmp_path / "det.pt2")
    for batch, classes, valid_hw in [(1, 1, (64, 50)), (3, 7, (40, 96))]:
        res = compare("detector", decoder, lambda x: run(*x), ExportShape(batch, 64, 96, classes), valid_hw)
        assert res["max_diff"] < TOL, (batch, classes, res)
    backend = load_route_backend(decoder, [get_route("[DET]")], "aoti", rec["path"])
    g = torch.Generator().manual_seed(0)
    pixels, valid = torch.zeros(3, 3, 64, 96), torch.zeros(3, 64, 96, dtype=torch.bool)
    valid[:, :50, :96] = True
    pixels[:, :, :50, :96] = torch.randn(3, 3, 50, 96, generator=g)
    payloads, cvalid = torch.randn(3, 5, 4, 256, generator=g), torch.ones(3, 5, dtype=torch.bool)
    cvalid[0, 3:] = False
    with torch.no_grad():
        want = decoder.forward_tensors(pixels, valid, payloads, cvalid)
    got = backend.forward(pixels, valid, payloads, cvalid)
    assert max_scaled_diff(list(got[:2]), list(want[:2])) < TOL
