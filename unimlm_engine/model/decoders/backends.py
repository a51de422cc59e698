"""Decoder back ends: one interface for the detector tensor forward (DESIGN.md section 3, step 5).

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

An export is one artifact per canvas bucket (dynamic batch and class count) plus one JSON record beside the
main artifact that lists them (export/README.md); `BucketedBackend` runs each call on the bucket of its
canvas (the official detector is not padding-invariant, so a call runs on exactly its canvas), padding /
cropping the class dim and the batch to it and mapping the outputs back. Only the detector has an export
path: UniPose, the [POSE] decoder, has none, and `load_route_backend` refuses it with a clear error.
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
        # a package reads its inputs with the traced (contiguous) strides
        return tuple(self.fn(*(x.contiguous() for x in inputs)))


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


def _fit(x: torch.Tensor, size: Sequence[int], fill: float = 0.0) -> torch.Tensor:
    """Crop or pad (`fill`; False for bool) every non-batch dim of x to `size[1:]`, then repeat the last batch
    row up to size[0] (an all-invalid row would divide by a zero valid extent). Contiguous: AOTI packages
    read their inputs with the traced (contiguous) strides."""
    x = x[(slice(None),) + tuple(slice(0, s) for s in size[1:])]
    pad = []
    for have, want in zip(reversed(x.shape[1:]), reversed(list(size[1:]))):
        pad += [0, want - have]
    if any(pad):
        x = F.pad(x.to(torch.uint8), pad).bool() if x.dtype == torch.bool else F.pad(x, pad, value=fill)
    if x.shape[0] < size[0]:
        x = torch.cat([x, x[-1:].expand(size[0] - x.shape[0], *x.shape[1:])], 0)
    return x.contiguous()


def _extent(valid: torch.Tensor, dim: int) -> int:
    """1 + the last index along `dim` where any entry of the bool tensor `valid` is True (1 when none is)."""
    hit = valid.any(dim=tuple(d for d in range(valid.dim()) if d != dim)).nonzero()
    return int(hit[-1]) + 1 if len(hit) else 1


@dataclass
class Bucket:
    """One exported canvas: its artifact's backend, the canvas (height, width) and the (min, max) batch and
    class counts the artifact accepts (min == max: a static dim)."""

    backend: DecoderBackend
    height: int
    width: int
    batch: tuple[int, int]
    classes: tuple[int, int]

    def fits(self, height: int, width: int, classes: int) -> bool:
        return height <= self.height and width <= self.width and classes <= self.classes[1]


class BucketedBackend:
    """Runs an export made of per-canvas artifacts (buckets) behind the `forward_tensors` signature.

    A call is split into chunks of at most the largest exported batch; each chunk runs on the smallest canvas
    that holds every valid pixel of its images (their extent, not the call's canvas: images of a size no
    export was made at fit the next larger canvas) and whose class range holds its classes. Inputs are
    cropped / padded to that canvas and class count (padding invalid, the last batch row repeated up to the
    bucket's min batch) and the outputs are mapped back: logits to the call's classes (-inf where padded,
    like the eager module), mask logits to the call's canvas / 4 (0 outside the images, like eager); this
    matches the eager module only for a padding-invariant decoder. exact_canvas (the official detector, which
    is not padding-invariant: Swin and the GroupNorms see the padding; `load_route_backend` always sets it): a
    call runs only on the bucket of exactly its canvas (the detector calls once per canvas).
    kind: "detector" (the only decoder with an export)."""

    def __init__(self, buckets: Sequence[Bucket], kind: str, with_masks: bool, exact_canvas: bool = False):
        if not buckets:
            raise ValueError("an export needs at least one bucket")
        if kind != "detector":
            raise ValueError(f"no bucketed back end for decoder kind {kind!r}; only the detector has an export")
        self.buckets = sorted(buckets, key=lambda b: (b.height * b.width, b.height, b.classes[1]))
        self.kind, self.with_masks, self.exact_canvas = kind, with_masks, exact_canvas
        self.max_batch = max(b.batch[1] for b in self.buckets)

    def select(self, height: int, width: int, classes: int) -> Bucket:
        """The smallest bucket holding a `height` x `width` valid extent (exact_canvas: of exactly that canvas)
        and `classes` classes."""
        for b in self.buckets:
            if (b.height == height and b.width == width and classes <= b.classes[1]) if self.exact_canvas \
                    else b.fits(height, width, classes):
                return b
        have = ", ".join(f"{b.height}x{b.width} (classes <= {b.classes[1]})" for b in self.buckets)
        if self.exact_canvas:
            raise ValueError(f"no exported bucket for the {height}x{width} canvas with {classes} classes (the "
                             f"official detector runs each image on its own canvas); exported: {have}; export "
                             f"--canvas {height}x{width} (or the default 'auto' list) / a larger --classes")
        raise ValueError(f"images of {height}x{width} valid pixels with {classes} classes do not fit the exported "
                         f"buckets: {have}; export a larger --canvas / --classes")

    def _run(self, bucket: Bucket, inputs: Sequence[torch.Tensor], canvas: tuple[int, int], classes: int):
        n = inputs[0].shape[0]
        rows = max(n, bucket.batch[0])
        c = max(_extent(inputs[3], 1), bucket.classes[0])
        h, w = bucket.height, bucket.width
        sizes = [(rows, 3, h, w), (rows, h, w), (rows, c) + tuple(inputs[2].shape[2:]), (rows, c)]
        outs = bucket.backend.run(*(_fit(x, size) for x, size in zip(inputs, sizes)))
        logits = _fit(outs[0][:n], (n, outs[0].shape[1], classes), float("-inf"))
        if not self.with_masks:
            return logits, outs[1][:n]
        masks = outs[2][:n]
        return logits, outs[1][:n], _fit(masks, (n, masks.shape[1], canvas[0] // 4, canvas[1] // 4))

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n, canvas, classes = inputs[0].shape[0], tuple(inputs[0].shape[-2:]), inputs[3].shape[1]
        parts, i = [], 0
        while i < n:
            chunk = [x[i:i + self.max_batch] for x in inputs]
            hw = canvas if self.exact_canvas else (_extent(chunk[1], 1), _extent(chunk[1], 2))
            bucket = self.select(*hw, _extent(chunk[3], 1))
            take = min(chunk[0].shape[0], bucket.batch[1])
            parts.append(self._run(bucket, [x[:take] for x in chunk], canvas, classes))
            i += take
        return tuple(torch.cat(p, 0) for p in zip(*parts))


_FILE_KEYS = {"onnxruntime": "onnx", "aoti": "aoti", "tensorrt": "tensorrt"}


def _record(path: str | Path) -> dict:
    meta = Path(path).with_suffix(".json")
    if not meta.exists():
        raise FileNotFoundError(f"export record {meta} (written by unimlm export beside the artifact) not found")
    rec = json.loads(meta.read_text())
    if not isinstance(rec.get("buckets"), list) or not rec["buckets"]:
        raise ValueError(f"export record {meta} lists no canvas buckets (written by an older unimlm export?); "
                         f"export again")
    return rec


def _load_buckets(rec: dict, kind: str, path: str | Path) -> list[Bucket]:
    """One Bucket per canvas of the record, its artifact (of back end `kind`) beside `path`."""
    path, key = Path(path), _FILE_KEYS[kind]
    out = []
    for b in rec["buckets"]:
        name = b.get("files", {}).get(key)
        if name is None:
            raise ValueError(f"{path}: the export record has no {key} artifacts (it was exported with --format "
                             f"{rec.get('format')})")
        out.append(Bucket(make_backend(kind, path.parent / name), b["height"], b["width"],
                          (rec["batch"]["min"], rec["batch"]["max"]), (rec["classes"]["min"], rec["classes"]["max"])))
    return out


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
        why = " (UniPose, the official [POSE] decoder, has no export path yet: serve it eagerly)" \
            if getattr(decoder, "name", "") == "unipose" else ""
        raise ValueError(f"{'/'.join(r.token for r in routes)}: back ends serve the detector only, not "
                         f"{type(decoder).__name__}{why}")
    own, tokens = decoder.forward_tensors, tuple(r.token for r in routes)
    if kind == "eager":
        # one graph set per mask flag: the tensors in and out must be tensors only
        calls = {m: make_backend("eager", fn=lambda *x, m=m: own(*x, m)[:3 if m else 2]).run for m in (False, True)}
        with_masks = True
    else:
        rec = _record(path)
        if rec.get("decoder") != ekind:
            raise ValueError(f"{path} is a {rec.get('decoder')} export; {routes[0].token} is served by the {ekind}")
        with_masks = bool(rec.get("with_masks", False))
        if rec.get("gdino") != "official":
            raise ValueError(f"{path}: a detector export made before the official gdino layout (pad-64, masked "
                             f"canvas); export again")
        call = BucketedBackend(_load_buckets(rec, kind, path), ekind, with_masks, exact_canvas=True)
        calls = {False: call, True: call}

    def forward(pixel_values, pixel_valid, class_payloads, class_valid, want_masks: bool = False):
        if want_masks and not with_masks:
            raise ValueError(f"{path}: this export has no mask head; export `seg` for [SEG]")
        outs = calls[bool(want_masks)](pixel_values, pixel_valid, class_payloads, class_valid)
        return outs[0], outs[1], outs[2] if want_masks else None

    return RouteBackend(kind, forward, tokens, decoder, {} if kind == "eager" else rec,
                        None if kind == "eager" else str(path))
