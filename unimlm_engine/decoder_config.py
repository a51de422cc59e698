"""Decoder configs (DESIGN.md section 1, "Decoders").

Field names follow transformers' GroundingDinoConfig where the detector mirrors it, so
the official `gdino_config` / `unipose_config` dicts load with `from_dict` (unknown keys
are ignored, known ones validated).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


def _check_positive(owner: str, obj: Any, names: tuple[str, ...]) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{owner}: {n} must be a positive int, got {v!r}")


class _DictMixin:
    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class DetectorConfig(_DictMixin):
    """Grounding-DINO-style detector for [DET] / [GRD] / [SEG]."""

    d_model: int = 256
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    num_feature_levels: int = 4
    encoder_n_points: int = 4
    decoder_n_points: int = 4
    num_queries: int = 900
    max_classes: int = 256
    llm_hidden_size: int = 4096  # width of the super-link payload
    mask_dim: int = 256
    image_short: int = 800
    image_long: int = 1333
    # Swin backbone
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7

    def __post_init__(self) -> None:
        _check_positive("DetectorConfig", self, ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                                                 "decoder_attention_heads", "num_feature_levels", "encoder_n_points",
                                                 "decoder_n_points", "num_queries", "max_classes", "llm_hidden_size"))
        if self.d_model % self.encoder_attention_heads or self.d_model % self.decoder_attention_heads:
            raise ValueError("DetectorConfig: d_model must divide by the attention head counts")
        self.depths, self.num_heads = tuple(self.depths), tuple(self.num_heads)
        if len(self.depths) != len(self.num_heads):
            raise ValueError("DetectorConfig: depths and num_heads must have the same length")


@dataclass(slots=True)
class PoseConfig(_DictMixin):
    """UniPose-style keypoint decoder for [POSE]."""

    d_model: int = 256
    decoder_layers: int = 6
    decoder_attention_heads: int = 8
    decoder_ffn_dim: int = 2048
    num_feature_levels: int = 4
    decoder_n_points: int = 4
    num_queries: int = 900
    num_keypoints: int = 17
    llm_hidden_size: int = 4096

    def __post_init__(self) -> None:
        _check_positive("PoseConfig", self, ("d_model", "decoder_layers", "decoder_attention_heads", "num_feature_levels",
                                             "decoder_n_points", "num_queries", "num_keypoints", "llm_hidden_size"))


@dataclass(slots=True)
class GenConfig(_DictMixin):
    """[GEN] / [EDIT]: emb_proj + transformer mapper -> prompt_embeds [B, 77, 768] for diffusers."""

    llm_hidden_size: int = 4096
    num_embs: int = 64
    mapper_dim: int = 768
    mapper_layers: int = 4
    mapper_heads: int = 8
    num_prompt_tokens: int = 77
    pipeline_dir: str = ""  # local diffusers-format directory (no download)

    def __post_init__(self) -> None:
        _check_positive("GenConfig", self, ("llm_hidden_size", "num_embs", "mapper_dim", "mapper_layers", "mapper_heads",
                                            "num_prompt_tokens"))
        if self.mapper_dim % self.mapper_heads:
            raise ValueError("GenConfig: mapper_dim must divide by mapper_heads")
