"""Decoder back ends: one interface for the detector / pose tensor forward (DESIGN.md section 3, step 5).

A back end runs the tensor-level forward of a decoder (`forward_tensors`, see export/wrappers.py for the
signatures); pre-processing (resize, pad, payload stacking) and post-processing (top-k, threshold, pixels)
stay in the decoder's Python `forward`. `load_route_backend` loads one for a route (or for every route of a
decoder); `DecoderSet.run(..., backend=...)` passes it to the decoder per call, so the model itself never
changes and two engines over one model can use different back ends. EngineConfig.decoder_backends / the
CLI's `--decoder-backend ROUTE=KIND[:PATH]` choose them (`parse_backend_spec`).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

BACKEND_KINDS = ("eager", "onnxruntime", "aoti", "tensorrt")


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


def _record(path: str | Path) -> dict:
    meta = Path(path).with_suffix(".json")
    if not meta.exists():
        raise FileNotFoundError(f"export record {meta} (written by unimlm export beside the artifact) not found")
    return json.loads(meta.read_text())


def parse_backend_spec(spec: str) -> tuple[str, str, Optional[str]]:
    """"det=onnxruntime:out/det.onnx" -> ("det", "onnxruntime", "out/det.onnx"); "seg=eager" -> path None.
    The key is a route name ("det", "[DET]") or a decoder name ("gdino": every route of that decoder)."""
    key, sep, rest = spec.partition("=")
    kind, _, path = rest.partition(":")
    if not sep or not key.strip() or not kind:
        raise ValueError(f"decoder backend {spec!r}: expected ROUTE=KIND[:PATH], e.g. det=onnxruntime:out/det.onnx")
    kind = kind.strip()
    if kind not in BACKEND_KINDS:
        raise ValueError(f"decoder backend {spec!r}: unknown kind {kind!r}; kinds: {', '.join(BACKEND_KINDS)}")
    if kind != "eager" and not path:
        raise ValueError(f"decoder backend {spec!r}: {kind} needs the exported file (ROUTE={kind}:PATH)")
    return key.strip(), kind, path or None


@dataclass
class RouteBackend:
    """A loaded back end for one decoder. forward: the decoder's `forward_tensors` replacement;
    routes: the route tokens it was loaded for; record: the export's JSON record ({} for eager)."""

    kind: str
    forward: Callable[..., tuple]
    routes: tuple[str, ...]
    decoder: Any = None
    record: dict = field(default_factory=dict)
    path: Optional[str] = None

    def serves(self, route) -> bool:
        """Whether this back end runs `route`'s calls (a detector export without masks cannot serve SEG)."""
        return route.token in self.routes and (self.kind == "eager" or self.decoder.accepts_backend(route,
                                                                                                   self.record))


def load_route_backend(decoder, routes: Sequence, kind: str, path: str | Path | None = None) -> RouteBackend:
    """Load back end `kind` from `path` (the exported artifact with its JSON record beside it; none for
    "eager") for `routes` (RouteSpecs served by `decoder`). Raises ValueError when the decoder has no export
    path or the artifact is another decoder's, FileNotFoundError when the artifact or record is missing."""
    ekind = getattr(decoder, "export_kind", None)
    if ekind is None:
        raise ValueError(f"{'/'.join(r.token for r in routes)}: back ends serve the detector and pose decoders, "
                         f"not {type(decoder).__name__}")
    own, tokens = decoder.forward_tensors, tuple(r.token for r in routes)
    if kind == "eager":
        if ekind == "pose":
            return RouteBackend("eager", make_backend("eager", fn=own).run, tokens, decoder)
        # one graph set per mask flag: the tensors in and out must be tensors only
        calls = {m: make_backend("eager", fn=lambda *x, m=m: own(*x, m)[:3 if m else 2]).run for m in (False, True)}
        with_masks = True
    else:
        rec = _record(path)
        if rec.get("decoder") != ekind:
            raise ValueError(f"{path} is a {rec.get('decoder')} export; {routes[0].token} is served by the {ekind}")
        with_masks = bool(rec.get("with_masks", False))
        call = FixedBucket(make_backend(kind, path), ekind, rec["shape"], with_masks)
        if ekind == "pose":
            return RouteBackend(kind, call, tokens, decoder, rec, str(path))
        calls = {False: call, True: call}

    def forward(pixel_values, pixel_valid, class_payloads, class_valid, want_masks: bool = False):
        if want_masks and not with_masks:
            raise ValueError(f"{path}: this export has no mask head; export `seg` for [SEG]")
        outs = calls[bool(want_masks)](pixel_values, pixel_valid, class_payloads, class_valid)
        return outs[0], outs[1], outs[2] if want_masks else None

    return RouteBackend(kind, forward, tokens, decoder, {} if kind == "eager" else rec,
                        None if kind == "eager" else str(path))
