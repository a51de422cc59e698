"""Result types of the task decoders, shared by the decoder registry, the engine and the CLI.

`GenerationResult` is defined here. `DetectionResult` / `PoseResult` belong to the detector
module (`unimlm_engine.model.decoders.detector`); `unimlm_engine.model.decoders` re-exports
all three.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image



@dataclass(slots=True)
class GenerationResult:
    """What one request gets back from one [GEN] / [EDIT] decoder call.

    images: one PIL image per payload group the request contributed, in order.
    seeds: the generator seed each image was drawn with (same seed -> same image).
    """

    route: str
    images: list[Image.Image] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    num_inference_steps: int = 0
    guidance_scale: float = 0.0

    def __post_init__(self) -> None:
        if len(self.images) != len(self.seeds):
            raise ValueError(f"GenerationResult: {len(self.images)} images but {len(self.seeds)} seeds")

    @property
    def image(self) -> Image.Image:
        """The first image (a request usually routes one [GEN] / [EDIT] group)."""
        if not self.images:
            raise ValueError("GenerationResult: no images")
        return self.images[0]
