"""MSDA in ONNX: the TensorRT plugin node, and its pure-ONNX GridSample decomposition.

The torch exporter emits every `unimlm::ms_deform_attn` as one `MultiscaleDeformableAttnPlugin_TRT` node
(domain `trt.plugins`, DESIGN.md section 5 contract: value [N,S,M,D], spatial_shapes [L,2] int32,
level_start_index [L] int32, sampling_locations [N,Lq,M,L,P,2], attention_weights [N,Lq,M,L,P] ->
[N,Lq,M,D]) followed by a Reshape to the op's [N,Lq,M*D]. TensorRT's ONNX parser falls back to the plugin
registry for an unknown op type, where the built-in plugin is registered under that name (version 1).

`to_gridsample` rewrites each plugin node into a pure-ONNX subgraph (opset >= 16): per level a Slice of
value, GridSample (bilinear: mode "bilinear", or "linear" from opset 20 on; zeros padding, align_corners=0)
at 2*loc-1, times the level's weights, summed
over points and levels. The level sizes come from the constant spatial_shapes the exporter folds in.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

PLUGIN_OP = "MultiscaleDeformableAttnPlugin_TRT"
PLUGIN_DOMAIN = "trt.plugins"


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs by name."""
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _const_source(graph: onnx.GraphProto, name: str, consts: dict[str, np.ndarray]) -> np.ndarray:
    """Follow Cast nodes back to a constant; ValueError when the tensor is not constant."""
    producers = {o: n for n in graph.node for o in n.output}
    while name not in consts:
        node = producers.get(name)
        if node is None or node.op_type != "Cast":
            raise ValueError(f"MSDA input {name!r} is not a constant: cannot build the GridSample form")
        name = node.input[0]
    return consts[name]


class _Builder:
    """Emits nodes with unique names into a list."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.inits, self.i = prefix, [], [], 0

    def name(self) -> str:
        self.i += 1
        return f"{self.prefix}_{self.i}"

    def const(self, values, dtype=np.int64) -> str:
        n = self.name()
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), n))
        return n

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self.name()
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _plugin_to_subgraph(node: onnx.NodeProto, shapes: np.ndarray, starts: np.ndarray, m: int, d: int,
                        prefix: str, mode: str = "bilinear") -> _Builder:
    """Nodes computing the plugin's [N, Lq, M, D] output under the plugin's output name."""
    b = _Builder(prefix)
    value, _, _, loc, attn = node.input
    acc = None
    for lvl, ((h, w), start) in enumerate(zip(shapes.tolist(), starts.tolist())):
        v = b.op("Slice", [value, b.const([start]), b.const([start + h * w]), b.const([1])])  # [N, S_l, M, D]
        v = b.op("Reshape", [b.op("Transpose", [v], perm=[0, 2, 3, 1]), b.const([-1, d, h, w])])  # [N*M,D,h,w]
        g = b.op("Transpose", [b.op("Gather", [loc, b.const(lvl)], axis=3)], perm=[0, 2, 1, 3, 4])  # [N,M,Lq,P,2]
        g = b.op("Sub", [b.op("Mul", [g, b.const(2.0, np.float32)]), b.const(1.0, np.float32)])
        g = b.op("Flatten", [g], axis=2)  # [N*M, Lq*P*2]
        a = b.op("Transpose", [b.op("Gather", [attn, b.const(lvl)], axis=3)], perm=[0, 2, 1, 3])  # [N,M,Lq,P]
        lq_p = b.op("Shape", [a], start=2)  # [Lq, P]
        g = b.op("Reshape", [g, b.op("Concat", [b.const([-1]), lq_p, b.const([2])], axis=0)])  # [N*M, Lq, P, 2]
        s = b.op("GridSample", [v, g], mode=mode, padding_mode="zeros", align_corners=0)  # [N*M,D,Lq,P]
        a = b.op("Reshape", [a, b.op("Concat", [b.const([-1, 1]), lq_p], axis=0)])  # [N*M, 1, Lq, P]
        part = b.op("ReduceSum", [b.op("Mul", [s, a]), b.const([-1])], keepdims=0)  # [N*M, D, Lq]
        acc = part if acc is None else b.op("Add", [acc, part])
    n = b.op("Shape", [value], start=0, end=1)
    acc = b.op("Reshape", [acc, b.op("Concat", [n, b.const([m, d, -1])], axis=0)])  # [N, M, D, Lq]
    b.nodes.append(helper.make_node("Transpose", [acc], [node.output[0]], name=b.name(), perm=[0, 3, 1, 2]))
    return b


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == PLUGIN_OP and n.domain == PLUGIN_DOMAIN]


def _value_md(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[int, int]:
    """(M, D) of a plugin node, from its Reshape consumer's shape-inferred output or the value input."""
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = list(inferred.graph.value_info) + list(inferred.graph.input)
    for vi in infos:
        if vi.name == node.input[0]:
            dims = [x.dim_value for x in vi.type.tensor_type.shape.dim]
            if len(dims) == 4 and dims[2] > 0 and dims[3] > 0:
                return dims[2], dims[3]
    raise ValueError(f"cannot infer [M, D] of MSDA value {node.input[0]!r}")


def to_gridsample(model: onnx.ModelProto, level_sizes: list[tuple[int, int]] | None = None) -> onnx.ModelProto:
    """Copy of `model` with every plugin node replaced by its GridSample subgraph (opset >= 16).
    level_sizes: (H_l, W_l) per level; default: read from the constant spatial_shapes input. Level starts are
    the cumulative sizes (the op's contract)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    consts = _constants(graph)
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    mode = "linear" if opset >= 20 else "bilinear"
    new_nodes = []
    for i, node in enumerate(graph.node):
        if node.op_type != PLUGIN_OP or node.domain != PLUGIN_DOMAIN:
            new_nodes.append(node)
            continue
        if level_sizes is None:
            shapes = _const_source(graph, node.input[1], consts).astype(np.int64).reshape(-1, 2)
        else:
            shapes = np.asarray(level_sizes, dtype=np.int64).reshape(-1, 2)
        sizes = shapes[:, 0] * shapes[:, 1]
        starts = np.cumsum(sizes) - sizes
        m, d = _value_md(model, node)
        b = _plugin_to_subgraph(node, shapes, starts, m, d, f"msda{i}", mode)
        new_nodes.extend(b.nodes)
        graph.initializer.extend(b.inits)
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [o for o in out.opset_import if o.domain != PLUGIN_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    return out
