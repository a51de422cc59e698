"""The Grounding-DINO detector's image input, as the official evaluation prepares it: the mmdet test
pipeline (resize so the short side is `short` and the long side at most `long`, bilinear without
antialiasing, mean / std in 0..255), then zero padding (bottom / right) to a canvas whose sides are
multiples of 32, with the valid mask `pixel_values[:, 0] != 0` computed by the model."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


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
