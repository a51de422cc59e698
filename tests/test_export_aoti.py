"""AOTInductor packages of the tiny detector and pose, loaded back and checked against eager at an image size
other than the one exported with (the package is one fixed canvas; smaller images are padded + masked).
A compile takes minutes on 2 shared CPU cores: both cases are marked slow. These tests caught the MSDA output
layout mismatch (non-contiguous reference output vs contiguous fake) that export/aoti.py works around."""
import pytest

from unimlm_engine.export.aoti import export_aoti, load_aoti
from unimlm_engine.export.cli import build_decoder
from unimlm_engine.export.validate import compare
from unimlm_engine.export.wrappers import ExportShape

TOL = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind,shape", [
    pytest.param("detector", ExportShape(1, 128, 128, 3), id="detector_b1_c3"),
    pytest.param("pose", ExportShape(2, 128, 64, 2, keypoints=17), id="pose_b2_c2"),
])
def test_aoti_package_matches_eager(tmp_path, kind, shape):
    decoder = build_decoder(kind, "tiny")
    path = tmp_path / f"{kind}.pt2"
    record = export_aoti(kind, decoder, shape, path)
    assert path.exists() and path.with_suffix(".json").exists() and record["compile_s"] > 0
    run = load_aoti(path)
    res = compare(kind, decoder, lambda x: run(*x), shape, (64, 64) if shape.width == 64 else (64, 96))
    assert res["max_diff"] < TOL, res
    if kind == "pose":
        assert res["labels_equal"], res
