"""export/tensorrt.py without TensorRT: importable, clear error when used (and before any export work for
`unimlm export --format tensorrt`), profile planning from the export record's buckets."""
import importlib.util
import json

import pytest

from unimlm_engine.export import tensorrt as trt_mod
from unimlm_engine.export.tensorrt import Profile, plan_profiles, widen_batch

needs_no_trt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed")


@needs_no_trt
def test_build_engine_raises_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="tensorrt is not installed"):
        trt_mod.build_engine(tmp_path / "m.onnx", tmp_path / "m.plan")


@needs_no_trt
def test_cli_tensorrt_fails_before_exporting(tmp_path, monkeypatch, capsys):
    import unimlm_engine.export.source as source
    from unimlm_engine.cli.main import main

    def no_load(*a, **k):
        raise AssertionError("the decoder was loaded before the TensorRT check")

    monkeypatch.setattr(source, "load_decoder", no_load)
    assert main(["export", "det", "--format", "tensorrt", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--format tensorrt: tensorrt is not installed" in err
    assert "nothing was exported" in err and not (tmp_path / "out").exists()


@needs_no_trt
def test_runner_raises_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="tensorrt is not installed"):
        trt_mod.TrtRunner(tmp_path / "m.plan")


def test_precision_checked_before_import(tmp_path):
    with pytest.raises(ValueError, match="precision"):
        trt_mod.build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", precision="int4")


def test_plan_profiles_from_record_file(tmp_path):
    rec = {"inputs": {"pixel_values": {"min": [1, 3, 64, 64], "opt": [2, 3, 128, 128], "max": [4, 3, 192, 192]},
                      "class_valid": {"min": [1, 1], "opt": [2, 3], "max": [4, 7]}}}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rec))
    profiles = plan_profiles(path)
    assert [p.name for p in profiles] == ["pixel_values", "class_valid"]
    assert profiles[0] == Profile("pixel_values", (1, 3, 64, 64), (2, 3, 128, 128), (4, 3, 192, 192))


@pytest.mark.parametrize("spec,msg", [
    pytest.param({"min": [1, 3], "opt": [1, 3, 4], "max": [1, 3]}, "ranks differ", id="rank_mismatch"),
    pytest.param({"min": [2, 3], "opt": [1, 3], "max": [4, 3]}, "min <= opt <= max", id="min_above_opt"),
    pytest.param({"min": [0, 3], "opt": [1, 3], "max": [4, 3]}, "1 <= min", id="zero_dim"),
    pytest.param({"min": [1, 3], "max": [4, 3]}, "missing", id="no_opt"),
])
def test_plan_profiles_rejects_bad_records(spec, msg):
    with pytest.raises(ValueError, match=msg):
        plan_profiles({"inputs": {"x": spec}})


def test_plan_profiles_picks_the_bucket_of_an_artifact(tmp_path):
    def bucket(name, side):
        return {"height": side, "width": side, "files": {"onnx": name},
                "inputs": {"class_valid": {"min": [1, 1], "opt": [4, 8], "max": [8, 256]},
                           "pixel_valid": {"min": [1, side, side], "opt": [4, side, side], "max": [8, side, side]}}}

    rec = {"decoder": "detector", "buckets": [bucket("det.64x64.onnx", 64), bucket("det.onnx", 128)]}
    (tmp_path / "det.json").write_text(json.dumps(rec))
    profiles = plan_profiles(tmp_path / "det.json", "det.64x64.onnx")
    assert profiles[1] == Profile("pixel_valid", (1, 64, 64), (4, 64, 64), (8, 64, 64))
    assert plan_profiles(rec, "det.onnx")[1].max == (8, 128, 128)
    with pytest.raises(ValueError, match="no bucket with the file"):
        plan_profiles(rec, "det.32x32.onnx")
    with pytest.raises(ValueError, match="no bucket with the file"):
        plan_profiles(rec)  # two buckets: the artifact must be named


def test_plan_profiles_needs_inputs():
    with pytest.raises(ValueError, match="no 'inputs'"):
        plan_profiles({"decoder": "detector"})


def test_widen_batch():
    p = [Profile("x", (2, 3, 64, 64), (2, 3, 64, 64), (2, 3, 64, 64))]
    (w,) = widen_batch(p, 8)
    assert (w.min, w.opt, w.max) == ((1, 3, 64, 64), (2, 3, 64, 64), (8, 3, 64, 64))
    (w1,) = widen_batch(p, 1)
    assert w1.opt[0] == 1 and w1.max[0] == 1
    with pytest.raises(ValueError, match="max_batch"):
        widen_batch(p, 0)
