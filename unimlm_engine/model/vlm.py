"""The multimodal model: vision tower, `vl_bridge` projector, LLM, super-link query tables
and (optionally) the task decoders. Parameter names are the official checkpoint's
(`vis_encoder.*`, `vl_bridge.*`, `llm.*`, `emb_embeddings_*`, `region_encoder.*`); decoders live under
`decoders.` here and under their official prefixes (`gdino.` ...) in checkpoints.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from ..routes import get_route, route_tokens
from .llm import LLM
from .region_encoder import NUM_LEVELS, LayerNorm2d, RegionEncoder, RegionInput
from .superlink import build_query_tables, table_param_name
from .vision import VisionTower


class VisionLLM(nn.Module):
    def __init__(self, cfg: ModelConfig, with_decoders: bool = True):
        super().__init__()
        self.cfg = cfg
        self.vis_encoder = VisionTower(cfg.vision)
        self.vl_bridge = nn.Sequential(nn.Linear(cfg.vision.hidden_size, cfg.llm.hidden_size), nn.GELU(),
                                       nn.Linear(cfg.llm.hidden_size, cfg.llm.hidden_size))
        self.llm = LLM(cfg.llm, cfg.lora_moe)
        self.query_table_names: tuple[str, ...] = ()
        for name, table in build_query_tables(cfg).items():
            self.add_module(name, table)
            self.query_table_names += (name,)
        self.decoders: Optional[nn.Module] = None
        if with_decoders and any(c is not None for c in (cfg.detector, cfg.pose, cfg.gen, cfg.edit, cfg.experts)):
            from .decoders import DecoderSet

            self.decoders = DecoderSet(cfg)
        self.region_encoder: Optional[RegionEncoder] = None
        if cfg.use_region_encoder:  # on a forked RNG, built last: build_model's draws for the rest stay the same
            with torch.random.fork_rng(devices=[]):
                self.region_encoder = RegionEncoder(256, cfg.vision.hidden_size, cfg.llm.hidden_size,
                                                    cfg.vision.patch_size)
        # token string -> id of every special token; set from the tokenizer by the loader
        self.special_ids: dict[str, int] = {}

    @property
    def route_ids(self) -> dict[int, str]:
        return {self.special_ids[r]: r for r in route_tokens() if r in self.special_ids}

    @property
    def device(self) -> torch.device:
        return self.llm.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.lm_head.weight.dtype

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [N_tiles, 3, S, S] -> [N_tiles * tokens_per_tile, llm_hidden]"""
        feats = self.vis_encoder(pixels.to(device=self.device, dtype=self.dtype))
        return self.vl_bridge(feats).flatten(0, 1)

    def region_features(self, canvases: torch.Tensor, levels: list[torch.Tensor],
                        regions: list[RegionInput]) -> torch.Tensor:
        """canvases: [R, 3, S, S] (region r's image canvas), levels: NUM_LEVELS x [R, (S/p)^2, vis_hidden]
        -> [R, llm_hidden]"""
        if self.region_encoder is None:
            raise ValueError("this model has no region encoder (config use_region_encoder is false)")
        masks = torch.stack([r.mask for r in regions]).to(self.device)
        return self.region_encoder(canvases.to(device=self.device, dtype=self.dtype), masks, levels,
                                   [r.points for r in regions])

    def encode_regions(self, pixel_values: list[torch.Tensor], regions: list[RegionInput]) -> torch.Tensor:
        """One request, plainly: every region's image canvas (its last tile: the thumbnail, or the only tile)
        through the whole CLIP tower, hidden_states[-3:] -> [R, llm_hidden]."""
        bad = [r.image for r in regions if not 0 <= r.image < len(pixel_values)]
        if bad:
            raise ValueError(f"regions refer to images {bad} but {len(pixel_values)} images were given")
        canvases = torch.stack([pixel_values[r.image][-1] for r in regions]).to(device=self.device, dtype=self.dtype)
        hs = self.vis_encoder.hidden_states(canvases)[-NUM_LEVELS:]
        return self.region_features(canvases, [h[:, 1:] for h in hs], regions)

    def embed_inputs(self, input_ids: torch.Tensor, image_features: Optional[torch.Tensor] = None,
                     region_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids: [T]; image_features: [P, hidden] for the P `<im_patch>` positions; region_features:
        [R, hidden] for the R `<region>` positions -> [T, hidden]"""
        embeds = self.llm.embed(input_ids)
        for token, feats, what in (("<im_patch>", image_features, "image feature"),
                                   ("<region>", region_features, "region feature")):
            if token == "<region>" and feats is None:
                continue  # without regions a <region> token keeps its vocabulary embedding (official)
            tid = self.special_ids.get(token)
            n_slots = 0 if tid is None else int((input_ids == tid).sum())
            n_feats = 0 if feats is None else feats.shape[0]
            if n_slots != n_feats:
                raise ValueError(f"prompt has {n_slots} {token} positions but {n_feats} {what} rows were given")
            if n_feats:
                embeds = embeds.clone()
                embeds[input_ids == tid] = feats.to(embeds.dtype)
        return embeds

    def query_table(self, table: str) -> torch.Tensor:
        """The learned query rows of one table (`RouteSpec.table`) -> [K, llm_hidden]."""
        name = table_param_name(table)
        if name not in self.query_table_names:
            raise ValueError(f"this model has no query table {table!r}; tables: {', '.join(self.query_table_names)}")
        return self.get_submodule(name).weight

    def query_embeddings(self, route: str) -> torch.Tensor:
        """The K query rows fed after `route`'s token -> [K, llm_hidden]."""
        return self.query_table(get_route(route).table)

    def run_decoder(self, route: str, payloads: list, images: list, **opts) -> list:
        """Run one task decoder on a batch of requests (see `DecoderSet.run_decoder`):
        payloads[r] = request r's payload groups [K, llm_hidden] for `route`, images[r] its image."""
        if self.decoders is None:
            raise RuntimeError(f"this model has no task decoders; cannot run {route}")
        return self.decoders.run_decoder(route, payloads, images, **opts)


def build_model(cfg: ModelConfig, seed: int = 0, with_decoders: bool = True,
                dtype: torch.dtype = torch.float32, device: Optional[torch.device | str] = None) -> VisionLLM:
    """A model with random weights drawn from `seed` (normal, std 0.02; norms at 1)."""
    fork_devices = [] if device is None or str(device) == "cpu" else None
    with torch.random.fork_rng(devices=fork_devices or []):
        torch.manual_seed(seed)
        model = VisionLLM(cfg, with_decoders=with_decoders)
        # re-seed: the weights below must not depend on how much randomness the decoders' constructors drew
        torch.manual_seed(seed)
        for name, p in model.named_parameters():
            if name.startswith("decoders."):
                continue
            if p.dim() == 1 and ("norm" in name or "layrnorm" in name or "layer_norm" in name):
                if name.endswith("weight"):
                    nn.init.ones_(p)
                else:
                    nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=0.02)
        for m in model.modules():
            if isinstance(m, LayerNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return model.to(device=device, dtype=dtype).eval()
