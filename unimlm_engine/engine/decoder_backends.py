"""Decoder backends: one interface for the detector / pose tensor forward (DESIGN.md section 3, step 5).

A backend runs the tensor-level forward of a decoder (`forward_tensors`, see export/wrappers.py for the
signatures); pre-processing (resize, pad, payload stacking) and post-processing (top-k, threshold, pixels)
stay in the decoder's Python `forward`. `attach_backend` swaps a decoder's `forward_tensors` for a backend, so
`DecoderSet.run_decoder` and the engine's decoder workers run through it unchanged.

Kinds:
- "eager": the module itself. On CUDA it captures one CUDA graph per input-shape bucket and replays it
  (UNTESTED: no GPU on the build machine); on the CPU it is the plain forward.
- "onnxruntime": an exported .onnx (CPU provider; a plugin-form file runs through its GridSample rewrite).
- "aoti": an AOTInductor .pt2 package.
- "tensorrt": a serialized engine through export/tensorrt.py (UNTESTED: TensorRT is not installable here).

Exported artifacts are one fixed (batch, canvas, classes) bucket (export/onnx_export.py); `FixedBucket` pads
a call up to it (invalid pixels / classes, repeated batch rows) and slices the outputs back. The decoders are
padding-invariant, so results match the eager module's up to float error.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

BACKEND_KINDS = ("eager", "onnxruntime", "aoti", "tensorrt")
_PREFIXES = ("gdino", "unipose")


class DecoderBackend:
    """run(*inputs) -> tuple of output tensors, inputs/outputs as the exported tensor forward (wrappers.py)."""

    kind = "abstract"

    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


class EagerBackend(DecoderBackend):
    """fn: the module's tensor forward. CUDA inputs: one captured CUDA graph per input-shape key (untested)."""

    kind = "eager"

    def __init__(self, fn: Callable[..., tuple], use_cuda_graphs: bool = True):
        self.fn, self.use_cuda_graphs = fn, use_cuda_graphs
        self._graphs: dict[tuple, tuple] = {}

    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not (self.use_cuda_graphs and inputs[0].is_cuda):
            return tuple(self.fn(*inputs))
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key not in self._graphs:
            static_in = [x.clone() for x in inputs]
            self.fn(*static_in)  # warm-up outside capture (allocator, lazy init)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = tuple(self.fn(*static_in))
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        for dst, src in zip(static_in, inputs):
            dst.copy_(src)
        graph.replay()
        return tuple(o.clone() for o in static_out)


class OnnxRuntimeBackend(DecoderBackend):
    kind = "onnxruntime"

    def __init__(self, path: str | Path):
        from unimlm_engine.export.validate import ort_session

        self.session = ort_session(path)

    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from unimlm_engine.export.validate import run_session

        device = inputs[0].device
        return tuple(o.to(device) for o in run_session(self.session, tuple(x.cpu() for x in inputs)))


class AotiBackend(DecoderBackend):
    kind = "aoti"

    def __init__(self, path: str | Path):
        from unimlm_engine.export.aoti import load_aoti

        self.fn = load_aoti(path)

    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.fn(*inputs))


class TensorRTBackend(DecoderBackend):
    """Untested here (no TensorRT); inputs must be CUDA tensors."""

    kind = "tensorrt"

    def __init__(self, path: str | Path):
        from unimlm_engine.export.tensorrt import TrtRunner

        self.runner = TrtRunner(path)

    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.runner.run(*inputs))


def make_backend(kind: str, path: str | Path | None = None, fn: Callable | None = None) -> DecoderBackend:
    """kind: one of BACKEND_KINDS; path: the artifact (onnxruntime / aoti / tensorrt); fn: eager forward."""
    if kind == "eager":
        if fn is None:
            raise ValueError("eager backend needs the module's tensor forward (fn)")
        return EagerBackend(fn)
    if kind not in BACKEND_KINDS:
        raise ValueError(f"unknown decoder backend {kind!r}; kinds: {', '.join(BACKEND_KINDS)}")
    if path is None or not Path(path).exists():
        raise FileNotFoundError(f"{kind} backend: artifact {path} not found")
    return {"onnxruntime": OnnxRuntimeBackend, "aoti": AotiBackend, "tensorrt": TensorRTBackend}[kind](path)


def _pad_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Pad x with zeros / False at the end of every non-batch dim up to `size`, then repeat the last batch row
    up to size[0] (an all-invalid row would divide by a zero valid extent). Never shrinks."""
    pad = []
    for have, want in zip(reversed(x.shape), reversed(list(size))):
        if have > want:
            raise ValueError(f"input shape {tuple(x.shape)} does not fit the exported bucket {tuple(size)}")
        pad += [0, want - have]
    pad[-1] = 0
    x = F.pad(x.to(torch.uint8), pad).bool() if x.dtype == torch.bool else F.pad(x, pad)
    if x.shape[0] < size[0]:
        x = torch.cat([x, x[-1:].expand(size[0] - x.shape[0], *x.shape[1:])], 0)
    return x


class FixedBucket:
    """Runs a backend exported at one fixed shape: pads each call (chunks of the exported batch) and slices
    the outputs back. kind: "detector" | "pose"; shape: the export record's "shape"."""

    def __init__(self, backend: DecoderBackend, kind: str, shape: dict, with_masks: bool):
        self.backend, self.kind, self.shape, self.with_masks = backend, kind, shape, with_masks

    def _sizes(self, inputs: tuple[torch.Tensor, ...]) -> list[tuple[int, ...]]:
        s = self.shape
        b, h, w, c = s["batch"], s["height"], s["width"], s["classes"]
        sizes = [(b, 3, h, w), (b, h, w), (b, c) + tuple(inputs[2].shape[2:]), (b, c)]
        if self.kind == "pose":
            sizes.append((b,) + tuple(inputs[4].shape[1:]))
        return sizes

    def _chunk(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        n = inputs[0].shape[0]
        padded = [_pad_to(x, size) for x, size in zip(inputs, self._sizes(inputs))]
        outs = self.backend.run(*padded)
        if self.kind == "pose":
            return tuple(o[:n] for o in outs)
        c, (h, w) = inputs[3].shape[1], inputs[0].shape[-2:]
        logits, boxes = outs[0][:n, :, :c], outs[1][:n]
        return (logits, boxes, outs[2][:n, :, :h // 4, :w // 4]) if self.with_masks else (logits, boxes)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        step = self.shape["batch"]
        parts = [self._chunk(tuple(x[i:i + step] for x in inputs)) for i in range(0, inputs[0].shape[0], step)]
        return tuple(torch.cat(p, 0) for p in zip(*parts))


def _resolve(decoder_set, route_or_prefix: str) -> tuple[torch.nn.Module, str]:
    if route_or_prefix in _PREFIXES:
        module = getattr(decoder_set, route_or_prefix)
        if module is None:
            raise ValueError(f"no {route_or_prefix} decoder configured in this model")
    else:
        module = decoder_set.decoder_for(route_or_prefix)
    name = type(module).__name__
    if name not in ("DetectorDecoder", "PoseDecoder"):
        raise ValueError(f"{route_or_prefix}: backends serve the detector and pose decoders, not {name}")
    return module, "detector" if name == "DetectorDecoder" else "pose"


def _record(path: str | Path) -> dict:
    meta = Path(path).with_suffix(".json")
    if not meta.exists():
        raise FileNotFoundError(f"export record {meta} (written by unimlm export beside the artifact) not found")
    return json.loads(meta.read_text())


def detach_backend(module: torch.nn.Module) -> None:
    """Restore the module's own forward_tensors."""
    module.__dict__.pop("forward_tensors", None)
    module.__dict__.pop("decoder_backend", None)


def attach_backend(decoder_set, route_or_prefix: str, kind: str, path: str | Path | None = None) -> DecoderBackend:
    """Make the detector ("gdino" / "[DET]" / "[GRD]" / "[SEG]") or pose ("unipose" / "[POSE]") decoder of
    `decoder_set` run its tensor forward through backend `kind` loaded from `path` (the exported artifact with
    its JSON record beside it; none for "eager"). A detector backend exported without masks serves [SEG]
    calls (with_masks=True) through the eager module. Returns the backend."""
    module, dkind = _resolve(decoder_set, route_or_prefix)
    detach_backend(module)
    own = module.forward_tensors
    if kind == "eager":
        fn = own if dkind == "pose" else (lambda *x: own(*x, False)[:2])
        backend = make_backend("eager", fn=fn)
        call, with_masks = backend.run, False
    else:
        rec = _record(path)
        if rec.get("decoder") != dkind:
            raise ValueError(f"{path} is a {rec.get('decoder')} export, {route_or_prefix} is served by the {dkind}")
        with_masks = bool(rec.get("with_masks", False))
        backend = make_backend(kind, path)
        call = FixedBucket(backend, dkind, rec["shape"], with_masks)
    if dkind == "pose":
        module.forward_tensors = call
    else:
        def forward_tensors(pixel_values, pixel_valid, class_payloads, class_valid, want_masks: bool = False):
            if want_masks and not with_masks:
                return own(pixel_values, pixel_valid, class_payloads, class_valid, True)
            outs = call(pixel_values, pixel_valid, class_payloads, class_valid)
            return (outs[0], outs[1], outs[2] if want_masks else None)

        module.forward_tensors = forward_tensors
    module.decoder_backend = backend
    return backend
