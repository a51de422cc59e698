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


def _check_grounding(owner: str, c: Any) -> None:
    """Checks shared by DetectorConfig and PoseConfig (same backbone / encoder / decoder structure)."""
    _check_positive(owner, c, ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                               "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "num_feature_levels",
                               "encoder_n_points", "decoder_n_points", "num_queries", "max_classes",
                               "llm_hidden_size", "image_short", "image_long", "embed_dim", "window_size",
                               "max_detections"))
    if c.d_model % c.encoder_attention_heads or c.d_model % c.decoder_attention_heads:
        raise ValueError(f"{owner}: d_model must divide by the attention head counts")
    if c.d_model % 32:
        raise ValueError(f"{owner}: d_model must be a multiple of 32 (GroupNorm(32, d_model)), got {c.d_model}")
    fusion_heads = max(c.encoder_attention_heads // 2, 1)
    if (c.encoder_ffn_dim // 2) % fusion_heads or c.encoder_ffn_dim < 2:
        raise ValueError(f"{owner}: encoder_ffn_dim // 2 must divide by encoder_attention_heads // 2")
    c.depths, c.num_heads = tuple(c.depths), tuple(c.num_heads)
    if len(c.depths) != len(c.num_heads) or len(c.depths) < 2:
        raise ValueError(f"{owner}: depths and num_heads must have the same length (>= 2)")
    if any(not isinstance(v, int) or v <= 0 for v in c.depths + c.num_heads):
        raise ValueError(f"{owner}: depths and num_heads must be positive ints")
    if any((c.embed_dim * 2 ** i) % h for i, h in enumerate(c.num_heads)):
        raise ValueError(f"{owner}: each Swin stage width embed_dim * 2**i must divide by its num_heads")
    if c.num_feature_levels < len(c.depths) - 1:
        raise ValueError(f"{owner}: num_feature_levels must be >= len(depths) - 1 (backbone levels)")
    if c.image_short > c.image_long:
        raise ValueError(f"{owner}: image_short ({c.image_short}) must be <= image_long ({c.image_long})")
    if not 0.0 <= c.score_threshold < 1.0:
        raise ValueError(f"{owner}: score_threshold must be in [0, 1), got {c.score_threshold}")


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

    score_threshold: float = 0.3  # keep detections whose best class probability exceeds this
    max_detections: int = 100  # top-k queries considered per image before the threshold

    def __post_init__(self) -> None:
        _check_positive("DetectorConfig", self, ("mask_dim",))
        _check_grounding("DetectorConfig", self)


@dataclass(slots=True)
class PoseConfig(_DictMixin):
    """UniPose-style keypoint decoder for [POSE]."""

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
    num_keypoints: int = 17
    keypoint_decoder_layers: int = 2  # deformable layers refining the keypoints of the selected instances
    max_classes: int = 256
    llm_hidden_size: int = 4096
    image_short: int = 800
    image_long: int = 1333
    # Swin backbone
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    score_threshold: float = 0.3
    max_detections: int = 100  # instances (top-k by score) that get keypoints

    def __post_init__(self) -> None:
        _check_positive("PoseConfig", self, ("num_keypoints", "keypoint_decoder_layers"))
        _check_grounding("PoseConfig", self)


@dataclass(slots=True)
class GenConfig(_DictMixin):
    """[GEN] / [EDIT]: emb_proj + transformer mapper -> prompt_embeds [B, 77, 768] for diffusers."""

    llm_hidden_size: int = 4096
    num_embs: int = 64
    mapper_dim: int = 768
    mapper_layers: int = 1  # the official mapper: 1 encoder + 1 decoder layer
    mapper_heads: int = 8
    num_prompt_tokens: int = 77
    pipeline_dir: str = ""  # local diffusers-format directory (no download)

    def __post_init__(self) -> None:
        _check_positive("GenConfig", self, ("llm_hidden_size", "num_embs", "mapper_dim", "mapper_layers", "mapper_heads",
                                            "num_prompt_tokens"))
        if self.mapper_dim % self.mapper_heads:
            raise ValueError("GenConfig: mapper_dim must divide by mapper_heads")

    # The official sd_config / ip2p_config (StableDiffusionWithLLMEmbConfig / InstructPix2PixWithLLMEmbConfig)
    # name the same things differently; nn.Transformer's default nhead (8) is the official mapper's.
    _OFFICIAL = {"sd_hidden_size": "mapper_dim", "num_queries": "num_prompt_tokens", "num_encoder_layers": "mapper_layers",
                 "num_embed_tokens": "num_embs", "sd_model_id": "pipeline_dir"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenConfig":
        """Our field names or the official ones (official values win when both are given)."""
        d = dict(d)
        enc, dec = d.get("num_encoder_layers"), d.get("num_decoder_layers")
        if enc is not None and dec is not None and enc != dec:
            raise ValueError(f"GenConfig: num_encoder_layers ({enc}) != num_decoder_layers ({dec}) is not supported")
        for official, ours in cls._OFFICIAL.items():
            if d.get(official) is not None:
                d[ours] = d[official]
        return _DictMixin.from_dict.__func__(cls, d)

    def to_dict(self) -> dict[str, Any]:
        """The official names (what the official config classes read) plus `mapper_heads`."""
        out = {official: getattr(self, ours) for official, ours in self._OFFICIAL.items()}
        out.update(llm_hidden_size=self.llm_hidden_size, num_decoder_layers=self.mapper_layers,
                   mapper_heads=self.mapper_heads)
        return out


@dataclass(slots=True)
class ExpertConfig(_DictMixin):
    """The expert models of the span routes (UnifiedMLLM; routes.py, SpanRouteSpec).

    Each `*_dir` is a local directory (nothing downloads): diffusers format for the pipelines, a
    transformers SamModel + SamProcessor folder for SAM; "" leaves that expert out. tiny=True builds tiny
    random experts in code instead (tests, the tiny-unified preset). The numbers are the experts'
    default call options (EngineConfig.decoder_options[route name] overrides them per route).
    """

    sd_dir: str = ""  # StableDiffusionPipeline: <IMGGEN> text-to-image
    ip2p_dir: str = ""  # StableDiffusionInstructPix2PixPipeline: <IMGEDIT> global edit
    gligen_dir: str = ""  # StableDiffusionGLIGENPipeline (generation weights): <LAYOUTGEN> + <BOX>
    gligen_inpaint_dir: str = ""  # StableDiffusionGLIGENPipeline (inpainting weights): <IMGEDIT> + <BOX>
    sam_dir: str = ""  # SamModel + SamProcessor: <IMGSEG> + <BOX>, one mask per box
    tiny: bool = False
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    image_size: int = 512  # generated image side (text-to-image, layout generation)
    clip_masks_to_boxes: bool = True  # SAM masks keep only the pixels inside their prompt box

    def __post_init__(self) -> None:
        _check_positive("ExpertConfig", self, ("num_inference_steps", "image_size"))
        if self.image_size % 8:
            raise ValueError(f"ExpertConfig: image_size must be a multiple of 8, got {self.image_size}")
        if self.guidance_scale < 0 or self.image_guidance_scale < 0:
            raise ValueError("ExpertConfig: guidance scales must be >= 0")

    def directory(self, expert: str) -> str:
        """The local directory of an expert ("sd", "ip2p", "gligen", "gligen_inpaint", "sam")."""
        return getattr(self, f"{expert}_dir")
