"""Configuration: model configs (model.py, decoders.py), serving knobs (engine.py), named presets
(presets.py). Every config is a small dataclass that validates in `__post_init__`."""
from .decoders import DetectorConfig, ExpertConfig, GenConfig, PoseConfig
from .engine import EngineConfig
from .model import (CLIP_MEAN, CLIP_STD, ConfigError, LLMConfig, LoRAMoEConfig, ModelConfig, SuperLinkConfig,
                    VisionConfig)

__all__ = ["CLIP_MEAN", "CLIP_STD", "ConfigError", "DetectorConfig", "EngineConfig", "ExpertConfig", "GenConfig", "LLMConfig",
           "LoRAMoEConfig", "ModelConfig", "PoseConfig", "SuperLinkConfig", "VisionConfig"]
