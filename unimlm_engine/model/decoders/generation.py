"""[GEN] / [EDIT] decoders: super-link payload -> prompt_embeds -> diffusers pipeline.

The K payload vectors ([K, llm_hidden], K = 64 in the real model) go through `emb_proj`
(Linear -> GELU -> Linear, width mapper_dim = 768) and a small `torch.nn.Transformer`
(pre-norm, no dropout, FFN 4 * mapper_dim): the projected payload is the encoder input
and 77 learned queries are the decoder input, so the output is `prompt_embeds`
[B, 77, mapper_dim], the shape CLIP's text encoder gives Stable Diffusion.

Parameter names are the official VisionLLM v2 checkpoint's (its `sd.*` / `ip2p.*` modules,
model/stable_diffusion/modeling_sd.py and model/instruct_pix2pix/modeling_instruct_pix2pix.py):
  emb_proj.{0,2}.{weight,bias}
  llm2sd_mapper_queries                      [1, 77, mapper_dim]
  llm2sd_mapper.{encoder,decoder}.*          torch.nn.Transformer keys
`GenConfig.mapper_layers` is the number of encoder layers and of decoder layers each
(the official model uses 1 and 1). The official checkpoint also stores the whole diffusers
pipeline under `sd_unet.*`, `sd_vae.*`, `sd_text_encoder.*`. The pipeline itself (its
configs, scheduler, tokenizer) comes from a local diffusers directory (`GenConfig.pipeline_dir`,
the official `sd_model_id`) and is not part of `state_dict()`. Which stored weights matter:
  sd.*    UNet, VAE and text encoder are frozen in the official training (`requires_grad_(False)`),
          so the stored copies equal the base pipeline's: not loaded (reported as skipped).
  ip2p.*  the UNet is TRAINED (its `requires_grad_(False)` is commented out): `ip2p.sd_unet.*` is
          loaded into the pipeline's UNet (`component_keys`, staged until the pipeline is attached);
          VAE and text encoder are frozen: skipped.

Classifier-free guidance needs an unconditional embedding. We use what the official
training used for its dropped condition: the CLIP text encoding of the empty prompt
"", padded to 77 tokens, when the pipeline directory has a text encoder and tokenizer;
without them (the tiny test pipelines) we use zeros. It is computed once per pipeline.

`build_tiny_pipeline` writes a random tiny SD / InstructPix2Pix pipeline (no text
encoder, no tokenizer, no safety checker) that runs on a CPU in well under a second.
Only the CPU path has been run; the same code runs on a GPU when the module is moved
there, which has not been tested.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn
from PIL import Image

from ...config.decoders import GenConfig
from ...routes import RouteSpec
from .base import DecoderInput, TaskDecoder, TensorForward
from .results import GenerationResult

GEN_OPTIONS = ("num_inference_steps", "guidance_scale", "image_guidance_scale", "height", "width")
_NULL_COMPONENTS = ("text_encoder", "tokenizer", "safety_checker", "feature_extractor", "image_encoder")


class GenerationDecoder(TaskDecoder):
    """emb_proj + transformer mapper, and the diffusers pipeline it conditions.

    edit=False: StableDiffusionPipeline ([GEN]); edit=True: InstructPix2Pix ([EDIT]). Registered as
    `SDDecoder` ("sd") and `IP2PDecoder` ("ip2p") below.
    """

    # the official checkpoint also stores the diffusers pipeline; frozen parts come from pipeline_dir
    unserved_keys = ("sd_unet.", "sd_vae.", "sd_text_encoder.")

    def __init__(self, cfg: GenConfig, edit: bool = False) -> None:
        super().__init__()
        if not isinstance(cfg, GenConfig):
            raise ValueError(f"GenerationDecoder: cfg must be a GenConfig, got {type(cfg).__name__}")
        self.cfg, self.edit = cfg, edit
        d = cfg.mapper_dim
        self.emb_proj = nn.Sequential(nn.Linear(cfg.llm_hidden_size, d), nn.GELU(), nn.Linear(d, d))
        self.llm2sd_mapper_queries = nn.Parameter(torch.randn(1, cfg.num_prompt_tokens, d))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")
            self.llm2sd_mapper = nn.Transformer(d_model=d, nhead=cfg.mapper_heads, num_encoder_layers=cfg.mapper_layers,
                                                num_decoder_layers=cfg.mapper_layers, dim_feedforward=4 * d,
                                                dropout=0.0, batch_first=True, norm_first=True)
        self._pipeline = None
        self._negative: Optional[torch.Tensor] = None
        self._staged: dict[str, dict[str, torch.Tensor]] = {}  # component -> checkpoint weights not applied yet
        self._pipeline_error: Optional[Exception] = None

    @property
    def route(self) -> str:
        return "[EDIT]" if self.edit else "[GEN]"

    def run(self, route: RouteSpec, inputs: list[DecoderInput], options: Mapping[str, Any],
            tensor_forward: Optional[TensorForward] = None) -> list[GenerationResult]:
        """Each group of a request is one image; group j of input r is drawn with seed inputs[r].seed + j.
        options: GEN_OPTIONS (image_guidance_scale only for an edit pipeline)."""
        unknown = set(options) - set(GEN_OPTIONS)
        if unknown:
            raise ValueError(f"route {route.token}: unknown options {sorted(unknown)}")
        flat = [(r, j) for r, inp in enumerate(inputs) for j in range(len(inp.payloads))]
        stacked = torch.stack([inputs[r].payloads[j] for r, j in flat])
        seeds = [inputs[r].seed + j for r, j in flat]
        kw = {k: options[k] for k in GEN_OPTIONS if k in options}
        if not self.edit:
            kw.pop("image_guidance_scale", None)
        images = [inputs[r].image for r, _ in flat] if self.edit else None
        out = self.generate(stacked, seeds, images=images, **kw)
        results = [GenerationResult(route=route.token, num_inference_steps=kw.get("num_inference_steps", 20),
                                    guidance_scale=kw.get("guidance_scale", 7.5)) for _ in inputs]
        for (r, _), im, seed in zip(flat, out, seeds):
            results[r].images.append(im)
            results[r].seeds.append(seed)
        return results

    def check_payload(self, payload: torch.Tensor) -> None:
        """payload: [K, llm_hidden] (one group) or [B, K, llm_hidden]; raises ValueError."""
        c = self.cfg
        if not isinstance(payload, torch.Tensor) or payload.dim() not in (2, 3):
            raise ValueError(f"{self.route}: payload must be a [K, hidden] or [B, K, hidden] tensor")
        k, h = payload.shape[-2:]
        if h != c.llm_hidden_size:
            raise ValueError(f"{self.route}: payload width {h} != llm_hidden_size {c.llm_hidden_size}")
        if k != c.num_embs:
            raise ValueError(f"{self.route}: payload has {k} query vectors, expected num_embs={c.num_embs}")
        if not payload.is_floating_point():
            raise ValueError(f"{self.route}: payload must be floating point, got {payload.dtype}")

    def forward(self, payload: torch.Tensor) -> torch.Tensor:
        """payload: [B, K, llm_hidden] -> prompt_embeds: [B, num_prompt_tokens, mapper_dim]."""
        self.check_payload(payload)
        if payload.dim() == 2:
            payload = payload.unsqueeze(0)
        w = self.emb_proj[0].weight
        src = self.emb_proj(payload.to(device=w.device, dtype=w.dtype))
        tgt = self.llm2sd_mapper_queries.expand(src.shape[0], -1, -1)
        return self.llm2sd_mapper(src=src, tgt=tgt)

    # ---- diffusers pipeline ------------------------------------------------
    @property
    def pipeline(self):
        if self._pipeline is None:
            if self._pipeline_error is not None:  # a pipeline that failed to load fails fast, not reloaded per call
                raise self._pipeline_error
            try:
                self.load_pipeline()
            except (ValueError, OSError) as e:
                self._pipeline_error = e
                raise
        return self._pipeline

    def load_pipeline(self, path: Optional[str] = None, dtype: Optional[torch.dtype] = None):
        """Load the pipeline from a local diffusers directory (path, else cfg.pipeline_dir) onto the
        mapper's device; dtype: `dtype`, else the mapper's dtype on CUDA and float32 elsewhere."""
        w = self.emb_proj[0].weight
        if dtype is None:
            dtype = w.dtype if w.device.type == "cuda" else torch.float32
        pipe = load_local_pipeline(path or self.cfg.pipeline_dir, edit=self.edit, dtype=dtype)
        self.set_pipeline(pipe.to(w.device))
        return self._pipeline

    def set_pipeline(self, pipeline) -> None:
        """Use an already constructed diffusers pipeline (must match edit / cross-attention width). Component
        weights staged from a checkpoint (`load_component_weights`) are copied into it first."""
        _check_pipeline(pipeline, self.edit, self.cfg.mapper_dim)
        for component, state in list(self._staged.items()):
            _load_strict(getattr(pipeline, component), state, f"{self.name}.sd_{component}")
            del self._staged[component]
        self._pipeline, self._negative, self._pipeline_error = pipeline, None, None

    def load_component_weights(self, component: str, state: dict[str, torch.Tensor]) -> None:
        if component not in self.component_keys.values():
            super().load_component_weights(component, state)
        if self._pipeline is not None:
            _load_strict(getattr(self._pipeline, component), state, f"{self.name}.sd_{component}")
        else:
            self._staged[component] = state

    @property
    def staged_components(self) -> tuple[str, ...]:
        """Components whose checkpoint weights wait for the pipeline (applied by set_pipeline)."""
        return tuple(self._staged)

    @torch.no_grad()
    def negative_prompt_embeds(self) -> torch.Tensor:
        """-> [1, num_prompt_tokens, mapper_dim]: encoded "" with a text encoder, else zeros."""
        if self._negative is None:
            pipe, c = self.pipeline, self.cfg
            if pipe.text_encoder is not None and pipe.tokenizer is not None:
                ids = pipe.tokenizer("", padding="max_length", max_length=c.num_prompt_tokens, truncation=True,
                                     return_tensors="pt").input_ids
                neg = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]
                if neg.shape[-1] != c.mapper_dim:
                    raise ValueError(f"{self.route}: text encoder width {neg.shape[-1]} != mapper_dim {c.mapper_dim}")
            else:
                neg = torch.zeros(1, c.num_prompt_tokens, c.mapper_dim)
            self._negative = neg
        return self._negative

    @torch.no_grad()
    def generate(self, payload: torch.Tensor, seeds: Sequence[int], images: Optional[Sequence[Image.Image]] = None,
                 num_inference_steps: int = 20, guidance_scale: float = 7.5, image_guidance_scale: float = 1.5,
                 height: Optional[int] = None, width: Optional[int] = None) -> list[Image.Image]:
        """payload: [B, K, llm_hidden]; seeds: B ints; images: B PIL images ([EDIT] only) -> B PIL images.

        Image i depends only on payload i, seeds[i] (and images[i]): each item gets its own
        CPU torch.Generator. [EDIT] batches items whose input images share a size.
        """
        self.check_payload(payload)
        payload = payload if payload.dim() == 3 else payload.unsqueeze(0)
        b = payload.shape[0]
        if len(seeds) != b:
            raise ValueError(f"{self.route}: {len(seeds)} seeds for {b} payloads")
        if num_inference_steps < 1:
            raise ValueError(f"{self.route}: num_inference_steps must be >= 1, got {num_inference_steps}")
        pipe = self.pipeline
        dtype, device = pipe.unet.dtype, pipe.unet.device
        prompt = self(payload).to(device=device, dtype=dtype)
        neg = self.negative_prompt_embeds().to(device=device, dtype=dtype).expand(b, -1, -1)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        common = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, output_type="pil")
        if not self.edit:
            return pipe(prompt_embeds=prompt, negative_prompt_embeds=neg, generator=gens, height=height, width=width,
                         **common).images
        if images is None or len(images) != b:
            raise ValueError(f"[EDIT]: needs one input image per payload, got {0 if images is None else len(images)}")
        if not all(isinstance(im, Image.Image) and im.width > 0 and im.height > 0 for im in images):
            raise ValueError("[EDIT]: input images must be non-empty PIL images")
        out: list[Optional[Image.Image]] = [None] * b
        for idx in _group_by_size(images):
            res = pipe(prompt_embeds=prompt[idx], negative_prompt_embeds=neg[idx], image=[images[i] for i in idx],
                       generator=[gens[i] for i in idx], image_guidance_scale=image_guidance_scale, **common).images
            for i, im in zip(idx, res):
                out[i] = im
        return out


@contextlib.contextmanager
def _quiet_diffusers():
    """Silence diffusers' per-component notes ("text_encoder=None cannot be saved") and load bars."""
    from diffusers.utils import logging as dlog

    old, bars_on = dlog.get_verbosity(), dlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(old)
        if bars_on:
            dlog.enable_progress_bar()


def _group_by_size(images: Sequence[Image.Image]) -> list[list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.size, []).append(i)
    return list(groups.values())


def _pipeline_class(edit: bool):
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline

    return StableDiffusionInstructPix2PixPipeline if edit else StableDiffusionPipeline


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy checkpoint weights into a pipeline component; ValueError naming the first keys on a mismatch."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or bad:
        parts = [f"{len(keys)} {kind}, first: {', '.join(sorted(keys)[:3])}"
                 for kind, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", bad)) if keys]
        raise ValueError(f"{what}: checkpoint weights do not fit the pipeline's {type(module).__name__} "
                         f"({'; '.join(parts)})")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))


def _check_pipeline(pipe, edit: bool, mapper_dim: int) -> None:
    want = 8 if edit else 4
    if pipe.unet.config.in_channels != want:
        raise ValueError(f"pipeline UNet has {pipe.unet.config.in_channels} input channels, "
                         f"{'[EDIT]' if edit else '[GEN]'} needs {want}")
    if pipe.unet.config.cross_attention_dim != mapper_dim:
        raise ValueError(f"pipeline UNet cross_attention_dim {pipe.unet.config.cross_attention_dim} "
                         f"!= mapper_dim {mapper_dim}")


def load_local_pipeline(path: str, edit: bool = False, dtype: Optional[torch.dtype] = None):
    """Load a StableDiffusion(InstructPix2Pix)Pipeline from a local diffusers directory; never downloads.

    Components the directory lists as null (text encoder, tokenizer, ...) are passed as
    None; the safety checker is never loaded (the official model runs without one).
    """
    if not path:
        raise ValueError("generation pipeline: no pipeline_dir configured (GenConfig.pipeline_dir or a path)")
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"generation pipeline: {path!r} is not a diffusers directory (no model_index.json)")
    with open(index, encoding="utf-8") as f:
        entries = json.load(f)
    skip = {n: None for n in _NULL_COMPONENTS
            if n == "safety_checker" or not isinstance(entries.get(n), list) or entries[n][0] is None
            or not os.path.isdir(os.path.join(path, n))}
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with _quiet_diffusers():
        pipe = _pipeline_class(edit).from_pretrained(path, local_files_only=True, requires_safety_checker=False,
                                                     **skip, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pipeline(path: str, cross_attention_dim: int = 32, seed: int = 0, edit: bool = False,
                        image_size: int = 32):
    """Write a random tiny diffusers pipeline to `path` and return it.

    UNet2DConditionModel (2 levels, 16/32 channels; 8 input channels when edit) and
    AutoencoderKL (4 levels: latents are image / 8 as in SD, so the UNet's attention stays
    small for big [EDIT] inputs), SD-1.5-style DDIM scheduler for
    both (a deterministic sampler: the seed only draws the initial latents). No text encoder / tokenizer:
    the decoders always pass prompt_embeds. Weights depend only on `seed`.
    """
    if image_size < 8 or image_size % 8:
        raise ValueError(f"build_tiny_pipeline: image_size must be a positive multiple of 8, got {image_size}")
    if cross_attention_dim <= 0 or cross_attention_dim % 4:
        raise ValueError(f"build_tiny_pipeline: cross_attention_dim must be a positive multiple of 4")
    unet, vae, scheduler = tiny_diffusion_parts(seed, 8 if edit else 4, cross_attention_dim, image_size)
    pipe = _pipeline_class(edit)(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    os.makedirs(path, exist_ok=True)
    with _quiet_diffusers():
        pipe.save_pretrained(path, safe_serialization=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_diffusion_parts(seed: int, in_channels: int, cross_attention_dim: int, image_size: int,
                         attention_type: str = "default"):
    """-> (unet, vae, scheduler) of a random tiny SD-style pipeline (build_tiny_pipeline); weights depend
    only on `seed`. attention_type="gated" gives the GLIGEN UNet (its box/phrase projection included)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=image_size // 8, in_channels=in_channels, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
            attention_head_dim=4, norm_num_groups=8, attention_type=attention_type)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                            layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=image_size)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return unet, vae, scheduler


class SDDecoder(GenerationDecoder):
    """[GEN]: the official `sd.*` mapper + a Stable Diffusion pipeline."""

    name = "sd"

    def __init__(self, cfg: GenConfig) -> None:
        super().__init__(cfg, edit=False)

    @classmethod
    def from_model_config(cls, cfg) -> Optional["SDDecoder"]:
        return cls(cfg.gen) if cfg.gen is not None else None


class IP2PDecoder(GenerationDecoder):
    """[EDIT]: the official `ip2p.*` mapper + an InstructPix2Pix pipeline whose UNet is the checkpoint's."""

    name = "ip2p"
    unserved_keys = ("sd_vae.", "sd_text_encoder.")
    component_keys = {"sd_unet.": "unet"}

    def __init__(self, cfg: GenConfig) -> None:
        super().__init__(cfg, edit=True)

    @classmethod
    def from_model_config(cls, cfg) -> Optional["IP2PDecoder"]:
        return cls(cfg.edit) if cfg.edit is not None else None
