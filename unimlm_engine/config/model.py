"""Configuration dataclasses (DESIGN.md section 1 and 2).

Every config validates in `__post_init__` and raises `ValueError` with the field name.
`ModelConfig.from_official_dict` / `to_official_dict` read and write the official
VisionLLM v2 `config.json` (`model_type: visionllmv2`), plus our own `lora_moe` and `experts` keys.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from .decoders import DetectorConfig, ExpertConfig, GenConfig, PoseConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


def require(cond: bool, owner: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{owner}: {msg}")


def _pick(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(slots=True)
class VisionConfig:
    """CLIP ViT tower (HF CLIPVisionConfig field names)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # which hidden state feeds the projector (HF hidden_states index; -2 = second-to-last layer)
    output_layer: int = -2
    max_tiles: int = 4
    use_thumbnail: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        o = "VisionConfig"
        for n in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"):
            require(getattr(self, n) > 0, o, f"{n} must be positive, got {getattr(self, n)}")
        require(self.hidden_size % self.num_attention_heads == 0, o, "hidden_size must divide by num_attention_heads")
        require(self.image_size % self.patch_size == 0, o, "image_size must be a multiple of patch_size")
        require(-self.num_hidden_layers <= self.output_layer < 0, o, f"output_layer must be in [-{self.num_hidden_layers}, -1]")
        require(1 <= self.max_tiles <= 12, o, f"max_tiles must be in [1, 12], got {self.max_tiles}")
        require(self.hidden_act in ("quick_gelu", "gelu"), o, f"unsupported hidden_act {self.hidden_act!r}")
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)

    @property
    def tokens_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_layers_run(self) -> int:
        """Encoder layers actually run: hidden_states[output_layer] needs no more."""
        return self.num_hidden_layers + 1 + self.output_layer


@dataclass(slots=True)
class LLMConfig:
    """LLaMA-architecture decoder (HF LlamaConfig field names); GQA when num_key_value_heads < heads."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        o = "LLMConfig"
        for n in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            require(getattr(self, n) > 0, o, f"{n} must be positive, got {getattr(self, n)}")
        if self.head_dim == 0:
            require(self.hidden_size % self.num_attention_heads == 0, o, "hidden_size must divide by num_attention_heads")
            self.head_dim = self.hidden_size // self.num_attention_heads
        require(self.head_dim > 0 and self.head_dim % 2 == 0, o, f"head_dim must be positive and even, got {self.head_dim}")
        require(self.num_attention_heads % self.num_key_value_heads == 0, o, "num_attention_heads must be a multiple of num_key_value_heads")
        require(self.hidden_act == "silu", o, f"only SwiGLU (silu) is supported, got {self.hidden_act!r}")
        require(self.rope_theta > 0, o, "rope_theta must be positive")

    @property
    def gqa_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


# The one definition of the LoRA-MoE limits: LoRAMoEConfig validates against them and the fused
# Triton kernel (unimlm_engine/kernels/lora_moe.py) asserts them, so a config that validates runs on a GPU too.
LORA_MOE_MAX_EXPERTS = 64
LORA_MOE_MAX_RANK = 256


@dataclass(slots=True)
class LoRAMoEConfig:
    """Dense-router LoRA-MoE on the FFN linears: o = W0 x + (alpha/r) sum_i softmax(x Wg)_i B_i A_i x.
    Limits: 1 <= num_experts <= LORA_MOE_MAX_EXPERTS, 1 <= rank <= LORA_MOE_MAX_RANK (the fused
    kernel, unimlm_engine/kernels/lora_moe.py, imports the same constants)."""

    num_experts: int = 8
    rank: int = 4
    alpha: float = 32.0
    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")

    def __post_init__(self) -> None:
        o = "LoRAMoEConfig"
        require(1 <= self.num_experts <= LORA_MOE_MAX_EXPERTS, o,
                f"num_experts must be in [1, {LORA_MOE_MAX_EXPERTS}], got {self.num_experts}")
        require(1 <= self.rank <= LORA_MOE_MAX_RANK, o, f"rank must be in [1, {LORA_MOE_MAX_RANK}], got {self.rank}")
        require(self.alpha > 0, o, "alpha must be positive")
        self.target_modules = tuple(self.target_modules)
        bad = set(self.target_modules) - {"gate_proj", "up_proj", "down_proj"}
        require(not bad, o, f"unknown target_modules {sorted(bad)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(slots=True)
class SuperLinkConfig:
    """Learned query tables appended after a routing token (DESIGN.md section 1)."""

    num_embs: int = 4  # K for DET/GRD/SEG/POSE
    num_embs_gen: int = 64  # K for GEN/EDIT

    def __post_init__(self) -> None:
        require(self.num_embs > 0, "SuperLinkConfig", "num_embs must be positive")
        require(self.num_embs_gen > 0, "SuperLinkConfig", "num_embs_gen must be positive")

    def num_queries(self, route: str) -> int:
        """K for a route ("[DET]" or "det"): the field its RouteSpec names."""
        from ..routes import RouteError, get_route

        try:
            return get_route(route).num_queries_in(self)
        except RouteError as e:
            raise ConfigError(f"SuperLinkConfig: {e}") from None


@dataclass(slots=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora_moe: Optional[LoRAMoEConfig] = None
    superlink: SuperLinkConfig = field(default_factory=SuperLinkConfig)
    detector: Optional[DetectorConfig] = None
    pose: Optional[PoseConfig] = None
    gen: Optional[GenConfig] = None
    edit: Optional[GenConfig] = None
    vl_bridge_type: str = "mlp2x_gelu"
    # the official region encoder (`region_encoder.*`, visual prompts `<reg>region1<region></reg>`)
    use_region_encoder: bool = False
    experts: Optional[ExpertConfig] = None  # span-route experts (UnifiedMLLM); not in the official config.json

    def __post_init__(self) -> None:
        require(self.vl_bridge_type == "mlp2x_gelu", "ModelConfig", f"unsupported vl_bridge_type {self.vl_bridge_type!r}")
        v = self.vision
        require(not self.use_region_encoder or (v.patch_size % 2 == 0 and v.num_hidden_layers >= 2), "ModelConfig",
                "use_region_encoder needs an even vision patch_size and at least 2 vision layers")

    # ---- official config.json -------------------------------------------------
    @classmethod
    def from_official_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        mt = d.get("model_type")
        if mt != "visionllmv2":
            raise ConfigError(f"config.json: model_type must be 'visionllmv2', got {mt!r}")
        for key in ("vis_encoder_config", "llm_config"):
            if not isinstance(d.get(key), dict):
                raise ConfigError(f"config.json: missing or invalid {key!r}")
        vis = dict(d["vis_encoder_config"])
        vis["output_layer"] = d.get("vis_output_layer", -2)
        for k in ("max_tiles", "use_thumbnail"):
            if k in d:
                vis[k] = d[k]
        llm = dict(d["llm_config"])
        if llm.get("num_key_value_heads") is None:
            llm["num_key_value_heads"] = llm.get("num_attention_heads", LLMConfig.num_attention_heads)
        if llm.get("head_dim") is None:
            llm.pop("head_dim", None)
        if isinstance(llm.get("eos_token_id"), list):
            llm["eos_token_id"] = llm["eos_token_id"][0]
        lm = d.get("lora_moe")
        return cls(
            vision=VisionConfig(**_pick(VisionConfig, vis)),
            llm=LLMConfig(**_pick(LLMConfig, llm)),
            lora_moe=LoRAMoEConfig(**_pick(LoRAMoEConfig, lm)) if lm else None,
            superlink=SuperLinkConfig(num_embs=d.get("num_embs", 4), num_embs_gen=d.get("num_embs_gen", 64)),
            detector=DetectorConfig.from_dict(d.get("gdino_config") or {}) if d.get("use_gdino") else None,
            pose=PoseConfig.from_dict(d.get("unipose_config") or {}) if d.get("use_unipose") else None,
            gen=GenConfig.from_dict(d.get("sd_config") or {}) if d.get("use_sd") else None,
            edit=GenConfig.from_dict(d.get("ip2p_config") or {}) if d.get("use_ip2p") else None,
            vl_bridge_type=d.get("vl_bridge_type", "mlp2x_gelu"),
            use_region_encoder=bool(d.get("use_region_encoder", False)),
            experts=ExpertConfig.from_dict(d["experts"]) if d.get("experts") else None,
        )

    def to_official_dict(self) -> dict[str, Any]:
        vis = asdict(self.vision)
        out_layer = vis.pop("output_layer")
        max_tiles, use_thumb = vis.pop("max_tiles"), vis.pop("use_thumbnail")
        vis["image_mean"], vis["image_std"] = list(vis["image_mean"]), list(vis["image_std"])
        vis["model_type"] = "clip_vision_model"
        llm = asdict(self.llm)
        llm["model_type"] = "llama"
        llm["architectures"] = ["LlamaForCausalLM"]
        d: dict[str, Any] = {
            "model_type": "visionllmv2",
            "architectures": ["VisionLLMv2Model"],
            "vis_encoder_config": vis,
            "llm_config": llm,
            "vl_bridge_type": self.vl_bridge_type,
            "vis_output_layer": out_layer,
            "max_tiles": max_tiles,
            "use_thumbnail": use_thumb,
            "num_embs": self.superlink.num_embs,
            "num_embs_gen": self.superlink.num_embs_gen,
            "use_region_encoder": self.use_region_encoder,
        }
        for flag, key, cfg in (("use_gdino", "gdino_config", self.detector), ("use_unipose", "unipose_config", self.pose),
                               ("use_sd", "sd_config", self.gen), ("use_ip2p", "ip2p_config", self.edit)):
            d[flag] = cfg is not None
            d[key] = cfg.to_dict() if cfg is not None else None  # the official to_dict writes null
        if self.experts is not None:  # our key, like lora_moe: span-route experts (relative dirs: the checkpoint's)
            d["experts"] = self.experts.to_dict()
        if self.lora_moe is not None:
            lm = asdict(self.lora_moe)
            lm["target_modules"] = list(lm["target_modules"])
            d["lora_moe"] = lm
        return d
