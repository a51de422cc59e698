"""The ONNX opset an export writes: the requested one, or an error.

torch 2.13's exporter builds opset 18 graphs and converts them up (19 .. 21) itself, but not down: asked for
17 it writes 18 (it warns and keeps 18). `onnx.version_converter` cannot take these graphs to 17 either
("No Adapter To Version $17 for Pad"), and where it has adapters it leaves 18-only attributes behind
(`noop_with_empty_axes` on ReduceMean / ReduceMin / ReduceMax, which ONNX Runtime then rejects). `to_opset17`
is the 18 -> 17 step written for the ops that changed in 18 (`onnx.defs`: since_version == 18):

- Reduce{Mean,Max,Min,Prod,L1,L2,LogSum,LogSumExp,SumSquare}: constant `axes` input -> `axes` attribute,
  `noop_with_empty_axes` dropped (ReduceSum moved axes to an input at 13 and is unchanged);
- Pad without the `axes` input, Split without `num_outputs`, Resize with default `antialias` /
  `keep_aspect_ratio_policy`, ScatterElements / ScatterND without min / max reduction: the same op at 17;
- anything else new in 18 (GroupNormalization, Col2Im, Bitwise*, ...) raises: it has no 17 form here.

The result is checked with `onnx.checker` (full check) by the caller's writer.
"""
from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

SUPPORTED_OPSETS = (17, 18, 19, 20, 21)
EXPORTER_OPSET = 18  # what torch's exporter builds before converting up
DEFAULT_OPSET = 17
_REDUCE_AXES_INPUT_AT_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                            "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}


def check_opset(opset: int) -> None:
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"--opset {opset} is not supported: the exporter writes opsets "
                         f"{SUPPORTED_OPSETS[0]}..{SUPPORTED_OPSETS[-1]} (17 by down-conversion from 18; 17 is the "
                         f"lowest with LayerNormalization, which TensorRT keeps in fp32)")


def model_opset(model: onnx.ModelProto) -> int:
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _constants(graph: onnx.GraphProto) -> dict:
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _refuse(node: onnx.NodeProto, why: str) -> None:
    raise ValueError(f"opset 17: node {node.name or node.output[0]!r} ({node.op_type}) {why}; export with "
                     f"--opset 18")


def _reduce_to_17(node: onnx.NodeProto, consts: dict) -> onnx.NodeProto:
    attrs = _attrs(node)
    noop = attrs.pop("noop_with_empty_axes", 0)
    axes = None
    if len(node.input) > 1 and node.input[1]:
        if node.input[1] not in consts:
            _refuse(node, "has non-constant axes")
        axes = [int(a) for a in consts[node.input[1]].reshape(-1)]
    if noop and not axes:
        _refuse(node, "uses noop_with_empty_axes=1 with empty axes")
    if axes:
        attrs["axes"] = axes
    return helper.make_node(node.op_type, [node.input[0]], list(node.output), name=node.name, **attrs)


def _same_at_17(node: onnx.NodeProto) -> bool:
    """Whether a node of an op changed at 18 means the same at 17 as it is."""
    attrs, op = _attrs(node), node.op_type
    if op == "Pad":
        return len(node.input) < 4 or not node.input[3]
    if op == "Split":
        return "num_outputs" not in attrs
    if op == "Resize":
        return attrs.get("antialias", 0) == 0 and attrs.get("keep_aspect_ratio_policy", b"stretch") == b"stretch"
    if op in ("ScatterElements", "ScatterND"):
        return attrs.get("reduction", b"none") not in (b"max", b"min")
    if op == "LpPool":
        return not attrs.get("ceil_mode", 0)
    return False


def to_opset17(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of an opset-18 `model` at opset 17 (see the module docstring); ValueError when a node has no
    opset-17 form. Custom-domain nodes (the TensorRT plugin) are kept."""
    if model_opset(model) != 18:
        raise ValueError(f"to_opset17 converts opset 18 models, got opset {model_opset(model)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if out.functions:
        raise ValueError("opset 17: models with local functions are not converted; export with --opset 18")
    graph = out.graph
    consts = _constants(graph)
    new_nodes = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            _refuse(node, "has a subgraph")
        if node.op_type in _REDUCE_AXES_INPUT_AT_18:
            new_nodes.append(_reduce_to_17(node, consts))
            continue
        schema = onnx.defs.get_schema(node.op_type, 18, "")
        if schema.since_version == 18 and not _same_at_17(node):
            _refuse(node, "has no opset-17 form")
        if node.op_type == "Resize":  # the defaults checked above, written out: attributes opset 17 lacks
            kept = [a for a in node.attribute if a.name not in ("antialias", "keep_aspect_ratio_policy")]
            del node.attribute[:]
            node.attribute.extend(kept)
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    for o in out.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 17
    return out
