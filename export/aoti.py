"""AOTInductor packages (.pt2) of the detector tensor forward.

Like the ONNX export: one package per canvas (the image size cannot be dynamic, README.md), batch and class
count dynamic (`wrappers.dynamic_shapes`) unless a range pins them. A package runs on the device the decoder
was on when it was compiled (`unimlm export` compiles on the CPU). It calls MSDA as a fallback op: on the CPU
the C++ CPU kernel (fp32) or the grid_sample reference, the op's CUDA/Triton path on CUDA.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .buckets import Range
from .onnx_export import input_profiles
from .wrappers import ExportShape, dynamic_shapes, example_inputs, wrap


def export_aoti(kind: str, decoder: torch.nn.Module, shape: ExportShape, path: str | Path,
                with_masks: bool = False, batch: Range | None = None, classes: Range | None = None) -> dict:
    """Compile `decoder` (kind "detector") on shape's canvas into the package `path` (.pt2), batch / classes
    dynamic over the ranges (default: static at shape.batch / shape.classes), for the device the decoder is
    on. Returns the bucket entry: height, width, inputs (profiles), export_s, compile_s."""
    from torch._inductor import aoti_compile_and_package

    batch = batch or Range(shape.batch, shape.batch, shape.batch)
    classes = classes or Range(shape.classes, shape.classes, shape.classes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = wrap(kind, decoder, with_masks)
    example = ExportShape(batch.example(), shape.height, shape.width, classes.example(), shape.queries)
    device = next(decoder.parameters()).device
    inputs = tuple(x.to(device) for x in example_inputs(kind, decoder.cfg, example))
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(module, inputs,
                                      dynamic_shapes=dynamic_shapes(kind, not batch.static, not classes.static))
    t1 = time.perf_counter()
    aoti_compile_and_package(program, package_path=str(path))
    t2 = time.perf_counter()
    return {"height": shape.height, "width": shape.width,
            "inputs": input_profiles(kind, decoder.cfg, shape, batch, classes),
            "export_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}


def load_aoti(path: str | Path):
    """-> callable(*inputs) -> list of tensors (torch._inductor.aoti_load_package)."""
    from torch._inductor import aoti_load_package

    runner = aoti_load_package(str(path))

    def run(*inputs: torch.Tensor) -> list[torch.Tensor]:
        out = runner(*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    return run
