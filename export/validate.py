"""Check an exported decoder against the eager module on random inputs (ONNX Runtime CPU / AOTInductor)."""
from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .msda_onnx import plugin_nodes, to_gridsample
from .wrappers import ExportShape, example_inputs, wrap


def ort_session(path_or_model):
    """InferenceSession on the CPU; a plugin-form model is run through its GridSample rewrite (ORT has no
    MultiscaleDeformableAttnPlugin_TRT kernel)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path_or_model)) if not isinstance(path_or_model, onnx.ModelProto) else path_or_model
    if plugin_nodes(model):
        model = to_gridsample(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_session(sess, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, feed)]


def max_scaled_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """max |got - want| / max(1, max |want|) over all outputs (finite entries; infinities must match)."""
    worst = 0.0
    for g, w in zip(got, want):
        g, w = g.double(), w.double()
        fin = torch.isfinite(w)
        if not torch.equal(fin, torch.isfinite(g)) or not torch.equal(g[~fin], w[~fin]):
            return float("inf")
        if fin.any():
            scale = max(1.0, float(w[fin].abs().max()))
            worst = max(worst, float((g[fin] - w[fin]).abs().max()) / scale)
    return worst


def compare(kind: str, decoder: torch.nn.Module, runner, shape: ExportShape, valid_hw: tuple[int, int],
            with_masks: bool = False, seed: int = 1) -> dict:
    """runner: callable(inputs) -> list of tensors. Eager vs runner at `shape` with images of `valid_hw`."""
    inputs = example_inputs(kind, decoder.cfg, shape, valid_hw, seed)
    with torch.no_grad():
        want = [t for t in wrap(kind, decoder, with_masks)(*inputs)]
    t0 = time.perf_counter()
    got = runner(inputs)
    dt = time.perf_counter() - t0
    if kind == "pose":  # labels are integer outputs: compare exactly, the rest scaled
        return {"max_diff": max_scaled_diff([got[0], got[2], got[3]], [want[0], want[2], want[3]]),
                "labels_equal": bool(torch.equal(got[1].long(), want[1].long())), "run_s": dt}
    return {"max_diff": max_scaled_diff(got, want), "run_s": dt}


DET_SHAPE = ExportShape(batch=2, height=128, width=128, classes=4)


@functools.lru_cache(maxsize=None)
def tiny_detector_export(msda: str = "plugin") -> tuple[torch.nn.Module, Path, dict]:
    """(decoder, .onnx path, record): the tiny-preset detector (seed 0) exported once per process at
    DET_SHAPE into a temporary directory (tests share it: an export takes about a minute on 2 cores)."""
    from .cli import build_decoder
    from .onnx_export import export_onnx

    decoder = build_decoder("detector", "tiny")
    path = Path(tempfile.mkdtemp(prefix="unimlm_export_")) / f"detector_{msda}.onnx"
    return decoder, path, export_onnx("detector", decoder, DET_SHAPE, path, msda=msda, opset=17)
