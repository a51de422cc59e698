"""Tensor-level export wrappers of the detector and pose decoders, their example inputs and dynamic dims.

An export is made for one fixed *canvas* [B, 3, H, W] (H, W multiples of the decoder's `pad_multiple`); the
batch B and the class count C are dynamic (`dynamic_shapes`, `torch.export.Dim`) unless a range pins them.
The official detector is not padding-invariant (its Swin and GroupNorms see the zero padding), so a detector
export serves exactly its canvas (the detector groups requests by canvas); the legacy pose decoder is
(every padded pixel and class is masked), so one canvas serves every image that fits in it: callers pad pixels
up to the canvas and mark the padding invalid (`unimlm_engine/model/decoders/backends.py` does this). Class
padding is masked in both. The image size cannot be dynamic (README.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(slots=True)
class ExportShape:
    """batch, canvas height/width, classes (C), keypoints (pose only), queries per group (K)."""

    batch: int
    height: int
    width: int
    classes: int
    keypoints: int = 0
    queries: int = 4

    def __post_init__(self) -> None:
        for name in ("batch", "height", "width", "classes", "queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"ExportShape.{name} must be >= 1, got {getattr(self, name)}")
        if self.keypoints < 0:
            raise ValueError(f"ExportShape.keypoints must be >= 0, got {self.keypoints}")


DETECTOR_INPUTS = ("pixel_values", "pixel_valid", "class_payloads", "class_valid")
DETECTOR_OUTPUTS = ("logits", "boxes")
DETECTOR_MASK_OUTPUTS = ("logits", "boxes", "mask_logits")
POSE_INPUTS = DETECTOR_INPUTS + ("keypoint_payloads",)
POSE_OUTPUTS = ("scores", "labels", "boxes", "keypoints")


class DetectorTensors(nn.Module):
    """(pixel_values [B, 3, H, W], pixel_valid [B, H, W] bool, class_payloads [B, C, K, hidden],
    class_valid [B, C] bool) -> (logits [B, Q, C], boxes [B, Q, 4] (, mask_logits [B, Q, H/4, W/4]))."""

    def __init__(self, decoder: nn.Module, with_masks: bool = False):
        super().__init__()
        self.decoder, self.with_masks = decoder, with_masks

    def forward(self, pixel_values, pixel_valid, class_payloads, class_valid):
        logits, boxes, masks = self.decoder.forward_tensors(pixel_values, pixel_valid, class_payloads, class_valid,
                                                            self.with_masks)
        return (logits, boxes, masks) if self.with_masks else (logits, boxes)


class PoseTensors(nn.Module):
    """POSE_INPUTS (keypoint_payloads [B, NK, K, hidden]) -> (scores [B, P], labels [B, P], boxes [B, P, 4],
    keypoints [B, P, NK, 3])."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, pixel_values, pixel_valid, class_payloads, class_valid, keypoint_payloads):
        return self.decoder.forward_tensors(pixel_values, pixel_valid, class_payloads, class_valid, keypoint_payloads)


def wrap(kind: str, decoder: nn.Module, with_masks: bool = False) -> nn.Module:
    """kind: "detector" or "pose" -> the tensor-level module to export."""
    if kind == "detector":
        return DetectorTensors(decoder, with_masks).eval()
    if kind == "pose":
        return PoseTensors(decoder).eval()
    raise ValueError(f"unknown decoder kind {kind!r}; expected 'detector' or 'pose'")


def example_inputs(kind: str, cfg, shape: ExportShape, valid_hw: tuple[int, int] | None = None,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs at `shape`; the valid region of every image is `valid_hw` (default: the whole canvas),
    the last batch entry gets one invalid class when C > 1."""
    g = torch.Generator().manual_seed(seed)
    b, h, w, c, k = shape.batch, shape.height, shape.width, shape.classes, shape.queries
    vh, vw = valid_hw or (h, w)
    if vh > h or vw > w:
        raise ValueError(f"valid region {(vh, vw)} does not fit the canvas {(h, w)}")
    pixels = torch.randn(b, 3, h, w, generator=g)
    valid = torch.zeros(b, h, w, dtype=torch.bool)
    valid[:, :vh, :vw] = True
    pixels = pixels * valid[:, None]
    payloads = torch.randn(b, c, k, cfg.llm_hidden_size, generator=g)
    cvalid = torch.ones(b, c, dtype=torch.bool)
    if c > 1:
        cvalid[-1, -1] = False
    if kind == "detector":
        return pixels, valid, payloads, cvalid
    kps = torch.randn(b, shape.keypoints or cfg.num_keypoints, k, cfg.llm_hidden_size, generator=g)
    return pixels, valid, payloads, cvalid, kps


def input_shapes(kind: str, cfg, shape: ExportShape, batch: int, classes: int) -> list[list[int]]:
    """Per input (DETECTOR_INPUTS / POSE_INPUTS order) its shape at `batch` and `classes` on shape's canvas."""
    h, w, k, hidden = shape.height, shape.width, shape.queries, cfg.llm_hidden_size
    out = [[batch, 3, h, w], [batch, h, w], [batch, classes, k, hidden], [batch, classes]]
    if kind == "pose":
        out.append([batch, shape.keypoints or cfg.num_keypoints, k, hidden])
    return out


def dynamic_shapes(kind: str, batch_dynamic: bool, classes_dynamic: bool) -> tuple | None:
    """`torch.export` dynamic_shapes for the tensor forward: dim 0 of every input is "batch", dim 1 of
    class_payloads / class_valid is "classes" (each only when dynamic); None when both are static."""
    if not (batch_dynamic or classes_dynamic):
        return None
    from torch.export import Dim

    b = {0: Dim("batch", min=1)} if batch_dynamic else {}
    c = {1: Dim("classes", min=1)} if classes_dynamic else {}
    spec = (dict(b), dict(b), {**b, **c}, {**b, **c})
    return spec + (dict(b),) if kind == "pose" else spec
