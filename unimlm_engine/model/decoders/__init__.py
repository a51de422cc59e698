"""Task decoders and the registry that wires them to the model (DESIGN.md section 1, "Decoders").

`DecoderSet` owns every configured decoder under the official checkpoint prefixes:

  gdino    DetectorDecoder     [DET] [GRD] [SEG]   (decoders/detector.py)
  unipose  PoseDecoder         [POSE]              (decoders/pose.py)
  sd       GenerationDecoder   [GEN]               (decoders/generation.py)
  ip2p     GenerationDecoder   [EDIT]              (decoders/generation.py)

so `DecoderSet(cfg).state_dict()` keys start with those prefixes. The detector and pose
modules are imported only when their config is present.

Result types: `GenerationResult` (results.py), `DetectionResult` (detector.py) and
`PoseResult` (pose.py) are all importable from here.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ...config import ROUTE_TOKENS, ModelConfig
from .generation import GenerationDecoder, build_tiny_pipeline, load_local_pipeline
from .results import GenerationResult

DET_ROUTES = ("[DET]", "[GRD]", "[SEG]")
GEN_ROUTES = ("[GEN]", "[EDIT]")
_PREFIX = {"[DET]": "gdino", "[GRD]": "gdino", "[SEG]": "gdino", "[POSE]": "unipose", "[GEN]": "sd", "[EDIT]": "ip2p"}
_GEN_OPTS = ("num_inference_steps", "guidance_scale", "image_guidance_scale", "height", "width")

__all__ = ["DecoderSet", "GenerationDecoder", "GenerationResult", "DetectionResult", "PoseResult",
           "build_tiny_pipeline", "load_local_pipeline", "DET_ROUTES", "GEN_ROUTES"]


def __getattr__(name: str):
    """Detector / pose names load on first use: they pull in the Swin + deformable stack."""
    if name in ("DetectionResult", "DetectorDecoder"):
        from . import detector

        return getattr(detector, name)
    if name in ("PoseResult", "PoseDecoder"):
        from . import pose

        return getattr(pose, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PayloadBatch = Sequence[Sequence[torch.Tensor]]


class DecoderSet(nn.Module):
    """All task decoders of one model; `run_decoder` serves one route for a batch of requests."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise ValueError(f"DecoderSet: cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.gdino: Optional[nn.Module] = None
        self.unipose: Optional[nn.Module] = None
        self.sd: Optional[GenerationDecoder] = GenerationDecoder(cfg.gen) if cfg.gen is not None else None
        self.ip2p: Optional[GenerationDecoder] = (GenerationDecoder(cfg.edit, edit=True) if cfg.edit is not None
                                                  else None)
        if cfg.detector is not None:
            from .detector import DetectorDecoder

            self.gdino = DetectorDecoder(cfg.detector)
        if cfg.pose is not None:
            from .pose import PoseDecoder

            self.unipose = PoseDecoder(cfg.pose)

    def decoder_for(self, route: str) -> nn.Module:
        """The module serving `route`; ValueError for an unknown or unconfigured route."""
        if route not in _PREFIX:
            raise ValueError(f"unknown route {route!r}; known routes: {', '.join(ROUTE_TOKENS)}")
        mod = getattr(self, _PREFIX[route])
        if mod is None:
            raise ValueError(f"route {route}: no {_PREFIX[route]} decoder configured in this model")
        return mod

    @torch.no_grad()
    def run_decoder(self, route: str, payloads: PayloadBatch, images: Sequence[Any], **opts) -> list:
        """Run the decoder of `route` once for a batch of requests.

        route: one of "[DET]" "[GRD]" "[SEG]" "[POSE]" "[GEN]" "[EDIT]".
        payloads: one entry per request, each a non-empty list of payload groups for this
            route in the order the request emitted them; a group is the final hidden states
            of the K super-link queries after one routing token: a tensor [K, llm_hidden]
            (K = superlink.num_embs for DET/GRD/SEG/POSE, num_embs_gen for GEN/EDIT).
            DET/GRD/SEG: group c is class c of the request (at most max_classes = 256).
            POSE: groups are the [POSE] keypoint payloads; the request's class payloads
            ([DET] groups, same format) come in opts["det_payloads"]; a request routes
            exactly num_keypoints [POSE] groups (keypoint n = group n).
            GEN/EDIT: each group is one image to generate.
        images: one entry per request: its input image (PIL.Image, uint8 ndarray or
            uint8 tensor [H, W, 3]) or None. Required by all routes but GEN (ignored there).
        opts: GEN/EDIT: num_inference_steps, guidance_scale, image_guidance_scale, height,
            width, seeds (one int per request; group j gets seeds[r] + j; default r * 1000).
            POSE: det_payloads (required). DET/GRD/SEG: none (thresholds live in the config).
        Returns one result per request, in order: the detector's DetectionResult
        (with masks for [SEG]), a PoseResult, or a GenerationResult (one image per group).
        Raises ValueError for an unknown route, an empty batch, a request with zero groups,
        a payload of the wrong shape, more than max_classes groups, a missing or empty image.
        """
        decoder = self.decoder_for(route)
        n = len(payloads)
        if n == 0:
            raise ValueError(f"route {route}: empty batch (no requests)")
        if len(images) != n:
            raise ValueError(f"route {route}: {n} payload lists but {len(images)} images")
        self._check_groups(route, payloads)
        need_image = route != "[GEN]"
        pil = [_check_image(route, r, im, need_image) for r, im in enumerate(images)]
        if route in GEN_ROUTES:
            return self._run_generation(decoder, route, payloads, pil, opts)
        if route == "[POSE]":
            return self._run_pose(payloads, pil, opts)
        return self._run_detector(route, payloads, pil, opts)

    # ---- validation ----------------------------------------------------------
    def _check_groups(self, route: str, payloads: PayloadBatch, label: str = "") -> None:
        k_want, hidden = self.cfg.superlink.num_queries(route), self.cfg.llm.hidden_size
        dcfg = self.cfg.detector if route in DET_ROUTES else self.cfg.pose if route == "[POSE]" else None
        max_groups = dcfg.max_classes if dcfg is not None else None
        for r, groups in enumerate(payloads):
            if isinstance(groups, torch.Tensor) or not isinstance(groups, Sequence):
                raise ValueError(f"route {route}{label}: request {r}: payloads must be a list of [K, hidden] tensors")
            if len(groups) == 0:
                raise ValueError(f"route {route}{label}: request {r} has zero payload groups")
            if max_groups is not None and len(groups) > max_groups:
                raise ValueError(f"route {route}{label}: request {r} has {len(groups)} classes, at most {max_groups}")
            for g in groups:
                if not isinstance(g, torch.Tensor) or g.dim() != 2 or not g.is_floating_point():
                    raise ValueError(f"route {route}{label}: request {r}: each group must be a float [K, hidden] "
                                     "tensor")
                if tuple(g.shape) != (k_want, hidden):
                    raise ValueError(f"route {route}{label}: request {r}: payload shape {tuple(g.shape)}, "
                                     f"expected [K={k_want}, hidden={hidden}]")

    # ---- dispatch ------------------------------------------------------------
    def _run_generation(self, decoder: GenerationDecoder, route: str, payloads: PayloadBatch,
                        images: list[Optional[Image.Image]], opts: dict) -> list[GenerationResult]:
        unknown = set(opts) - set(_GEN_OPTS) - {"seeds"}
        if unknown:
            raise ValueError(f"route {route}: unknown options {sorted(unknown)}")
        seeds = opts.get("seeds")
        seeds = [r * 1000 for r in range(len(payloads))] if seeds is None else list(seeds)
        if len(seeds) != len(payloads):
            raise ValueError(f"route {route}: {len(seeds)} seeds for {len(payloads)} requests")
        flat = [(r, j) for r, groups in enumerate(payloads) for j in range(len(groups))]
        stacked = torch.stack([payloads[r][j] for r, j in flat])
        flat_seeds = [int(seeds[r]) + j for r, j in flat]
        flat_images = [images[r] for r, _ in flat] if route == "[EDIT]" else None
        kw = {k: opts[k] for k in _GEN_OPTS if k in opts}
        if route == "[GEN]":
            kw.pop("image_guidance_scale", None)
        out = decoder.generate(stacked, flat_seeds, images=flat_images, **kw)
        results = [GenerationResult(route=route, num_inference_steps=kw.get("num_inference_steps", 20),
                                    guidance_scale=kw.get("guidance_scale", 7.5)) for _ in payloads]
        for (r, _), im, s in zip(flat, out, flat_seeds):
            results[r].images.append(im)
            results[r].seeds.append(s)
        return results

    def _run_detector(self, route: str, payloads: PayloadBatch, images: Sequence[Any], opts: dict) -> list:
        if opts:
            raise ValueError(f"route {route}: unknown options {sorted(opts)}")
        class_payloads = [torch.stack(list(groups)) for groups in payloads]
        return self.gdino(list(images), class_payloads, with_masks=(route == "[SEG]"))

    def _run_pose(self, payloads: PayloadBatch, images: Sequence[Any], opts: dict) -> list:
        opts = dict(opts)
        det = opts.pop("det_payloads", None)
        if opts:
            raise ValueError(f"route [POSE]: unknown options {sorted(opts)}")
        if det is None or len(det) != len(payloads):
            raise ValueError("route [POSE]: opts['det_payloads'] must give each request's [DET] class payloads")
        self._check_groups("[POSE]", det, label=" (det_payloads)")
        nk = self.cfg.pose.num_keypoints
        for r, groups in enumerate(payloads):
            if len(groups) != nk:
                raise ValueError(f"route [POSE]: request {r} has {len(groups)} keypoint groups, expected {nk}")
        class_payloads = [torch.stack(list(groups)) for groups in det]
        pose_payloads = [torch.stack(list(groups)) for groups in payloads]
        return self.unipose(list(images), class_payloads, pose_payloads)


def _check_image(route: str, r: int, img: Any, required: bool) -> Optional[Image.Image]:
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
