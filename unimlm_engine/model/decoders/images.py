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


# ---- the official gdino input (VisionLLM v2 eval: mmdet test pipeline, then nested_tensor_from_tensor_list) ----
MMDET_MEAN = (123.675, 116.28, 103.53)  # img_norm_cfg, RGB, 0..255 scale
MMDET_STD = (58.395, 57.12, 57.375)


def mmcv_rescale_size(h: int, w: int, short: int, long: int) -> tuple[int, int]:
    """mmcv.rescale_size with img_scale (long, short): scale = min(long / max side, short / min side), sides
    int(side * scale + 0.5) -> (h', w')."""
    scale = min(long / max(h, w), short / min(h, w))
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def gdino_image(image, short: int, long: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """One image -> (normalised [3, h', w'] float32, (h', w'), (h, w)). Resize: bilinear without antialiasing
    (mmcv's cv2 INTER_LINEAR), rounded back to uint8 as cv2 does; cv2's 11-bit fixed-point weights can differ
    from this float bilinear by one grey level on some pixels. Normalise: (x - mean) * (1 / std), RGB."""
    t = to_uint8_hwc(image)
    h, w = int(t.shape[0]), int(t.shape[1])
    hr, wr = mmcv_rescale_size(h, w, short, long)
    x = t.permute(2, 0, 1)[None].double()  # float64: the round-half-up below does not depend on fp32 error
    if (hr, wr) != (h, w):
        x = F.interpolate(x, size=(hr, wr), mode="bilinear", align_corners=False, antialias=False)
        x = torch.floor(x + 0.5).clamp(0, 255)
    x = x.float()
    mean = torch.tensor(MMDET_MEAN, dtype=torch.float32).view(3, 1, 1)
    inv_std = (1.0 / torch.tensor(MMDET_STD, dtype=torch.float64)).float().view(3, 1, 1)
    return (x[0] - mean) * inv_std, (hr, wr), (h, w)


def gdino_canvas(images: list[torch.Tensor], multiple: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised [3, h_i, w_i] images -> (pixel_values [B, 3, H, W] zero-padded bottom / right to the
    multiple of `multiple` covering all, valid = pixel_values[:, 0] != 0 as the official model takes it)."""
    hp = -(-max(x.shape[1] for x in images) // multiple) * multiple
    wp = -(-max(x.shape[2] for x in images) // multiple) * multiple
    pixels = images[0].new_zeros(len(images), 3, hp, wp)
    for i, x in enumerate(images):
        pixels[i, :, :x.shape[1], :x.shape[2]] = x
    return pixels, pixels[:, 0] != 0


def canvas_of(size: tuple[int, int], multiple: int = 32) -> tuple[int, int]:
    return -(-size[0] // multiple) * multiple, -(-size[1] // multiple) * multiple
