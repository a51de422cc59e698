"""Tensor-level export wrapper of the detector decoder, its example inputs and dynamic dims.

The detector is the only decoder with an export path: [POSE] is the official UniPose, which has none
(`unimlm export pose` is refused in cli.py). An export is made for one fixed *canvas* [B, 3, H, W] (H, W
multiples of the decoder's `pad_multiple`); the batch B and the class count C are dynamic (`dynamic_shapes`,
`torch.export.Dim`) unless a range pins them. The official detector is not padding-invariant (its Swin and
GroupNorms see the zero padding), so an export serves exactly its canvas (the detector groups requests by
canvas). Class padding is masked. The image size cannot be dynamic (README.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(slots=True)
class ExportShape:
    """batch, canvas height/width, classes (C), queries per group (K)."""

    batch: int
    height: int
    width: int
    classes: int
    queries: int = 4

    def __post_init__(self) -> None:
        for name in ("batch", "height", "width", "classes", "queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"ExportShape.{name} must be >= 1, got {getattr(self, name)}")


DETECTOR_INPUTS = ("pixel_values", "pixel_valid", "class_payloads", "class_valid")
DETECTOR_OUTPUTS = ("logits", "boxes")
DETECTOR_MASK_OUTPUTS = ("logits", "boxes", "mask_logits")


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


def check_kind(kind: str) -> None:
    """Only "detector" has an export wrapper (UniPose, the [POSE] decoder, has none)."""
    if kind != "detector":
        raise ValueError(f"unknown decoder kind {kind!r}; only 'detector' has an export wrapper (UniPose, the "
                         f"[POSE] decoder, has none)")


def wrap(kind: str, decoder: nn.Module, with_masks: bool = False) -> nn.Module:
    """kind: "detector" -> the tensor-level module to export."""
    check_kind(kind)
    return DetectorTensors(decoder, with_masks).eval()


def example_inputs(kind: str, cfg, shape: ExportShape, valid_hw: tuple[int, int] | None = None,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs at `shape`; the valid region of every image is `valid_hw` (default: the whole canvas),
    the last batch entry gets one invalid class when C > 1."""
    check_kind(kind)
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
    return pixels, valid, payloads, cvalid


def input_shapes(kind: str, cfg, shape: ExportShape, batch: int, classes: int) -> list[list[int]]:
    """Per input (DETECTOR_INPUTS order) its shape at `batch` and `classes` on shape's canvas."""
    check_kind(kind)
    h, w, k, hidden = shape.height, shape.width, shape.queries, cfg.llm_hidden_size
    return [[batch, 3, h, w], [batch, h, w], [batch, classes, k, hidden], [batch, classes]]


def dynamic_shapes(kind: str, batch_dynamic: bool, classes_dynamic: bool) -> tuple | None:
    """`torch.export` dynamic_shapes for the tensor forward: dim 0 of every input is "batch", dim 1 of
    class_payloads / class_valid is "classes" (each only when dynamic); None when both are static."""
    check_kind(kind)
    if not (batch_dynamic or classes_dynamic):
        return None
    from torch.export import Dim

    b = {0: Dim("batch", min=1)} if batch_dynamic else {}
    c = {1: Dim("classes", min=1)} if classes_dynamic else {}
    return dict(b), dict(b), {**b, **c}, {**b, **c}
