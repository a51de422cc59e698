"""`load_pretrained(model)`: a preset name or a checkpoint directory -> (model, tokenizer).

A shipped preset (`tiny`: the trained shapes model) loads its checkpoint directory from the package; the other
presets get random weights from a fixed seed and the built-in byte tokenizer. The `tiny` and `tiny-random`
presets' generation decoders get tiny random diffusers pipelines, built in code once and
kept under $UNIMLM_CACHE (default ~/.cache/unimlm). Checkpoint directories load through
`loader.load_checkpoint`; a relative `pipeline_dir` of a generation decoder is resolved
against the checkpoint directory (the diffusers pipelines sit next to it; no download).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from .loader import load_checkpoint
from ..model import VisionLLM, build_model
from ..config.presets import PRESETS, SHIPPED, TINY_SEED, UnknownPresetError, get_preset
from ..inputs.tokenizer import ByteTokenizer, Tokenizer
from ..routes import span_tokens


def cache_dir() -> Path:
    return Path(os.environ.get("UNIMLM_CACHE", Path.home() / ".cache" / "unimlm"))


def _attach_tiny_pipelines(model: VisionLLM) -> None:
    from ..model.decoders import build_tiny_pipeline, load_local_pipeline

    d = model.decoders
    if d is None:
        return
    for name, edit in (("sd", False), ("ip2p", True)):
        dec = getattr(d, name, None)
        if dec is None:
            continue
        path = cache_dir() / f"tiny-{name}-pipeline-v2"
        if (path / "model_index.json").is_file():
            pipe = load_local_pipeline(str(path), edit=edit)
        else:
            pipe = build_tiny_pipeline(str(path), cross_attention_dim=dec.cfg.mapper_dim, seed=TINY_SEED, edit=edit)
        dec.set_pipeline(pipe)


def _resolve_pipeline_dirs(model: VisionLLM, ckpt: Path) -> None:
    for gen in (model.cfg.gen, model.cfg.edit):
        if gen is not None and gen.pipeline_dir and not os.path.isabs(gen.pipeline_dir):
            gen.pipeline_dir = str(ckpt / gen.pipeline_dir)
    ex = model.cfg.experts
    for name in ("sd", "ip2p", "gligen", "gligen_inpaint", "sam") if ex is not None else ():
        d = ex.directory(name)
        if d and not os.path.isabs(d):
            setattr(ex, f"{name}_dir", str(ckpt / d))


def load_pretrained(model: str | os.PathLike, device: Optional[str | torch.device] = None,
                    dtype: Optional[torch.dtype] = None) -> tuple[VisionLLM, Tokenizer]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = str(model)
    if name in SHIPPED:
        m, tok, _ = load_checkpoint(SHIPPED[name](), device=device, dtype=dtype)
        _attach_tiny_pipelines(m)
        return m, tok
    if name in PRESETS:
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        cfg = get_preset(name)
        m = build_model(cfg, seed=TINY_SEED, dtype=dtype, device=device)
        tok: Tokenizer = ByteTokenizer(extra_special=span_tokens() if cfg.experts is not None else ())
        m.special_ids = dict(tok.special_ids)
        if name == "tiny-random":
            _attach_tiny_pipelines(m)
        return m, tok
    path = Path(name)
    if not path.is_dir():
        raise UnknownPresetError(f"{name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a checkpoint "
                                 f"directory")
    m, tok, _ = load_checkpoint(path, device=device, dtype=dtype)
    _resolve_pipeline_dirs(m, path)
    return m, tok
