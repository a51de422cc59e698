"""ONNX export of the detector / pose tensor forward (torch.onnx dynamo exporter, opset >= 17).

Why the dynamo exporter: `unimlm::ms_deform_attn` is a torch.library custom op, which `torch.export` keeps as
one node, so a `custom_translation_table` entry turns it into the TensorRT plugin node (msda_onnx.py); the
GridSample form is then an ONNX-level rewrite of that node. At opset >= 17 LayerNorm stays one
LayerNormalization node (TensorRT can keep it fp32).

Dynamic axes: none. `torch.export` specialises the image size (see wrappers.py) and the batch / class
dims with it, so an export is one fixed (batch, canvas, classes) bucket. The decoders are padding-invariant,
so callers pad smaller batches, images and class lists up to the bucket (decoder_backends.py). The shapes are
written to `<name>.json` beside the .onnx as min = opt = max profiles for TensorRT.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import onnx
import torch

from .msda_onnx import PLUGIN_DOMAIN, PLUGIN_OP, plugin_nodes, to_gridsample
from .wrappers import (DETECTOR_INPUTS, DETECTOR_MASK_OUTPUTS, DETECTOR_OUTPUTS, POSE_INPUTS, POSE_OUTPUTS,
                       ExportShape, example_inputs, wrap)

MIN_OPSET = 17
# torch 2.13's exporter implements opset 18 and fails to down-convert these graphs (ReduceSum axes input),
# so a request for 17 gets 18; the JSON records the opset the file holds.
EXPORTER_MIN_OPSET = 18
MSDA_FORMS = ("onnx", "plugin")


def _register_plugin_schema() -> None:
    """Give the plugin op an ONNX schema (onnxscript refuses ops without one); idempotent."""
    from onnx.defs import OpSchema

    if onnx.defs.has(PLUGIN_OP, PLUGIN_DOMAIN):
        return
    f = OpSchema.FormalParameter
    inputs = [f("value", "T"), f("spatial_shapes", "I"), f("level_start_index", "I"),
              f("sampling_locations", "T"), f("attention_weights", "T")]
    schema = OpSchema(PLUGIN_OP, PLUGIN_DOMAIN, 1, inputs=inputs, outputs=[f("output", "T")],
                      type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float"),
                                        ("I", ["tensor(int32)"], "int32")],
                      doc="TensorRT built-in multi-scale deformable attention plugin: -> [N, Lq, M, D]")
    onnx.defs.register_schema(schema)


def _msda_plugin(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                 softmax_weights: bool = False):
    """onnxscript translation of unimlm::ms_deform_attn -> plugin node + Reshape to [N, Lq, M*D]."""
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    if softmax_weights:
        raise ValueError("ONNX export: ms_deform_attn(softmax_weights=True) has no plugin form; the decoders "
                         "pass softmaxed weights")
    _register_plugin_schema()
    plugin = Op(Opset(PLUGIN_DOMAIN, 1), PLUGIN_OP)
    out = plugin(value, op.Cast(spatial_shapes, to=6), op.Cast(level_start_index, to=6), sampling_locations,
                 attention_weights)
    shape = op.Concat(op.Shape(sampling_locations, start=0, end=2), op.Constant(value_ints=[-1]), axis=0)
    return op.Reshape(out, shape)


_TRANSLATIONS = {torch.ops.unimlm.ms_deform_attn.default: _msda_plugin}


def io_names(kind: str, with_masks: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if kind == "detector":
        return DETECTOR_INPUTS, DETECTOR_MASK_OUTPUTS if with_masks else DETECTOR_OUTPUTS
    return POSE_INPUTS, POSE_OUTPUTS


def shape_record(kind: str, shape: ExportShape, inputs: tuple[torch.Tensor, ...], msda: str, opset: int,
                 with_masks: bool) -> dict:
    """The JSON written beside the .onnx: per input min / opt / max shapes (all equal: a fixed bucket)."""
    names, outputs = io_names(kind, with_masks)
    prof = {n: {"min": list(t.shape), "opt": list(t.shape), "max": list(t.shape), "dtype": str(t.dtype)[6:]}
            for n, t in zip(names, inputs)}
    return {"decoder": kind, "msda": msda, "opset": opset, "with_masks": with_masks, "inputs": prof,
            "outputs": list(outputs), "shape": {"batch": shape.batch, "height": shape.height,
                                                "width": shape.width, "classes": shape.classes,
                                                "keypoints": shape.keypoints, "queries": shape.queries}}


def export_onnx(kind: str, decoder: torch.nn.Module, shape: ExportShape, path: str | Path, msda: str = "onnx",
                opset: int = MIN_OPSET, with_masks: bool = False) -> dict:
    """Export `decoder` ("detector" / "pose") at `shape` to `path` (.onnx) plus `path.with_suffix('.json')`.
    msda: "onnx" (GridSample decomposition) or "plugin" (MultiscaleDeformableAttnPlugin_TRT nodes).
    Returns the JSON record (with "export_s")."""
    if opset < MIN_OPSET:
        raise ValueError(f"ONNX export needs opset >= {MIN_OPSET} (LayerNorm as LayerNormalization, GridSample), "
                         f"got {opset}")
    if msda not in MSDA_FORMS:
        raise ValueError(f"--msda must be one of {MSDA_FORMS}, got {msda!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = wrap(kind, decoder, with_masks)
    inputs = example_inputs(kind, decoder.cfg, shape)
    names, outputs = io_names(kind, with_masks)
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(module, inputs, dynamo=True, opset_version=max(opset, EXPORTER_MIN_OPSET),
                                    input_names=list(names), output_names=list(outputs), optimize=True,
                                    verbose=False, custom_translation_table=_TRANSLATIONS)
    model = program.model_proto
    if not plugin_nodes(model):
        raise RuntimeError("ONNX export: no MSDA plugin node in the exported graph")
    if msda == "onnx":
        model = to_gridsample(model)
    onnx.save(model, str(path))
    # The exporter may keep a newer opset when it cannot down-convert; record what the file holds.
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    record = shape_record(kind, shape, inputs, msda, opset, with_masks)
    record["export_s"] = round(time.perf_counter() - t0, 2)
    path.with_suffix(".json").write_text(json.dumps(record, indent=2))
    return record
