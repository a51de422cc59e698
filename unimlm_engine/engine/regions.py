"""Visual prompts: `Request(regions=[...])` -> masks on the model's canvas (model/region_encoder.py).

A prompt refers to region i by its i-th `<region>` token, written as the official datasets do:
`<reg>region1<region></reg>`. Coordinates are pixels of the input image (x right, y down, origin at
the top-left corner, 0 <= x <= width, 0 <= y <= height). Each region becomes a 0/1 mask on the canvas
(image_size^2, the image stretched as the anyres thumbnail is), the way the official data builds them
at training time (visual_sampler/, datasets/utils.py) and at evaluation (coco_interactive.py):

- point: one or more points; each marks the canvas pixel that holds it (the official `Point` sampler's
  single pixels).
- box: x1, y1, x2, y2 scaled to the canvas, then the official `boxes_to_masks` (clamped to the canvas,
  truncated to ints, inclusive ranges).
- scribble: a polyline of two or more points, `width` image pixels wide (default: 5 canvas pixels, the
  middle of the official brush widths 2.5-10); canvas pixels whose centre lies within width / 2 of it,
  and the pixels holding its vertices.
- mask: an [H, W] array (bool, 0/1, 0/255) of the image's size, or a path to such a PNG: bilinear
  resize to the canvas (align_corners=False), nonzero -> 1 (the official evaluation's `.bool()`).

Over MAX_POINTS (2304) pixels a mask is sub-sampled from a generator seeded by `Region.seed`, or by a
hash of the mask when it is None: the same image and region give the same feature alone or batched.
Every problem raises InvalidRegionError (an InvalidRequestError) naming the region.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..model.region_encoder import RegionInput, sample_points
from .types import InvalidRequestError

KINDS = ("point", "box", "scribble", "mask")
DEFAULT_SCRIBBLE_CANVAS_WIDTH = 5.0


class InvalidRegionError(InvalidRequestError):
    """A region outside its image, an empty mask, a malformed point list, a region count that does not
    match the prompt's `<region>` tokens, or a region without an image."""


@dataclass
class Region:
    """One visual prompt, in image pixels. Build with Region.point / .box / .scribble / .mask, or pass a
    dict: {"point": [x, y]} or {"points": [[x, y], ...]}, {"box": [x1, y1, x2, y2]},
    {"scribble": [[x, y], ...], "width": w}, {"mask": array or path}; optional "image" (index of the
    request's image, default 0) and "seed" keys."""

    kind: str
    points: Optional[Sequence[Sequence[float]]] = None  # point(s) or the scribble polyline
    box: Optional[Sequence[float]] = None
    mask: Any = None
    width: Optional[float] = None  # scribble width in image pixels
    image: int = 0
    seed: Optional[int] = None

    @classmethod
    def point(cls, x: float, y: float, **kw) -> "Region":
        return cls("point", points=[(x, y)], **kw)

    @classmethod
    def box_xyxy(cls, x1: float, y1: float, x2: float, y2: float, **kw) -> "Region":
        return cls("box", box=(x1, y1, x2, y2), **kw)

    @classmethod
    def scribble(cls, points: Sequence[Sequence[float]], width: Optional[float] = None, **kw) -> "Region":
        return cls("scribble", points=points, width=width, **kw)

    @classmethod
    def from_mask(cls, mask: Any, **kw) -> "Region":
        return cls("mask", mask=mask, **kw)


def parse_region(spec: str) -> Region:
    """The CLI form -> Region: "point:x,y[;x,y...]", "box:x1,y1,x2,y2", "scribble:x,y;x,y[;...][@width]",
    "mask:PATH.png" (nonzero pixels; the image's size). InvalidRegionError when malformed."""
    kind, sep, body = str(spec).partition(":")
    kind = kind.strip().lower()
    if not sep or not body or kind not in KINDS:
        raise InvalidRegionError(f"region {spec!r}: expected KIND:VALUES with KIND one of {', '.join(KINDS)}")
    if kind == "mask":
        if not os.path.isfile(body):
            raise InvalidRegionError(f"region {spec!r}: mask file {body!r} not found")
        return Region("mask", mask=body)
    width = None
    if kind == "scribble" and "@" in body:
        body, _, w = body.partition("@")
        width = _numbers([w], 1, f"region {spec!r} (width)")[0]
    groups = [g.split(",") for g in body.split(";")]
    if kind == "box":
        if len(groups) != 1:
            raise InvalidRegionError(f"region {spec!r}: a box is x1,y1,x2,y2")
        return Region("box", box=_numbers(groups[0], 4, f"region {spec!r}"))
    return Region(kind, points=[_numbers(g, 2, f"region {spec!r}") for g in groups], width=width)


def as_region(obj: Any, i: int) -> Region:
    """A Region or a dict (see Region) -> Region."""
    if isinstance(obj, Region):
        return obj
    if not isinstance(obj, dict):
        raise InvalidRegionError(f"region {i}: expected a Region or a dict, got {type(obj).__name__}")
    d = dict(obj)
    kw = {k: d.pop(k) for k in ("image", "seed", "width") if k in d}
    kinds = [k for k in ("point", "points", "box", "scribble", "mask") if k in d]
    if len(kinds) != 1 or d.keys() - set(kinds):
        raise InvalidRegionError(f"region {i}: a dict needs exactly one of point, points, box, scribble, mask "
                                 f"(and optionally image, seed, width); got keys {sorted(obj)}")
    k, v = kinds[0], d[kinds[0]]
    if k == "point":
        return Region("point", points=[v], **kw)
    if k in ("points", "scribble"):
        return Region("point" if k == "points" else "scribble", points=v, **kw)
    return Region(k, box=v, **kw) if k == "box" else Region("mask", mask=v, **kw)


def _numbers(v: Any, n: Optional[int], what: str) -> list[float]:
    try:
        out = [float(x) for x in v]
    except (TypeError, ValueError):
        raise InvalidRegionError(f"{what}: expected numbers, got {v!r}") from None
    if (n is not None and len(out) != n) or not all(math.isfinite(x) for x in out):
        raise InvalidRegionError(f"{what}: expected {n or 'some'} finite numbers, got {v!r}")
    return out


def _point_list(points: Any, min_len: int, what: str) -> np.ndarray:
    """-> [n, 2] float64; a malformed list raises."""
    if points is None or isinstance(points, (str, bytes)) or not hasattr(points, "__len__") or len(points) < min_len:
        raise InvalidRegionError(f"{what}: expected a list of at least {min_len} [x, y] points, got {points!r}")
    return np.array([_numbers(p, 2, f"{what}, point {j}") for j, p in enumerate(points)], dtype=np.float64)


def _check_inside(xy: np.ndarray, w: int, h: int, what: str) -> None:
    bad = (xy[:, 0] < 0) | (xy[:, 0] > w) | (xy[:, 1] < 0) | (xy[:, 1] > h)
    if bad.any():
        raise InvalidRegionError(f"{what}: point {xy[bad][0].tolist()} is outside the {w}x{h} image")


def _canvas_pixel(xy: np.ndarray, scale: np.ndarray, size: int) -> np.ndarray:
    return np.minimum(np.floor(xy * scale), size - 1).astype(np.int64)


def _scribble(xy: np.ndarray, width: float, scale: np.ndarray, size: int) -> np.ndarray:
    """Canvas pixels whose centre (in image coordinates) lies within width/2 of the polyline, + the vertices."""
    c = (np.arange(size) + 0.5)
    px, py = np.meshgrid(c / scale[0], c / scale[1])  # [S, S] pixel centres in image coordinates
    p = np.stack([px, py], -1)
    near = np.zeros((size, size), dtype=bool)
    for a, b in zip(xy[:-1], xy[1:]):
        d = b - a
        t = np.clip(((p - a) @ d) / max(float(d @ d), 1e-12), 0.0, 1.0)
        near |= np.linalg.norm(p - (a + t[..., None] * d), axis=-1) <= width / 2
    vx = _canvas_pixel(xy, scale, size)
    near[vx[:, 1], vx[:, 0]] = True
    return near


def _mask_array(m: Any, w: int, h: int, what: str) -> np.ndarray:
    if isinstance(m, (str, os.PathLike)):
        from PIL import Image

        try:
            with Image.open(m) as im:
                m = np.asarray(im.convert("L"))
        except (OSError, ValueError) as e:
            raise InvalidRegionError(f"{what}: cannot read mask image {os.fspath(m)!r} ({e})") from None
    if isinstance(m, torch.Tensor):
        m = m.detach().cpu().numpy()
    try:
        arr = np.asarray(m)
    except Exception:  # noqa: BLE001 - anything not array-like is a malformed mask
        raise InvalidRegionError(f"{what}: not an array: {type(m).__name__}") from None
    if arr.ndim != 2 or arr.dtype == object:
        raise InvalidRegionError(f"{what}: expected an [H, W] array, got shape {arr.shape}")
    if arr.shape != (h, w):
        raise InvalidRegionError(f"{what}: mask is {arr.shape[1]}x{arr.shape[0]} but the image is {w}x{h}")
    return arr != 0


def rasterize(region: Region, width: int, height: int, size: int, what: str = "region") -> torch.Tensor:
    """One region on an image of width x height -> its [size, size] bool canvas mask."""
    scale = np.array([size / width, size / height])
    canvas = np.zeros((size, size), dtype=bool)
    if region.kind == "point":
        xy = _point_list(region.points, 1, what)
        _check_inside(xy, width, height, what)
        px = _canvas_pixel(xy, scale, size)
        canvas[px[:, 1], px[:, 0]] = True
    elif region.kind == "box":
        x1, y1, x2, y2 = _numbers(region.box if region.box is not None else (), 4, f"{what} (box)")
        if not (x1 < x2 and y1 < y2):
            raise InvalidRegionError(f"{what}: box {[x1, y1, x2, y2]} needs x1 < x2 and y1 < y2")
        _check_inside(np.array([[x1, y1], [x2, y2]]), width, height, what)
        b = [min(max(v * s, 0.0), size - 1) for v, s in zip((x1, y1, x2, y2), np.tile(scale, 2))]
        canvas[int(b[1]):int(b[3]) + 1, int(b[0]):int(b[2]) + 1] = True  # official boxes_to_masks
    elif region.kind == "scribble":
        xy = _point_list(region.points, 2, what)
        _check_inside(xy, width, height, what)
        w = region.width if region.width is not None else DEFAULT_SCRIBBLE_CANVAS_WIDTH / float(scale.mean())
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise InvalidRegionError(f"{what}: scribble width must be a positive number, got {region.width!r}")
        canvas = _scribble(xy, float(w), scale, size)
    elif region.kind == "mask":
        full = _mask_array(region.mask, width, height, what)
        if not full.any():
            raise InvalidRegionError(f"{what}: the mask is empty")
        t = torch.from_numpy(full.astype(np.float32))[None, None]
        out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0] != 0
        if not out.any():
            raise InvalidRegionError(f"{what}: the mask vanishes when resized to the {size}x{size} canvas")
        return out
    else:
        raise InvalidRegionError(f"{what}: kind must be one of {', '.join(KINDS)}, got {region.kind!r}")
    return torch.from_numpy(canvas)


def prepare_regions(regions: Sequence[Any], images: Sequence[Any], image_keys: Sequence[str], size: int,
                    num_region_tokens: int) -> list[RegionInput]:
    """Validate and rasterize a request's regions (PIL images; image_keys: their content hashes)."""
    regions = list(regions or [])
    if len(regions) != num_region_tokens:
        raise InvalidRegionError(f"the prompt has {num_region_tokens} <region> tokens but {len(regions)} regions "
                                 f"were given (write each as <reg>regionN<region></reg>)")
    out = []
    for i, obj in enumerate(regions):
        r = as_region(obj, i)
        what = f"region {i} ({r.kind})"
        if not images:
            raise InvalidRegionError(f"{what}: a region needs an image in the request")
        if not (isinstance(r.image, int) and 0 <= r.image < len(images)):
            raise InvalidRegionError(f"{what}: image index {r.image!r} is not one of the request's "
                                     f"{len(images)} images")
        im = images[r.image]
        mask = rasterize(r, im.width, im.height, size, what)
        h = hashlib.sha256(f"{image_keys[r.image]}:{size}:".encode())
        h.update(np.packbits(mask.numpy()).tobytes())
        seed = r.seed if r.seed is not None else int.from_bytes(h.digest()[:8], "little")
        if not isinstance(seed, int):
            raise InvalidRegionError(f"{what}: seed must be an int, got {seed!r}")
        h.update(f":{seed}".encode())
        out.append(RegionInput(image=r.image, mask=mask, points=sample_points(mask, seed),
                               key=int.from_bytes(h.digest()[8:16], "little") >> 2))
    return out
