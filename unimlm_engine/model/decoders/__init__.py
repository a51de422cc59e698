"""Task decoders and the set that serves them (DESIGN.md section 1, "Decoders").

Every decoder is a `TaskDecoder` (base.py) registered under its official checkpoint prefix:

  gdino    DetectorDecoder   [DET] [GRD] [SEG]   (detector.py)
  unipose  PoseDecoder       [POSE]              (pose.py)
  sd       SDDecoder         [GEN]               (generation.py)
  ip2p     IP2PDecoder       [EDIT]              (generation.py)

and the span-route experts (UnifiedMLLM; routes.SpanRouteSpec, experts.py): sd_text, ip2p_text, gligen,
gligen_inpaint, sam, boxes.

The routes a decoder serves are the registry's (`RouteSpec.decoder`, unimlm_engine/routes.py).
`DecoderSet(cfg)` builds every registered decoder the config enables, so its state dict keys start
with those prefixes. Exported back ends (ONNX Runtime, AOTInductor, TensorRT) live in backends.py and
are passed per call.

Result types: `DetectionResult` (detector.py), `PoseResult` (pose.py), `GenerationResult` (results.py).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ...config import ModelConfig
from ...routes import RouteError, RouteSpec, SpanRouteSpec, all_routes, get_route
from .backends import RouteBackend
from .base import DecoderInput, TaskDecoder, decoder_classes
from .generation import GenerationDecoder, build_tiny_pipeline, load_local_pipeline
from .results import GenerationResult

__all__ = ["DecoderSet", "DecoderInput", "TaskDecoder", "GenerationDecoder", "GenerationResult", "DetectionResult",
           "PoseResult", "build_tiny_pipeline", "load_local_pipeline"]


def __getattr__(name: str):
    if name in ("DetectionResult", "DetectorDecoder"):
        from . import detector

        return getattr(detector, name)
    if name in ("PoseResult", "PoseDecoder"):
        from . import pose

        return getattr(pose, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PayloadBatch = Sequence[Sequence[torch.Tensor]]


class DecoderSet(nn.Module):
    """All task decoders of one model, as submodules named by their registry name (None when the config
    does not enable one). `run` serves one route for a batch of requests."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise ValueError(f"DecoderSet: cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        for name, cls in decoder_classes().items():
            self.add_module(name, cls.from_model_config(cfg))

    def decoder_for(self, route: str | RouteSpec) -> TaskDecoder:
        """The decoder serving `route` (a RouteSpec, a SpanRouteSpec or a super-link route's name); ValueError
        for an unknown or unconfigured route."""
        spec = route if isinstance(route, (RouteSpec, SpanRouteSpec)) else get_route(route)
        mod = self._modules.get(spec.decoder)
        if mod is None:
            raise ValueError(f"route {spec.token}: no {spec.decoder} decoder configured in this model")
        return mod

    def available_routes(self) -> list[RouteSpec]:
        """Registered routes whose decoder this model has, in registry order."""
        return [s for s in all_routes() if self._modules.get(s.decoder) is not None]

    @torch.no_grad()
    def run(self, route: str | RouteSpec, inputs: Sequence[DecoderInput], options: Optional[Mapping[str, Any]] = None,
            backend: Optional[RouteBackend] = None) -> tuple[list, str]:
        """Run `route`'s decoder once for a batch of requests -> (one result per input, the back end that
        ran: "eager" or backend.kind). options: per-call decoder options on top of the route's own
        (`RouteSpec.options`). backend: an exported artifact for this decoder (backends.py); routes it
        cannot serve (SEG through an export without masks) run eagerly.
        Raises ValueError for an unknown route, an empty batch, a request with zero groups, a payload of
        the wrong shape, a missing or empty image, or a decoder-specific limit."""
        try:
            spec = route if isinstance(route, RouteSpec) else get_route(route)
        except RouteError as e:
            raise ValueError(str(e)) from None
        decoder = self.decoder_for(spec)
        if len(inputs) == 0:
            raise ValueError(f"route {spec.token}: empty batch (no requests)")
        k = self.cfg.superlink.num_queries(spec.token)
        for r, inp in enumerate(inputs):
            self._check_groups(spec.token, r, inp.payloads, k)
            if spec.requires:
                if not inp.context:
                    raise ValueError(f"route {spec.token}: request {r} needs at least one "
                                     f"{' or '.join(spec.requires)} group (context)")
                self._check_groups(spec.token, r, inp.context, self.cfg.superlink.num_queries(spec.requires[0]),
                                   " (context)")
            inp.image = check_image(spec.token, r, inp.image, spec.needs_image)
        opts = {**spec.options, **(options or {})}
        forward = None
        if backend is not None and backend.serves(spec):
            forward = backend.forward
        results = decoder.run(spec, list(inputs), opts, forward)
        return results, backend.kind if forward is not None else "eager"

    def run_decoder(self, route: str, payloads: PayloadBatch, images: Sequence[Any],
                    backend: Optional[RouteBackend] = None, **opts) -> list:
        """The list form of `run`: payloads[r] = request r's groups [K, llm_hidden] for `route`,
        images[r] its image (PIL, uint8 ndarray or uint8 tensor [H, W, 3]) or None.
        opts: decoder options, plus `det_payloads` (POSE: each request's object-class groups, the
        route's context) and `seeds` (GEN/EDIT: one int per request; group j of request r gets
        seeds[r] + j; default r * 1000). Returns one result per request."""
        try:
            spec = get_route(route)
        except RouteError as e:
            raise ValueError(str(e)) from None
        self.decoder_for(spec)
        n = len(payloads)
        if n == 0:
            raise ValueError(f"route {spec.token}: empty batch (no requests)")
        if len(images) != n:
            raise ValueError(f"route {spec.token}: {n} payload lists but {len(images)} images")
        context = opts.pop("det_payloads", None)
        if spec.requires:
            if context is None or len(context) != n:
                raise ValueError(f"route {spec.token}: opts['det_payloads'] must give each request's "
                                 f"{'/'.join(spec.requires)} class payloads")
            k = self.cfg.superlink.num_queries(spec.requires[0])
            for r, groups in enumerate(context):
                self._check_groups(spec.token, r, groups, k, " (det_payloads)")
        seeds = opts.pop("seeds", None) if spec.result == "image" else None
        seeds = [r * 1000 for r in range(n)] if seeds is None else list(seeds)
        if len(seeds) != n:
            raise ValueError(f"route {spec.token}: {len(seeds)} seeds for {n} requests")
        inputs = [DecoderInput(list(p) if isinstance(p, (list, tuple)) else p, im,
                               list(context[r]) if context is not None else [], int(seeds[r]))
                  for r, (p, im) in enumerate(zip(payloads, images))]
        return self.run(spec, inputs, opts, backend)[0]

    def _check_groups(self, route: str, r: int, groups, k_want: int, label: str = "") -> None:
        hidden = self.cfg.llm.hidden_size
        if isinstance(groups, torch.Tensor) or not isinstance(groups, Sequence):
            raise ValueError(f"route {route}{label}: request {r}: payloads must be a list of [K, hidden] tensors")
        if len(groups) == 0:
            raise ValueError(f"route {route}{label}: request {r} has zero payload groups")
        for g in groups:
            if not isinstance(g, torch.Tensor) or g.dim() != 2 or not g.is_floating_point():
                raise ValueError(f"route {route}{label}: request {r}: each group must be a float [K, hidden] tensor")
            if tuple(g.shape) != (k_want, hidden):
                raise ValueError(f"route {route}{label}: request {r}: payload shape {tuple(g.shape)}, "
                                 f"expected [K={k_want}, hidden={hidden}]")


def check_image(route: str, r: int, img: Any, required: bool) -> Optional[Image.Image]:
    """-> the image as RGB PIL (None when absent and not required); ValueError when invalid."""
    if img is None:
        if required:
            raise ValueError(f"route {route}: request {r} needs an input image")
        return None
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu().numpy()
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"route {route}: request {r}: array image must be uint8 [H, W, 3], got "
                             f"{img.dtype} {img.shape}")
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise ValueError(f"route {route}: request {r}: image has zero size {img.shape[:2]}")
        img = Image.fromarray(img)
    if not isinstance(img, Image.Image):
        raise ValueError(f"route {route}: request {r}: image must be a PIL.Image or uint8 [H, W, 3] array, "
                         f"got {type(img).__name__}")
    if img.width == 0 or img.height == 0:
        raise ValueError(f"route {route}: request {r}: image has zero size {img.size}")
    return img if img.mode == "RGB" else img.convert("RGB")
