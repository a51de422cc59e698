"""ONNX export of the detector tensor forward (torch.onnx dynamo exporter, opset >= 17).

Why the dynamo exporter: `unimlm::ms_deform_attn` is a torch.library custom op, which `torch.export` keeps as
one node, so a `custom_translation_table` entry turns it into the TensorRT plugin node (msda_onnx.py); the
GridSample form is then an ONNX-level rewrite of that node. At opset >= 17 LayerNorm stays one
LayerNormalization node (TensorRT can keep it fp32).

Dynamic axes: batch and classes (dim_params "batch" / "classes", `wrappers.dynamic_shapes`); the canvas is
fixed per file (README.md). `export_onnx` writes one canvas and returns its bucket entry (per-input
min / opt / max profiles for TensorRT); cli.py writes the JSON record that lists every canvas file. The
opset written is the one requested (opset.py: 17 is converted down from the exporter's 18).
"""
from __future__ import annotations

import time
from pathlib import Path

import onnx
import torch

from .buckets import Range
from .msda_onnx import PLUGIN_DOMAIN, PLUGIN_OP, plugin_nodes, to_gridsample
from .opset import DEFAULT_OPSET, EXPORTER_OPSET, check_opset, model_opset, to_opset17
from .wrappers import (DETECTOR_INPUTS, DETECTOR_MASK_OUTPUTS, DETECTOR_OUTPUTS, ExportShape, check_kind,
                       dynamic_shapes, example_inputs, input_shapes, wrap)

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
    check_kind(kind)
    return DETECTOR_INPUTS, DETECTOR_MASK_OUTPUTS if with_masks else DETECTOR_OUTPUTS


def input_profiles(kind: str, cfg, shape: ExportShape, batch: Range, classes: Range) -> dict:
    """{input name: {min, opt, max, dtype}} of one canvas over the batch / class ranges."""
    names, _ = io_names(kind)
    at = {k: input_shapes(kind, cfg, shape, getattr(batch, k), getattr(classes, k)) for k in ("min", "opt", "max")}
    dtypes = ("float32", "bool", "float32", "bool")
    return {n: {"min": at["min"][i], "opt": at["opt"][i], "max": at["max"][i], "dtype": dtypes[i]}
            for i, n in enumerate(names)}


def export_onnx(kind: str, decoder: torch.nn.Module, shape: ExportShape, path: str | Path, msda: str = "onnx",
                opset: int = DEFAULT_OPSET, with_masks: bool = False, batch: Range | None = None,
                classes: Range | None = None) -> dict:
    """Export `decoder` (kind "detector") on shape's canvas to `path` (.onnx), batch / classes dynamic
    over the ranges (default: static at shape.batch / shape.classes). msda: "onnx" (GridSample decomposition)
    or "plugin" (MultiscaleDeformableAttnPlugin_TRT nodes). Returns the bucket entry: height, width, inputs
    (profiles), opset, export_s."""
    check_opset(opset)
    if msda not in MSDA_FORMS:
        raise ValueError(f"--msda must be one of {MSDA_FORMS}, got {msda!r}")
    batch = batch or Range(shape.batch, shape.batch, shape.batch)
    classes = classes or Range(shape.classes, shape.classes, shape.classes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = wrap(kind, decoder, with_masks)
    example = ExportShape(batch.example(), shape.height, shape.width, classes.example(), shape.queries)
    inputs = example_inputs(kind, decoder.cfg, example)
    names, outputs = io_names(kind, with_masks)
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(module, inputs, dynamo=True, opset_version=max(opset, EXPORTER_OPSET),
                                    dynamic_shapes=dynamic_shapes(kind, not batch.static, not classes.static),
                                    input_names=list(names), output_names=list(outputs), optimize=True,
                                    verbose=False, custom_translation_table=_TRANSLATIONS)
    model = program.model_proto
    if not plugin_nodes(model):
        raise RuntimeError("ONNX export: no MSDA plugin node in the exported graph")
    if opset == 17:
        model = to_opset17(model)
    if msda == "onnx":
        model = to_gridsample(model)
    if model_opset(model) != opset:
        raise RuntimeError(f"ONNX export: asked for opset {opset}, the exporter wrote {model_opset(model)}")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return {"height": shape.height, "width": shape.width, "opset": opset,
            "inputs": input_profiles(kind, decoder.cfg, shape, batch, classes),
            "export_s": round(time.perf_counter() - t0, 2)}
