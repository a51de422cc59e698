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


# GroundingDinoConfig fields the official gdino must have at these values (VisionLLM v2's OVGroundingDino
# builds only this variant: two-stage, learned target, one shared box MLP, own encoder box MLP, sine positions).
_GDINO_FIXED = {"two_stage": True, "embedding_init_target": True, "decoder_bbox_embed_share": True,
                "two_stage_bbox_embed_share": False, "query_dim": 4, "position_embedding_type": "sine",
                "activation_function": "relu", "norm": "GN"}
# DetectorConfig field <- official gdino_config name, where they differ
_GDINO_RENAMES = {"llm_hidden_size": "l_hidden_size", "max_classes": "max_text_len",
                  "position_temperature": "positional_embedding_temperature"}
_SWIN_FIELDS = ("embed_dim", "depths", "num_heads", "window_size", "patch_size", "mlp_ratio")


@dataclass(slots=True)
class DetectorConfig(_DictMixin):
    """The official `gdino` (OVGroundingDinoForObjectDetection) for [DET] / [GRD] / [SEG].

    from_dict / to_dict read and write the official `gdino_config` dict: transformers' GroundingDinoConfig
    names plus mask_dim, norm, l_hidden_size, num_embs, and the Swin size in `backbone_config` (an HF
    SwinConfig dict). image_short / image_long are the engine's resize (the official eval's mmdet test
    pipeline: img_scale (1333, 800)); they are not in the official config and are written under those names.
    """

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
    max_classes: int = 256  # GroundingDinoConfig.max_text_len: logits are padded to it, classes beyond it unsupported
    llm_hidden_size: int = 4096  # l_hidden_size: width of the super-link payload
    num_embs: int = 4
    mask_dim: int = 256
    layer_norm_eps: float = 1e-5
    position_temperature: float = 20.0  # positional_embedding_temperature
    # Swin backbone (gdino_config.backbone_config)
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    # engine: the image resize (official eval pipeline: short side 800, long side at most 1333)
    image_short: int = 800
    image_long: int = 1333

    def __post_init__(self) -> None:
        c, owner = self, "DetectorConfig"
        _check_positive(owner, c, ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                                   "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
                                   "encoder_n_points", "decoder_n_points", "num_queries", "max_classes",
                                   "llm_hidden_size", "num_embs", "mask_dim", "embed_dim", "window_size",
                                   "patch_size", "image_short", "image_long"))
        if c.num_feature_levels != 4:
            raise ValueError(f"{owner}: the official gdino uses 4 feature levels (Swin stages 2-4 + one stride-2 "
                             f"conv), got num_feature_levels={c.num_feature_levels}")
        if c.d_model % 32 or c.d_model < 64 or c.d_model % c.encoder_attention_heads or \
                c.d_model % c.decoder_attention_heads:
            raise ValueError(f"{owner}: d_model must be a multiple of 32 and >= 64 (GroupNorm(32, d) needs two "
                             f"values a group on a 1x1 level map) and divide by the head counts, got {c.d_model}")
        if c.encoder_attention_heads < 2 or (c.encoder_ffn_dim // 2) % (c.encoder_attention_heads // 2):
            raise ValueError(f"{owner}: encoder_ffn_dim // 2 must divide by encoder_attention_heads // 2 (>= 1)")
        if (c.d_model // 2) % 2:
            raise ValueError(f"{owner}: d_model // 2 must be even (sine position features)")
        c.depths, c.num_heads = tuple(c.depths), tuple(c.num_heads)
        if len(c.depths) != 4 or len(c.num_heads) != 4:
            raise ValueError(f"{owner}: the Swin backbone needs 4 stages (depths, num_heads of length 4)")
        if any(not isinstance(v, int) or v <= 0 for v in c.depths + c.num_heads):
            raise ValueError(f"{owner}: depths and num_heads must be positive ints")
        if any((c.embed_dim * 2 ** i) % h for i, h in enumerate(c.num_heads)):
            raise ValueError(f"{owner}: each Swin stage width embed_dim * 2**i must divide by its num_heads")
        if c.image_short > c.image_long:
            raise ValueError(f"{owner}: image_short ({c.image_short}) must be <= image_long ({c.image_long})")

    @property
    def pad_multiple(self) -> int:
        """The canvas multiple (nested_tensor_from_tensor_list(size_divisibility=32) in the official model)."""
        return 32

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DetectorConfig":
        """The official gdino_config dict (or one written by to_dict) -> DetectorConfig. Unknown keys are
        ignored; the variant switches must have the official values (ValueError otherwise)."""
        for k, want in _GDINO_FIXED.items():
            if k in d and d[k] != want:
                raise ValueError(f"gdino_config: {k}={d[k]!r} is not supported (the official model uses {want!r})")
        bb = d.get("backbone_config") or {}
        if bb and bb.get("model_type", "swin") != "swin":
            raise ValueError(f"gdino_config.backbone_config: model_type {bb.get('model_type')!r} is not supported "
                             f"(only swin)")
        if bb.get("out_features") not in (None, ["stage1", "stage2", "stage3", "stage4"]):
            raise ValueError(f"gdino_config.backbone_config: out_features {bb.get('out_features')} (the official "
                             f"gdino uses stage1..stage4: stage 1 feeds the mask head, stages 2-4 the levels)")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and k not in _SWIN_FIELDS and k not in _GDINO_RENAMES}
        for ours, theirs in _GDINO_RENAMES.items():
            if theirs in d:
                kw[ours] = d[theirs]
        kw.update({k: (tuple(bb[k]) if k in ("depths", "num_heads") else bb[k]) for k in _SWIN_FIELDS if k in bb})
        if "layer_norm_eps" in bb:
            kw["layer_norm_eps"] = bb["layer_norm_eps"]
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """-> the official gdino_config layout (GroundingDinoConfig names, backbone_config a SwinConfig dict)."""
        own = asdict(self)
        out = {k: v for k, v in own.items() if k not in _SWIN_FIELDS and k not in _GDINO_RENAMES
               and k != "layer_norm_eps"}
        out.update({theirs: own[ours] for ours, theirs in _GDINO_RENAMES.items()})
        out.update(_GDINO_FIXED)
        out["backbone_config"] = {"model_type": "swin", **{k: (list(own[k]) if k in ("depths", "num_heads")
                                                                else own[k]) for k in _SWIN_FIELDS},
                                  "layer_norm_eps": self.layer_norm_eps,
                                  "out_features": ["stage1", "stage2", "stage3", "stage4"]}
        return out


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
