"""The span-route experts (UnifiedMLLM): TaskDecoders prompted by a task span's text and its boxes.

  sd_text         <IMGGEN>                 diffusers StableDiffusionPipeline (text-to-image)
  ip2p_text       <IMGEDIT>                diffusers StableDiffusionInstructPix2PixPipeline (global edit)
  gligen          <LAYOUTGEN> + <BOX>...   diffusers StableDiffusionGLIGENPipeline (layout generation)
  gligen_inpaint  <IMGEDIT> + <BOX>...     the GLIGEN pipeline with inpainting weights (edit inside the boxes)
  sam             <IMGSEG> + <BOX>...      transformers SamModel + SamProcessor, one mask per box
  boxes           <BOX>... on their own    no model: the boxes in image pixels

Which task tokens reach which expert is the span-route registry's (routes.SpanRouteSpec). Experts come
from local directories (ExpertConfig.*_dir; nothing downloads) or, with ExpertConfig.tiny, are built in
code (experts_tiny.py). They load on first use, onto the device of the model's parameters they are given
(`to()`), in float32 on a CPU and the model's dtype on CUDA; only the CPU path has been run.

Batching: text-to-image and InstructPix2Pix run a whole batch in one pipeline call (InstructPix2Pix per
input size); GLIGEN takes one box layout per call, so a batch runs request by request; SAM runs the
requests with the same number of boxes together. Image i always depends only on its own request and seed.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from PIL import Image

from ...config.decoders import ExpertConfig
from .base import DecoderInput, TaskDecoder, TensorForward
from .results import GenerationResult

_GLOBAL_LOCK = threading.Lock()  # expert loads (fork and seed torch's global RNG) and global-RNG users
IMAGE_OPTIONS = ("num_inference_steps", "guidance_scale", "image_guidance_scale", "height", "width",
                 "gligen_scheduled_sampling_beta")


@dataclass
class GroundedResult:
    """What <IMGSEG> / <BOX> spans return: one row per box, in span order.
    boxes [n, 4] xyxy input-image pixels; scores [n] (SAM's predicted IoU; 1 for plain boxes);
    labels [n] = box index; phrases: the boxes' labels; masks [n, H, W] bool (SAM) or None."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    phrases: list[str] = field(default_factory=list)
    masks: Optional[torch.Tensor] = None


def boxes_in_pixels(boxes, width: int, height: int) -> torch.Tensor:
    """Normalised [x1, y1, x2, y2] rows -> [n, 4] float32 pixels of a width x height image."""
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale


class ExpertDecoder(TaskDecoder):
    """Base of the span experts: `expert` names the ExpertConfig directory; `_load` builds the model."""

    expert = ""
    tiny_seed = 4321

    def __init__(self, cfg: ExpertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._model = None
        self.register_buffer("_device_probe", torch.zeros(0), persistent=False)

    @classmethod
    def from_model_config(cls, cfg) -> Optional["ExpertDecoder"]:
        ex = getattr(cfg, "experts", None)
        if ex is None or not (ex.tiny or ex.directory(cls.expert)):
            return None
        return cls(ex)

    @property
    def model(self):
        """The expert's model, loaded on first use (one load at a time: the decoder workers are threads and
        diffusers' lazy imports are not thread-safe)."""
        if self._model is None:
            with _GLOBAL_LOCK:
                if self._model is None:
                    dev = self._device_probe.device
                    dtype = torch.float32 if dev.type != "cuda" else self._device_probe.dtype
                    self._model = self._load(dev, dtype)
        return self._model

    def _load(self, device, dtype):
        raise NotImplementedError

    def _options(self, route, options: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(options) - set(IMAGE_OPTIONS) - {"clip_masks_to_boxes"}
        if unknown:
            raise ValueError(f"span route {route.name}: unknown options {sorted(unknown)}")
        c = self.cfg
        return {"num_inference_steps": c.num_inference_steps, "guidance_scale": c.guidance_scale, **options}


class _PipelineExpert(ExpertDecoder):
    """A diffusers pipeline expert; `_call` runs one pipeline call."""

    def _load(self, device, dtype):
        from .generation import _quiet_diffusers

        if self.cfg.tiny:
            from .experts_tiny import tiny_expert_pipeline

            pipe = tiny_expert_pipeline(self.expert, self.tiny_seed)
        else:
            cls = self.pipeline_class()
            with _quiet_diffusers():
                pipe = cls.from_pretrained(self.cfg.directory(self.expert), local_files_only=True, safety_checker=None,
                                           requires_safety_checker=False, torch_dtype=dtype)
            pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    @staticmethod
    def _generators(inputs: list[DecoderInput]) -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(int(inp.seed)) for inp in inputs]

    def _size(self, kw: dict) -> dict:
        side = self.model.vae.config.sample_size if self.cfg.tiny else self.cfg.image_size
        return {"height": kw.pop("height", side), "width": kw.pop("width", side)}

    @staticmethod
    def _results(route, inputs, images, kw) -> list[GenerationResult]:
        return [GenerationResult(route=route.name, images=[im], seeds=[int(inp.seed)],
                                 num_inference_steps=kw["num_inference_steps"], guidance_scale=kw["guidance_scale"])
                for inp, im in zip(inputs, images)]


class TextToImageExpert(_PipelineExpert):
    name, expert = "sd_text", "sd"

    @staticmethod
    def pipeline_class():
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def run(self, route, inputs: list[DecoderInput], options, tensor_forward: Optional[TensorForward] = None):
        kw = self._options(route, options)
        kw.pop("image_guidance_scale", None), kw.pop("gligen_scheduled_sampling_beta", None)
        size = self._size(kw)
        images = self.model(prompt=[inp.text for inp in inputs], generator=self._generators(inputs), output_type="pil",
                            **size, **kw).images
        return self._results(route, inputs, images, kw)


class InstructPix2PixExpert(_PipelineExpert):
    name, expert = "ip2p_text", "ip2p"

    @staticmethod
    def pipeline_class():
        from diffusers import StableDiffusionInstructPix2PixPipeline

        return StableDiffusionInstructPix2PixPipeline

    def run(self, route, inputs: list[DecoderInput], options, tensor_forward: Optional[TensorForward] = None):
        kw = self._options(route, options)
        for k in ("height", "width", "gligen_scheduled_sampling_beta"):
            kw.pop(k, None)
        kw.setdefault("image_guidance_scale", self.cfg.image_guidance_scale)
        gens = self._generators(inputs)
        out: list[Optional[Image.Image]] = [None] * len(inputs)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, inp in enumerate(inputs):
            by_size.setdefault(inp.image.size, []).append(i)
        for idx in by_size.values():
            res = self.model(prompt=[inputs[i].text for i in idx], image=[inputs[i].image for i in idx],
                             generator=[gens[i] for i in idx], output_type="pil", **kw).images
            for i, im in zip(idx, res):
                out[i] = im
        return self._results(route, inputs, out, kw)


class GLIGENExpert(_PipelineExpert):
    """Layout generation: the span text is the caption, each box a grounded phrase."""

    name, expert = "gligen", "gligen"

    @staticmethod
    def pipeline_class():
        from diffusers import StableDiffusionGLIGENPipeline

        return StableDiffusionGLIGENPipeline

    def _one(self, inp: DecoderInput, gen, kw: dict) -> Image.Image:
        return self.model(prompt=inp.text, gligen_phrases=[p or inp.text for p in inp.phrases],
                          gligen_boxes=[list(b) for b in inp.boxes], generator=gen, output_type="pil", **kw).images[0]

    def run(self, route, inputs: list[DecoderInput], options, tensor_forward: Optional[TensorForward] = None):
        kw = self._options(route, options)
        kw.pop("image_guidance_scale", None)
        kw.update(self._size(kw))
        images = [self._one(inp, g, kw) for inp, g in zip(inputs, self._generators(inputs))]
        return self._results(route, inputs, images, kw)


class GLIGENInpaintExpert(GLIGENExpert):
    """Box-scoped editing: GLIGEN inpainting regenerates the boxes of the input image from the span text
    and the box phrases. The pipeline works on a square of vae.sample_size; the input is resized to it (not
    cropped, so normalised boxes keep their place) and the result resized back to the input's size.
    diffusers draws this pipeline's inpainting noise from torch's global RNG (not the generator), so the
    call runs under a forked global RNG seeded with the request's seed, holding the lock expert loads take
    (they seed the global RNG too); deterministic unless code outside the experts draws from the global
    RNG at the same moment."""

    name, expert = "gligen_inpaint", "gligen_inpaint"

    def run(self, route, inputs: list[DecoderInput], options, tensor_forward: Optional[TensorForward] = None):
        kw = self._options(route, options)
        for k in ("image_guidance_scale", "height", "width"):
            kw.pop(k, None)
        side = self.model.vae.config.sample_size
        images = []
        for inp, gen in zip(inputs, self._generators(inputs)):
            square = inp.image.resize((side, side), Image.BICUBIC)
            # the pipeline draws the inpainting noise from the global RNG: seed it per request
            dev = self.model.unet.device
            with _GLOBAL_LOCK, torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                torch.manual_seed(int(inp.seed))
                out = self.model(prompt=inp.text, gligen_phrases=[p or inp.text for p in inp.phrases],
                                 gligen_boxes=[list(b) for b in inp.boxes], gligen_inpaint_image=square,
                                 generator=gen, height=side, width=side, output_type="pil", **kw).images[0]
            images.append(out.resize(inp.image.size, Image.BICUBIC))
        return self._results(route, inputs, images, kw)


class SAMExpert(ExpertDecoder):
    """One mask per box: SAM prompted by the box in input-image pixels (multimask_output=False), masks
    post-processed by SamProcessor to the input size; with clip_masks_to_boxes (default) each mask keeps
    only the pixels inside its box (the box is the span's statement of where the object is)."""

    name, expert = "sam", "sam"

    def _load(self, device, dtype):
        if self.cfg.tiny:
            from .experts_tiny import tiny_sam

            model, proc = tiny_sam(self.tiny_seed)
        else:
            from transformers import SamModel, SamProcessor

            path = self.cfg.directory("sam")
            model = SamModel.from_pretrained(path, local_files_only=True, torch_dtype=dtype).eval()
            proc = SamProcessor.from_pretrained(path, local_files_only=True)
        return model.to(device), proc

    def run(self, route, inputs: list[DecoderInput], options, tensor_forward: Optional[TensorForward] = None):
        unknown = set(options) - {"clip_masks_to_boxes"}
        if unknown:
            raise ValueError(f"span route {route.name}: unknown options {sorted(unknown)}")
        clip = options.get("clip_masks_to_boxes", self.cfg.clip_masks_to_boxes)
        out: list[Optional[GroundedResult]] = [None] * len(inputs)
        by_count: dict[int, list[int]] = {}
        for i, inp in enumerate(inputs):
            by_count.setdefault(len(inp.boxes), []).append(i)
        for idx in by_count.values():
            for i, res in zip(idx, self.segment([inputs[i] for i in idx], clip)):
                out[i] = res
        return out

    @torch.no_grad()
    def segment(self, inputs: list[DecoderInput], clip: bool) -> list[GroundedResult]:
        """Requests with the same number of boxes -> one SAM call."""
        model, proc = self.model
        px = [boxes_in_pixels(inp.boxes, *inp.image.size) for inp in inputs]
        enc = proc(images=[inp.image for inp in inputs], input_boxes=[p.tolist() for p in px], return_tensors="pt")
        dev = next(model.parameters()).device
        enc = {k: (v.to(dev) if hasattr(v, "to") else v) for k, v in enc.items()}
        if enc["pixel_values"].is_floating_point():
            enc["pixel_values"] = enc["pixel_values"].to(next(model.parameters()).dtype)
        pred = model(**enc, multimask_output=False)
        masks = proc.image_processor.post_process_masks(pred.pred_masks.float().cpu(), enc["original_sizes"].cpu(),
                                                        enc["reshaped_input_sizes"].cpu())
        results = []
        for r, inp in enumerate(inputs):
            m = masks[r][:, 0].bool()  # [n, H, W]
            if clip:
                m = m & box_region(px[r], m.shape[-2], m.shape[-1])
            results.append(GroundedResult(px[r], pred.iou_scores[r, :, 0].float().cpu(), torch.arange(len(inp.boxes)),
                                          list(inp.phrases), m))
        return results


def box_region(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """boxes [n, 4] xyxy pixels -> [n, H, W] bool: pixel (y, x) whose centre lies inside the box."""
    ys = torch.arange(height, dtype=torch.float32).view(1, -1, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, -1) + 0.5
    b = boxes.view(-1, 4, 1, 1)
    return (xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys >= b[:, 1]) & (ys <= b[:, 3])


class BoxesExpert(ExpertDecoder):
    """Grounding spans on their own: the boxes in input-image pixels (no model)."""

    name = "boxes"

    @classmethod
    def from_model_config(cls, cfg) -> Optional["BoxesExpert"]:
        ex = getattr(cfg, "experts", None)
        return None if ex is None else cls(ex)

    def run(self, route, inputs: list[DecoderInput], options, tensor_forward: Optional[TensorForward] = None):
        if options:
            raise ValueError(f"span route {route.name}: takes no options, got {sorted(options)}")
        out = []
        for inp in inputs:
            px = boxes_in_pixels(inp.boxes, *inp.image.size)
            out.append(GroundedResult(px, torch.ones(len(px)), torch.arange(len(px)), list(inp.phrases)))
        return out

