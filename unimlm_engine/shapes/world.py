"""The shapes world (issue 18): a procedurally generated scene with exact ground truth for every task.

- 224x224 RGB; background one gray level drawn from 190..235 per image plus per-pixel Gaussian noise
  (sigma 4), clipped to 0..255.
- 1 to 4 objects; axis-aligned boxes 28..72 px a side, fully inside the image, at least 4 px apart (their
  boxes grown by 4 px do not overlap), so no two objects touch.
- Shapes: circle (w = h), square (axis-aligned, w = h), triangle (isosceles, apex up: base = box width, apex at
  the top centre; w and h drawn independently).
- Colours: red (220, 50, 50), green (50, 170, 70), blue (50, 90, 220), yellow (230, 200, 50), every channel
  jittered by +-15 per object. A class name is "<colour> <shape>".
- Masks: the filled shape's pixels. Keypoints: square TL, TR, BR, BL; triangle apex, bottom-right,
  bottom-left; circles have none.

Boxes are continuous pixel coordinates [x0, y0, x1, y1] with x1 = x0 + w (the pixel grid's corners), so a
filled square covers exactly the pixels x0..x1-1; keypoints use the same frame. `make_scene(seed)` is a pure
function of its seed (numpy's PCG64), so a set of scenes is named by a list of seeds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224
COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 50, 50), "green": (50, 170, 70), "blue": (50, 90, 220),
                                            "yellow": (230, 200, 50)}
SHAPES = ("circle", "square", "triangle")
CLASSES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # 12 class names, fixed order
KEYPOINT_NAMES: dict[str, tuple[str, ...]] = {
    "square": ("top-left", "top-right", "bottom-right", "bottom-left"),
    "triangle": ("apex", "bottom-right", "bottom-left"),
    "circle": (),
}
MAX_KEYPOINTS = 4
MIN_SIDE, MAX_SIDE, GAP = 28, 72, 4


@dataclass
class ShapeObject:
    colour: str
    shape: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 (continuous pixel corners)
    rgb: tuple[int, int, int]
    mask: np.ndarray = field(repr=False)  # [224, 224] bool
    keypoints: np.ndarray = field(repr=False)  # [n_kpt, 2] float (x, y); n_kpt from KEYPOINT_NAMES

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def label(self) -> int:
        return CLASSES.index(self.name)


@dataclass
class Scene:
    seed: int
    image: Image.Image
    objects: list[ShapeObject]

    def count(self, colour: str | None = None, shape: str | None = None) -> int:
        return sum(1 for o in self.objects if (colour is None or o.colour == colour)
                   and (shape is None or o.shape == shape))

    def class_names(self) -> list[str]:
        """The distinct class names present, in CLASSES order."""
        return [c for c in CLASSES if any(o.name == c for o in self.objects)]


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Boxes (x0, y0, x1, y1) with at least GAP px between them on some axis."""
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _polygon(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]


def _draw(shape: str, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The filled shape as a bool mask; PIL's inclusive pixel boxes end at x1 - 1."""
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
    elif shape == "square":
        d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    else:
        d.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=255)
    return np.asarray(m) > 0


def keypoints_of(shape: str, box: tuple[float, float, float, float]) -> np.ndarray:
    if shape == "circle":
        return np.zeros((0, 2), np.float32)
    return np.asarray(_polygon(shape, box), np.float32)


def make_scene(seed: int, num_objects: int | None = None) -> Scene:
    rng = np.random.Generator(np.random.PCG64(seed))
    n = int(num_objects if num_objects is not None else rng.integers(1, 5))
    size = IMAGE_SIZE
    gray = int(rng.integers(190, 236))
    img = np.clip(gray + rng.normal(0.0, 4.0, (size, size, 3)), 0, 255)
    boxes: list[tuple[int, int, int, int]] = []
    objects: list[ShapeObject] = []
    for _ in range(n):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        for _attempt in range(200):
            w = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
            h = w if shape != "triangle" else int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if all(_apart(box, b) for b in boxes):
                break
        else:
            continue  # no room left: fewer objects (never below 1, the first always fits)
        boxes.append(box)
        rgb = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[colour])
        mask = _draw(shape, box, size)
        img[mask] = rgb
        objects.append(ShapeObject(colour, shape, tuple(float(v) for v in box), rgb, mask,
                                   keypoints_of(shape, box)))
    return Scene(seed, Image.fromarray(img.round().astype(np.uint8)), objects)
