"""Tiny random experts for the span routes, built in code (tests and the `tiny-unified` preset).

The span experts are prompted by text, so unlike the super-link pipelines (build_tiny_pipeline) these
have a text encoder and a tokenizer: a 2-layer CLIPTextModel (width 32) and a CLIPTokenizer whose
vocabulary is the 256 byte symbols (with and without the end-of-word mark) and no merges, so any text
tokenizes, one symbol a byte. UNets and VAEs are generation.py's tiny parts (GLIGEN: the gated UNet; its
inpainting variant takes 4 + 4 + 1 input channels). SAM: a SamModel with a 64 px image encoder and a
SamProcessor resizing to 64. Weights depend only on the seed; nothing downloads.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile

import torch

WIDTH = 32  # text encoder width = UNet cross-attention width
IMAGE_SIZE = 32
SAM_SIZE = 64


def _byte_symbols() -> list[str]:
    """One printable symbol per byte (the byte-level BPE convention: printable bytes stand for
    themselves, the others map to code points from 256 up)."""
    keep = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


@functools.lru_cache(maxsize=1)
def _tokenizer_dir() -> str:
    path = tempfile.mkdtemp(prefix="unimlm-tiny-clip-tokenizer-")
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return path


def tiny_text_encoder(seed: int):
    """-> (CLIPTokenizer, CLIPTextModel) of width WIDTH, 77 positions."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    d = _tokenizer_dir()
    tok = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), model_max_length=77)
    bos, eos = tok.convert_tokens_to_ids("<|startoftext|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                           projection_dim=WIDTH, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos))
    return tok, enc.eval()


def tiny_expert_pipeline(kind: str, seed: int):
    """kind: "sd" | "ip2p" | "gligen" | "gligen_inpaint" -> the diffusers pipeline, random tiny weights."""
    from diffusers import (StableDiffusionGLIGENPipeline, StableDiffusionInstructPix2PixPipeline,
                           StableDiffusionPipeline)

    from .generation import _quiet_diffusers, tiny_diffusion_parts

    spec = {"sd": (StableDiffusionPipeline, 4, "default"), "ip2p": (StableDiffusionInstructPix2PixPipeline, 8, "default"),
            "gligen": (StableDiffusionGLIGENPipeline, 4, "gated"),
            "gligen_inpaint": (StableDiffusionGLIGENPipeline, 9, "gated")}
    if kind not in spec:
        raise ValueError(f"tiny_expert_pipeline: unknown kind {kind!r}; kinds: {', '.join(spec)}")
    cls, channels, attention = spec[kind]
    unet, vae, scheduler = tiny_diffusion_parts(seed, channels, WIDTH, IMAGE_SIZE, attention_type=attention)
    tok, enc = tiny_text_encoder(seed + 1)
    with _quiet_diffusers():
        pipe = cls(vae=vae, text_encoder=enc, tokenizer=tok, unet=unet, scheduler=scheduler, safety_checker=None,
                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sam(seed: int):
    """-> (SamModel, SamProcessor): a 64 px image encoder (patch 8), 16-wide prompt encoder / mask decoder."""
    from transformers import SamConfig, SamModel, SamProcessor

    try:
        from transformers import SamImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers: one image processor class
        from transformers import SamImageProcessor as ImageProcessor
    cfg = SamConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SAM_SIZE, patch_size=8, output_channels=16, window_size=4, global_attn_indexes=[1],
                           num_pos_feats=8, mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=16, image_size=SAM_SIZE, patch_size=8, mask_input_channels=4,
                                   num_point_embeddings=4),
        mask_decoder_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                                 iou_head_hidden_dim=16))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SamModel(cfg).eval()
    proc = SamProcessor(ImageProcessor(size={"longest_edge": SAM_SIZE}, pad_size={"height": SAM_SIZE, "width": SAM_SIZE}))
    return model, proc
