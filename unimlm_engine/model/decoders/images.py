"""Decoder-side image preparation shared by the detector and the pose decoder.

Each image is resized so its short side is `short` and its long side at most `long` (aspect kept),
normalised with the ImageNet mean / std, and padded (zeros, bottom / right) to a common canvas whose sides
are multiples of `multiple`; `pixel_valid` marks the real pixels (DETR's pixel mask).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageBatch:
    pixel_values: torch.Tensor  # [B, 3, H, W] normalised, zero-padded
    pixel_valid: torch.Tensor  # [B, H, W] bool
    resized: list[tuple[int, int]]  # (h, w) of each resized image inside the canvas
    original: list[tuple[int, int]]  # (h, w) of each input image


def to_uint8_hwc(image) -> torch.Tensor:
    """PIL image or uint8 tensor [H, W, 3] -> uint8 tensor [H, W, 3]; ValueError on anything else."""
    if not isinstance(image, torch.Tensor):
        if not hasattr(image, "convert"):
            raise ValueError(f"image must be a PIL image or a uint8 [H, W, 3] tensor, got {type(image).__name__}")
        image = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8, copy=True))
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"image tensor must be uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image has zero size: {tuple(image.shape)}")
    return image


def resized_size(h: int, w: int, short: int, long: int) -> tuple[int, int]:
    """Short side -> `short`, long side capped at `long`, aspect kept (sides at least 1)."""
    scale = short / min(h, w)
    if max(h, w) * scale > long:
        scale = long / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def prepare_images(images: list, short: int, long: int, multiple: int, device: torch.device,
                   dtype: torch.dtype) -> ImageBatch:
    """images: list of PIL / uint8 [H, W, 3] -> ImageBatch on `device` in `dtype`."""
    tensors = [to_uint8_hwc(im) for im in images]
    original = [(int(t.shape[0]), int(t.shape[1])) for t in tensors]
    resized = [resized_size(h, w, short, long) for h, w in original]
    hp = -(-max(h for h, _ in resized) // multiple) * multiple
    wp = -(-max(w for _, w in resized) // multiple) * multiple
    pixels = torch.zeros(len(images), 3, hp, wp, device=device, dtype=dtype)
    valid = torch.zeros(len(images), hp, wp, device=device, dtype=torch.bool)
    mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device, dtype=torch.float32).view(3, 1, 1)
    for i, (t, (h, w)) in enumerate(zip(tensors, resized)):
        x = t.to(device).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
        pixels[i, :, :h, :w] = ((x.clamp(0, 255) / 255.0 - mean) / std).to(dtype)
        valid[i, :h, :w] = True
    return ImageBatch(pixels, valid, resized, original)


def boxes_to_pixels(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """boxes: [n, 4] (cx, cy, w, h) normalised to the image -> [n, 4] xyxy in pixels of `size` (h, w), clamped."""
    h, w = size
    cx, cy, bw, bh = boxes.float().unbind(-1)
    xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
    scale = torch.tensor([w, h, w, h], dtype=xyxy.dtype, device=xyxy.device)
    return (xyxy * scale).clamp(min=torch.zeros(4, device=xyxy.device), max=scale)
