"""ONNX export of the tiny detector / pose (both MSDA forms) checked with ONNX Runtime against eager.

The plugin form cannot run in ONNX Runtime (no MultiscaleDeformableAttnPlugin_TRT kernel and no ORT headers
for a custom-op library): its graph is checked node by node, then run through the GridSample rewrite. The
rewrite itself is checked against the fp64 MSDA reference at odd sizes.
"""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from unimlm_engine.export.cli import export_decoder
from unimlm_engine.export.msda_onnx import PLUGIN_DOMAIN, PLUGIN_OP, plugin_nodes, to_gridsample
from unimlm_engine.export.validate import DET_SHAPE, compare, ort_session, run_session, tiny_detector_export
from unimlm_engine.ops.msda import ms_deform_attn_reference

TOL = 1e-4  # fp32, relative to each output's scale (validate.max_scaled_diff)


@pytest.fixture(scope="module")
def det_export():
    return tiny_detector_export()


def _plugin_graph(shapes, n, lq, m, d, p):
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
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(PLUGIN_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


@pytest.mark.parametrize("shapes,n,lq,m,d,p", [
    pytest.param([(7, 5)], 1, 1, 1, 3, 1, id="one_level_one_point"),
    pytest.param([(9, 11), (5, 6), (3, 3), (1, 2)], 2, 63, 4, 8, 4, id="four_levels_odd"),
    pytest.param([(13, 7), (2, 1)], 3, 111, 2, 5, 3, id="two_levels_lq111"),
])
def test_gridsample_rewrite_matches_reference(shapes, n, lq, m, d, p):
    g = torch.Generator().manual_seed(0)
    s, lv = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(n, s, m, d, generator=g)
    loc = torch.rand(n, lq, m, lv, p, 2, generator=g) * 1.4 - 0.2  # some samples outside the image
    attn = torch.rand(n, lq, m, lv, p, generator=g)
    model = to_gridsample(_plugin_graph(shapes, n, lq, m, d, p))
    assert not plugin_nodes(model)
    gs = [x for x in model.graph.node if x.op_type == "GridSample"]
    assert len(gs) == lv
    attrs = {a.name: helper.get_attribute_value(a) for a in gs[0].attribute}
    assert attrs == {"mode": b"bilinear", "padding_mode": b"zeros", "align_corners": 0}
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
    assert record["opset"] >= 17
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["inputs"]["pixel_values"] == {"min": [2, 3, 128, 128], "opt": [2, 3, 128, 128],
                                              "max": [2, 3, 128, 128], "dtype": "float32"}
    assert meta["inputs"]["class_valid"]["dtype"] == "bool"


@pytest.mark.parametrize("valid_hw", [pytest.param((64, 96), id="64x96"), pytest.param((128, 64), id="128x64")])
@pytest.mark.parametrize("form", ["plugin_via_rewrite", "gridsample"])
def test_detector_ort_matches_eager(det_export, valid_hw, form):
    decoder, path, _ = det_export
    model = onnx.load(str(path))
    if form == "gridsample":
        model = to_gridsample(model)
        assert not plugin_nodes(model) and any(x.op_type == "GridSample" for x in model.graph.node)
    sess = ort_session(model)
    res = compare("detector", decoder, lambda x: run_session(sess, x), DET_SHAPE, valid_hw)
    assert res["max_diff"] < TOL, res


def test_opset_below_17_rejected(tmp_path):
    with pytest.raises(ValueError, match="opset >= 17"):
        export_decoder("detector", "tiny", "onnx", "onnx", 16, tmp_path)


def test_unknown_msda_form_rejected(tmp_path):
    with pytest.raises(ValueError, match="--msda"):
        export_decoder("detector", "tiny", "onnx", "cuda", 17, tmp_path)


@pytest.mark.slow
def test_pose_cli_export_gridsample_matches_eager(tmp_path):
    from types import SimpleNamespace

    from unimlm_engine.export.cli import build_decoder, default_shape, run_export

    args = SimpleNamespace(decoder="pose", model="tiny", format="onnx", msda="onnx", opset=17, out=str(tmp_path))
    assert run_export(args) == 0
    path = tmp_path / "pose.onnx"
    model = onnx.load(str(path))
    assert not plugin_nodes(model) and any(x.op_type == "GridSample" for x in model.graph.node)
    decoder = build_decoder("pose", "tiny")  # same seed as the CLI's
    shape = default_shape("pose", decoder.cfg)
    sess = ort_session(model)
    res = compare("pose", decoder, lambda x: run_session(sess, x), shape, (64, 96))
    assert res["max_diff"] < TOL and res["labels_equal"], res
