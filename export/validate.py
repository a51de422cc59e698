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
    return {"max_diff": max_scaled_diff(got, want), "run_s": dt}


DET_SHAPE = ExportShape(batch=2, height=96, width=96, classes=4)
DET_BUCKETS = {"canvases": "64x96,96x64", "batch": "1:2:2"}


@functools.lru_cache(maxsize=None)
def tiny_detector_export(msda: str = "plugin") -> tuple[torch.nn.Module, Path, dict]:
    """(decoder, main .onnx path, record): the tiny-random preset's detector (the engine's weights) exported once per
    process at opset 17 into a temporary directory, canvases 64x96 and 96x64 (the main file), batch 1..2
    (so three images run in two chunks), classes dynamic. Tests share it: it takes about a minute on 2 cores."""
    from .cli import export_decoder
    from .source import load_decoder

    decoder = load_decoder("detector", "tiny-random")
    out = Path(tempfile.mkdtemp(prefix="unimlm_export_"))
    record = export_decoder("detector", "tiny-random", "onnx", msda, 17, out, decoder=decoder, progress=False,
                            **DET_BUCKETS)
    return decoder, Path(record["path"]), record
