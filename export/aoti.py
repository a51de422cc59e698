"""AOTInductor packages (.pt2) of the detector / pose tensor forward.

`torch.export` specialises the image size (wrappers.py), so a package is one fixed (batch, canvas,
classes) bucket, exactly like the ONNX export; callers pad up to it. The package calls MSDA as a fallback
op: the grid_sample reference on the CPU, the op's CUDA/Triton path on CUDA (not run here: no GPU).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .wrappers import ExportShape, example_inputs, wrap


def export_aoti(kind: str, decoder: torch.nn.Module, shape: ExportShape, path: str | Path,
                with_masks: bool = False) -> dict:
    """Compile `decoder` ("detector" / "pose") at `shape` into the package `path` (.pt2) plus a JSON record
    beside it. Returns the record (with "export_s" and "compile_s")."""
    from torch._inductor import aoti_compile_and_package

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = wrap(kind, decoder, with_masks)
    inputs = example_inputs(kind, decoder.cfg, shape)
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(module, inputs)
    t1 = time.perf_counter()
    aoti_compile_and_package(program, package_path=str(path))
    t2 = time.perf_counter()
    record = {"decoder": kind, "format": "aoti", "with_masks": with_masks,
              "inputs": {f"input{i}": list(t.shape) for i, t in enumerate(inputs)},
              "shape": {"batch": shape.batch, "height": shape.height, "width": shape.width,
                        "classes": shape.classes, "keypoints": shape.keypoints, "queries": shape.queries},
              "export_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}
    path.with_suffix(".json").write_text(json.dumps(record, indent=2))
    return record


def load_aoti(path: str | Path):
    """-> callable(*inputs) -> list of tensors (torch._inductor.aoti_load_package)."""
    from torch._inductor import aoti_load_package

    runner = aoti_load_package(str(path))

    def run(*inputs: torch.Tensor) -> list[torch.Tensor]:
        out = runner(*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    return run
