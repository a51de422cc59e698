"""Decoder configs (DESIGN.md section 1, "Decoders").

Field names follow transformers' GroundingDinoConfig where the detector mirrors it, so
the official `gdino_config` / `unipose_config` dicts load with `from_dict` (unknown keys
are ignored, known ones validated).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar


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
        # layer_norm_eps is the Swin's (backbone_config); GroundingDinoConfig's own top-level one is not read
        kw = {k: v for k, v in d.items() if k in names and k not in _SWIN_FIELDS and k not in _GDINO_RENAMES
              and k != "layer_norm_eps"}
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


# the official build_swin_transformer table: name -> (embed_dim, depths, num_heads, window_size)
UNIPOSE_SWIN = {
    "swin_T_224_1k": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin_B_224_22k": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7),
    "swin_B_384_22k": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
    "swin_L_224_22k": (192, (2, 2, 18, 2), (6, 12, 24, 48), 7),
    "swin_L_384_22k": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
}
# keys the official unipose_config (UniPoseConfig, no defaults) must give; everything else in it is ignored
# unless it names a field below (then it is validated)
UNIPOSE_REQUIRED = ("backbone", "hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward",
                    "num_queries", "num_feature_levels", "enc_n_points", "dec_n_points", "return_interm_indices",
                    "num_body_points", "num_box_decoder_layers", "l_hidden_size")
# (field, the only value this engine (and the official inference path as released) supports)
_UNIPOSE_FIXED = (("hidden_dim", 256), ("num_body_points", 68), ("num_box_decoder_layers", 2), ("query_dim", 4),
                  ("two_stage_type", "standard"), ("embed_init_tgt", True), ("position_embedding", "sine"),
                  ("transformer_activation", "relu"), ("decoder_sa_type", "sa"), ("two_stage_add_query_num", 0),
                  ("two_stage_pat_embed", 0), ("two_stage_learn_wh", False), ("num_patterns", 0),
                  ("binary_query_selection", False), ("pre_norm", False), ("use_text_enhancer", True),
                  ("use_fusion_layer", True), ("use_text_cross_attention", True),
                  ("dec_pred_bbox_embed_share", True), ("dec_pred_class_embed_share", True),
                  ("two_stage_bbox_embed_share", False), ("two_stage_class_embed_share", False))


@dataclass(slots=True)
class PoseConfig(_DictMixin):
    """The official UniPose for [POSE]: `unipose_config` (ED-Pose / X-Pose names). Defaults are the values the
    released 7B implies (X-Pose's UniPose Swin-T config; l_hidden_size = the LLM width); `from_dict` (the
    checkpoint's JSON) requires UNIPOSE_REQUIRED. Engine extensions (not in the official JSON):
    `swin_params` = (embed_dim, depths, num_heads, window_size) for a backbone name outside the official table
    (small test models), and the eval resize `image_short` / `image_long` (make_coco_transforms('val'))."""

    backbone: str = "swin_T_224_1k"
    return_interm_indices: tuple[int, ...] = (1, 2, 3)
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    num_queries: int = 900
    num_feature_levels: int = 4
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_body_points: int = 68
    num_box_decoder_layers: int = 2
    l_hidden_size: int = 4096
    pe_temperatureH: float = 20.0
    pe_temperatureW: float = 20.0
    query_dim: int = 4
    two_stage_type: str = "standard"
    embed_init_tgt: bool = True
    position_embedding: str = "sine"
    transformer_activation: str = "relu"
    decoder_sa_type: str = "sa"
    two_stage_add_query_num: int = 0
    two_stage_pat_embed: int = 0
    two_stage_learn_wh: bool = False
    num_patterns: int = 0
    binary_query_selection: bool = False
    pre_norm: bool = False
    use_text_enhancer: bool = True
    use_fusion_layer: bool = True
    use_text_cross_attention: bool = True
    dec_pred_bbox_embed_share: bool = True
    dec_pred_class_embed_share: bool = True
    two_stage_bbox_embed_share: bool = False
    two_stage_class_embed_share: bool = False
    swin_params: Any = None
    image_short: int = 800
    image_long: int = 1333

    # the official forward hard-codes these: 50 pose groups, objects padded to 100 slots
    num_groups: ClassVar[int] = 50
    max_classes: ClassVar[int] = 100

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PoseConfig":
        missing = [k for k in UNIPOSE_REQUIRED if k not in d]
        if missing:
            raise ValueError(f"unipose_config: missing {', '.join(missing)} (the official UniPoseConfig has no "
                             "defaults)")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def swin(self) -> tuple[int, tuple[int, ...], tuple[int, ...], int]:
        if self.backbone in UNIPOSE_SWIN:
            return UNIPOSE_SWIN[self.backbone]
        e, dep, hd, w = self.swin_params
        return int(e), tuple(dep), tuple(hd), int(w)

    @property
    def llm_hidden_size(self) -> int:
        return self.l_hidden_size

    def __post_init__(self) -> None:
        o = "PoseConfig (unipose_config)"
        _check_positive(o, self, ("nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries",
                                  "num_feature_levels", "enc_n_points", "dec_n_points", "l_hidden_size",
                                  "image_short", "image_long"))
        for name, want in _UNIPOSE_FIXED:
            if getattr(self, name) != want:
                raise ValueError(f"{o}: {name}={getattr(self, name)!r} is not supported (the official inference "
                                 f"path needs {want!r})")
        self.return_interm_indices = tuple(self.return_interm_indices)
        if self.return_interm_indices not in ((0, 1, 2, 3), (1, 2, 3), (3,)):
            raise ValueError(f"{o}: return_interm_indices must be [0,1,2,3], [1,2,3] or [3], got "
                             f"{list(self.return_interm_indices)}")
        if self.num_feature_levels < len(self.return_interm_indices):
            raise ValueError(f"{o}: num_feature_levels must be >= len(return_interm_indices)")
        if self.dec_layers <= self.num_box_decoder_layers:
            raise ValueError(f"{o}: dec_layers must exceed num_box_decoder_layers ({self.num_box_decoder_layers})")
        if self.num_queries < self.num_groups:
            raise ValueError(f"{o}: num_queries must be >= {self.num_groups} (the official top-50 pose groups)")
        if self.nheads % 2 or self.hidden_dim % self.nheads or (self.dim_feedforward // 2) % (self.nheads // 2):
            raise ValueError(f"{o}: nheads must be even, divide hidden_dim, and nheads/2 divide dim_feedforward/2")
        if self.image_short > self.image_long:
            raise ValueError(f"{o}: image_short must be <= image_long")
        if self.backbone in UNIPOSE_SWIN:
            if self.swin_params is not None:
                raise ValueError(f"{o}: swin_params is only for a backbone outside the official table")
            return
        if self.swin_params is None:
            raise ValueError(f"{o}: unknown backbone {self.backbone!r} (official: {', '.join(UNIPOSE_SWIN)}); a "
                             "custom name needs swin_params = (embed_dim, depths, num_heads, window_size)")
        try:
            e, dep, hd, w = self.swin_params
            e, dep, hd, w = int(e), tuple(int(x) for x in dep), tuple(int(x) for x in hd), int(w)
        except (TypeError, ValueError):
            raise ValueError(f"{o}: swin_params must be (embed_dim, depths, num_heads, window_size), got "
                             f"{self.swin_params!r}") from None
        if len(dep) != 4 or len(hd) != 4 or min(dep + hd + (e, w)) <= 0 or any((e << i) % h for i, h in
                                                                                enumerate(hd)):
            raise ValueError(f"{o}: swin_params needs 4 positive depths / num_heads dividing each stage width")
        self.swin_params = [e, list(dep), list(hd), w]


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
