"""ONNX export of the tiny detector (both MSDA forms; UniPose for [POSE] is refused) checked with ONNX Runtime against
eager, at batch sizes, class counts and image sizes the export was not traced at (batch and classes are dynamic,
one file per canvas), plus the opset written and the opset-17 down-conversion.

The plugin form cannot run in ONNX Runtime (no MultiscaleDeformableAttnPlugin_TRT kernel and no ORT headers for a
custom-op library): its graph is checked node by node, then run through the GridSample rewrite. The rewrite itself
is checked against the fp64 MSDA reference at odd sizes.
"""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from unimlm_engine.export.cli import export_decoder
from unimlm_engine.export.msda_onnx import PLUGIN_DOMAIN, PLUGIN_OP, plugin_nodes, to_gridsample
from unimlm_engine.export.opset import model_opset, to_opset17
from unimlm_engine.export.validate import compare, ort_session, run_session, tiny_detector_export
from unimlm_engine.export.wrappers import ExportShape
from unimlm_engine.ops.msda import ms_deform_attn_reference

TOL = 1e-4  # fp32, relative to each output's scale (validate.max_scaled_diff)


@pytest.fixture(scope="module")
def det_export():
    return tiny_detector_export()


def _plugin_graph(shapes, n, lq, m, d, p, opset=17):
    """One plugin node over graph inputs, constant level table, output [N, Lq, M, D]."""
    lv = len(shapes)
    s = sum(h * w for h, w in shapes)
    fl = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("value", fl, [n, s, m, d]),
              helper.make_tensor_value_info("loc", fl, [n, lq, m, lv, p, 2]),
              helper.make_tensor_value_info("attn", fl, [n, lq, m, lv, p])]
    sizes = np.array([h * w for h, w in shapes])
    inits = [numpy_helper.from_array(np.array(shapes, dtype=np.int32), "shapes"),
             numpy_helper.from_array((np.cumsum(sizes) - sizes).astype(np.int32), "starts")]
    node = helper.make_node(PLUGIN_OP, ["value", "shapes", "starts", "loc", "attn"], ["out"], domain=PLUGIN_DOMAIN)
    graph = helper.make_graph([node], "msda", inputs, [helper.make_tensor_value_info("out", fl, [n, lq, m, d])],
                              inits)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(PLUGIN_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8 if opset < 19 else 9)


@pytest.mark.parametrize("shapes,n,lq,m,d,p,opset", [
    pytest.param([(7, 5)], 1, 1, 1, 3, 1, 17, id="one_level_one_point"),
    pytest.param([(9, 11), (5, 6), (3, 3), (1, 2)], 2, 63, 4, 8, 4, 17, id="four_levels_odd"),
    pytest.param([(13, 7), (2, 1)], 3, 111, 2, 5, 3, 17, id="two_levels_lq111"),
    pytest.param([(9, 11), (5, 6)], 2, 17, 2, 4, 2, 20, id="opset20_linear_mode"),
])
def test_gridsample_rewrite_matches_reference(shapes, n, lq, m, d, p, opset):
    g = torch.Generator().manual_seed(0)
    s, lv = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(n, s, m, d, generator=g)
    loc = torch.rand(n, lq, m, lv, p, 2, generator=g) * 1.4 - 0.2  # some samples outside the image
    attn = torch.rand(n, lq, m, lv, p, generator=g)
    model = to_gridsample(_plugin_graph(shapes, n, lq, m, d, p, opset))
    assert not plugin_nodes(model)
    gs = [x for x in model.graph.node if x.op_type == "GridSample"]
    assert len(gs) == lv
    attrs = {a.name: helper.get_attribute_value(a) for a in gs[0].attribute}
    mode = b"linear" if opset >= 20 else b"bilinear"  # GridSample-20 renamed the mode
    assert attrs == {"mode": mode, "padding_mode": b"zeros", "align_corners": 0}
    out = ort_session(model).run(None, {"value": value.numpy(), "loc": loc.numpy(), "attn": attn.numpy()})[0]
    sizes = torch.tensor([h * w for h, w in shapes])
    want = ms_deform_attn_reference(value.double(), torch.tensor(shapes), torch.cumsum(sizes, 0) - sizes,
                                    loc.double(), attn.double()).view(n, lq, m, d)
    torch.testing.assert_close(torch.from_numpy(out).double(), want, atol=1e-5, rtol=1e-5)


def test_plugin_node_contract(det_export):
    _, path, record = det_export
    model = onnx.load(str(path))
    nodes = plugin_nodes(model)
    assert len(nodes) == 1 + 2  # one encoder layer + two decoder layers in the tiny preset
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    types.update({t.name: t for t in model.graph.initializer})
    consumers = {i: x for x in model.graph.node for i in x.input}
    for node in nodes:
        assert node.domain == PLUGIN_DOMAIN and len(node.input) == 5 and len(node.output) == 1
        value_t, loc_t = types[node.input[0]], types[node.input[3]]
        assert len(value_t.shape.dim) == 4 and len(loc_t.shape.dim) == 6
        assert len(types[node.input[4]].shape.dim) == 5
        for i in (1, 2):  # spatial_shapes [L, 2], level_start_index [L]: int32 (initializer or Cast output)
            t = types[node.input[i]]
            assert (t.data_type if hasattr(t, "data_type") else t.elem_type) == TensorProto.INT32
        assert consumers[node.output[0]].op_type == "Reshape"  # [N, Lq, M, D] -> [N, Lq, M*D]
    assert any(x.op_type == "LayerNormalization" for x in model.graph.node)
    assert record["opset"] == 17 and model_opset(model) == 17  # the opset asked for is the one written
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["pixel_values"] == ["batch", 3, 96, 64] and dims["class_valid"] == ["batch", "classes"]
    meta = json.loads(path.with_suffix(".json").read_text())
    assert [(b["height"], b["width"], b["files"]["onnx"]) for b in meta["buckets"]] == [
        (64, 96, "detector.64x96.onnx"), (96, 64, "detector.onnx")]
    assert meta["batch"] == {"min": 1, "opt": 2, "max": 2} and meta["classes"] == {"min": 1, "opt": 8, "max": 256}
    assert meta["buckets"][1]["inputs"]["pixel_values"] == {"min": [1, 3, 96, 64], "opt": [2, 3, 96, 64],
                                                           "max": [2, 3, 96, 64], "dtype": "float32"}
    assert meta["buckets"][0]["inputs"]["class_valid"] == {"min": [1, 1], "opt": [2, 8], "max": [2, 256],
                                                          "dtype": "bool"}


@pytest.mark.parametrize("canvas,valid_hw,batch,classes", [
    pytest.param((96, 64), (96, 50), 1, 1, id="96x64_b1_c1"),
    pytest.param((96, 64), (70, 64), 2, 13, id="96x64_b2_c13"),
    pytest.param((64, 96), (50, 96), 3, 5, id="64x96_b3_c5"),
])
@pytest.mark.parametrize("form", ["plugin_via_rewrite", "gridsample"])
def test_detector_ort_matches_eager(det_export, canvas, valid_hw, batch, classes, form):
    """Batch / class counts other than the traced (2, 2) and beyond the recorded max batch: the dims are
    dynamic in the file; the record's range only bounds TensorRT profiles and the runtime's chunks."""
    decoder, path, _ = det_export
    if canvas != (96, 64):
        path = path.with_name(f"detector.{canvas[0]}x{canvas[1]}.onnx")
    model = onnx.load(str(path))
    if form == "gridsample":
        model = to_gridsample(model)
        assert not plugin_nodes(model) and any(x.op_type == "GridSample" for x in model.graph.node)
    sess = ort_session(model)
    shape = ExportShape(batch, *canvas, classes)
    res = compare("detector", decoder, lambda x: run_session(sess, x), shape, valid_hw)
    assert res["max_diff"] < TOL, res


@pytest.mark.parametrize("opset", [16, 22])
def test_unsupported_opset_rejected_before_export(tmp_path, opset):
    with pytest.raises(ValueError, match=f"--opset {opset} is not supported"):
        export_decoder("detector", "tiny-random", "onnx", "onnx", opset, tmp_path)
    assert not any(tmp_path.iterdir())


def test_unknown_msda_form_rejected(tmp_path):
    with pytest.raises(ValueError, match="--msda"):
        export_decoder("detector", "tiny-random", "onnx", "cuda", 17, tmp_path)


def _reduce_pad_model(opset):
    """x [2, 3, 4] -> ReduceMean(axes=[2], keepdims) -> Pad (constant 1 on the last axis) -> ReduceMax."""
    fl = TensorProto.FLOAT
    inits = [numpy_helper.from_array(np.array([2], np.int64), "axes"),
             numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 1], np.int64), "pads")]
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1, noop_with_empty_axes=0),
             helper.make_node("Pad", ["m", "pads"], ["p"], mode="constant"),
             helper.make_node("ReduceMax", ["p"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", fl, [2, 3, 4])],
                              [helper.make_tensor_value_info("y", fl, [])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def test_to_opset17_converts_reduce_and_pad():
    model = to_opset17(_reduce_pad_model(18))
    onnx.checker.check_model(model, full_check=True)
    assert model_opset(model) == 17
    mean = model.graph.node[0]
    assert list(mean.input) == ["x"] and {a.name: helper.get_attribute_value(a) for a in mean.attribute} == {
        "keepdims": 1, "axes": [2]}
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    got = ort_session(model).run(None, {"x": x})[0]
    want = ort_session(_reduce_pad_model(18)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=0)


def test_to_opset17_drops_default_resize_attributes():
    """torch's exporter writes Resize's opset-18 attributes at their defaults (the SEG mask upsampling);
    opset 17 has no such attributes: they go, and the graph computes the same."""
    fl = TensorProto.FLOAT
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear", antialias=0,
                            keep_aspect_ratio_policy="stretch")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", fl, [1, 1, 3, 3])],
                              [helper.make_tensor_value_info("y", fl, [1, 1, 6, 6])], inits)
    m18 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    m17 = to_opset17(m18)
    onnx.checker.check_model(m17, full_check=True)
    assert {a.name for a in m17.graph.node[0].attribute} == {"mode"}
    x = np.random.default_rng(0).standard_normal((1, 1, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(ort_session(m17).run(None, {"x": x})[0], ort_session(m18).run(None, {"x": x})[0],
                               rtol=0, atol=0)


def test_to_opset17_refuses_ops_without_17_form():
    fl = TensorProto.FLOAT
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, fl, [1, 2, 3]) for n in "xsb"],
                              [helper.make_tensor_value_info("y", fl, [1, 2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ValueError, match="GroupNormalization.*no opset-17 form"):
        to_opset17(model)


def test_pose_export_refused(tmp_path):
    """[POSE] is the official UniPose now; it has no export wrapper yet, so `unimlm export pose` says so."""
    from types import SimpleNamespace

    from unimlm_engine.export.cli import run_export

    args = SimpleNamespace(decoder="pose", model="tiny-random", format="onnx", msda="onnx", opset=17, out=str(tmp_path),
                           canvas="64x128", batch="1:2:4", classes=None)
    with pytest.raises(ValueError, match="UniPose.*no export wrapper"):
        run_export(args)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("opset,msda", [(18, "onnx"), (19, "onnx"), (20, "onnx"), (21, "plugin")])
def test_higher_opsets_written_and_run(tmp_path, opset, msda):
    """18 is the exporter's own, 19-21 its up-conversion; 20 renamed GridSample's mode to "linear"."""
    from unimlm_engine.export.onnx_export import export_onnx
    from unimlm_engine.export.source import load_decoder

    decoder, shape = load_decoder("detector", "tiny-random"), ExportShape(2, 64, 64, 3)
    export_onnx("detector", decoder, shape, tmp_path / "d.onnx", msda, opset)
    model = onnx.load(str(tmp_path / "d.onnx"))
    assert model_opset(model) == opset
    sess = ort_session(model)
    res = compare("detector", decoder, lambda x: run_session(sess, x), shape, (60, 64))
    assert res["max_diff"] < TOL, res
