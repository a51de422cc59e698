"""The model in plain PyTorch: the reference every kernel and the engine is checked against."""
from .generation import GenerationOutput, reference_generate
from .region_encoder import RegionEncoder, RegionInput
from .superlink import RoutedPayload
from .vlm import VisionLLM, build_model

__all__ = ["VisionLLM", "build_model", "reference_generate", "GenerationOutput", "RoutedPayload",
           "RegionEncoder", "RegionInput"]
