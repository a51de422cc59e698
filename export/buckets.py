"""Export buckets: which canvases get an artifact, and the batch / class ranges every artifact accepts.

The batch and class-count dims are dynamic in every export (torch.export.Dim; see README.md), so only the
canvas (H x W) is bucketed: one artifact per canvas. A `Range` with min == max makes that dim static
instead (a fixed-shape artifact, e.g. for a TensorRT engine tuned to one batch).

Spec strings (the CLI's --canvas / --batch / --classes):
- canvases: "auto" (default_canvases) or "HxW,HxW,..." (multiples of the decoder's pad multiple);
- ranges: "MAX" (min 1, opt = MAX), "MIN:MAX" or "MIN:OPT:MAX" (opt: the shape a TensorRT profile tunes for).
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BATCH = 8
DEFAULT_OPT_CLASSES = 8


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass(frozen=True)
class Range:
    """min <= opt <= max of one dynamic dim (all equal: a static dim)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 1 <= min <= opt <= max, got {self.min}:{self.opt}:{self.max}")

    @property
    def static(self) -> bool:
        return self.min == self.max

    def example(self) -> int:
        """The size to trace with: 2 when the range allows it (torch.export specialises 0 and 1), min if it
        must."""
        return self.min if self.static else min(max(2, self.min), self.max)

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    @classmethod
    def parse(cls, spec: str | int, what: str) -> "Range":
        try:
            parts = [int(p) for p in str(spec).split(":")]
        except ValueError:
            raise ValueError(f"--{what} {spec!r}: expected MAX, MIN:MAX or MIN:OPT:MAX (integers)") from None
        if len(parts) == 1:
            parts = [1, parts[0], parts[0]]
        elif len(parts) == 2:
            parts = [parts[0], parts[1], parts[1]]
        if len(parts) != 3:
            raise ValueError(f"--{what} {spec!r}: expected MAX, MIN:MAX or MIN:OPT:MAX")
        try:
            return cls(*parts)
        except ValueError as e:
            raise ValueError(f"--{what} {spec!r}: {e}") from None


def resize_canvases(short: int, long: int, multiple: int) -> list[tuple[int, int]]:
    """Every canvas the official detector's resize (short side -> short unless the long side would pass long,
    then long side -> long; sides padded to `multiple`) can produce, both orientations, smallest first.
    Tiny preset (64 / 96, 32): 32x96, 64x64, 96x32, 64x96, 96x64; the 7B preset (800 / 1333): 83 canvases."""
    s, l = _round_up(short, multiple), _round_up(long, multiple)
    one = {(s, x) for x in range(s, l + 1, multiple)} | {(x, l) for x in range(multiple, s + 1, multiple)}
    return sorted(one | {(w, h) for h, w in one}, key=lambda hw: (hw[0] * hw[1], hw))


def default_canvases(cfg, multiple: int) -> list[tuple[int, int]]:
    """The detector's (a DetectorConfig; its exports serve exact canvases): resize_canvases of its
    image_short / image_long."""
    return resize_canvases(cfg.image_short, cfg.image_long, multiple)


def parse_canvases(spec: str | None, cfg, multiple: int) -> list[tuple[int, int]]:
    if spec is None or spec == "auto":
        return default_canvases(cfg, multiple)
    out = []
    for part in str(spec).split(","):
        try:
            h, w = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"--canvas {spec!r}: expected 'auto' or HxW[,HxW...], e.g. 64x128,128x128") from None
        if h < multiple or w < multiple or h % multiple or w % multiple:
            raise ValueError(f"--canvas {part}: sides must be positive multiples of the decoder's pad multiple "
                             f"{multiple}")
        out.append((h, w))
    return sorted(set(out), key=lambda hw: (hw[0] * hw[1], hw))


@dataclass
class BucketPlan:
    """canvases: (H, W) per artifact; batch / classes: the ranges every artifact accepts."""

    canvases: list[tuple[int, int]]
    batch: Range
    classes: Range
    queries: int = 4

    def main_canvas(self) -> tuple[int, int]:
        """The canvas written under the plain artifact name: the largest (it fits every image the default
        resize produces)."""
        return max(self.canvases, key=lambda hw: (hw[0] * hw[1], hw))

    def to_dict(self) -> dict:
        return {"batch": self.batch.to_dict(), "classes": self.classes.to_dict(), "queries": self.queries}


def plan_buckets(cfg, multiple: int, canvases: str | None = None, batch: str | int | None = None,
                 classes: str | int | None = None, queries: int = 4) -> BucketPlan:
    """cfg: DetectorConfig. Defaults: canvases "auto", batch 1..8 (opt 8), classes
    1..cfg.max_classes (opt min(8, max_classes))."""
    b = Range.parse(batch, "batch") if batch is not None else Range(1, DEFAULT_MAX_BATCH, DEFAULT_MAX_BATCH)
    if classes is not None:
        c = Range.parse(classes, "classes")
    else:
        c = Range(1, min(DEFAULT_OPT_CLASSES, cfg.max_classes), cfg.max_classes)
    if c.max > cfg.max_classes:
        raise ValueError(f"--classes {classes}: max {c.max} exceeds the decoder's max_classes={cfg.max_classes}")
    return BucketPlan(parse_canvases(canvases, cfg, multiple), b, c, queries)
