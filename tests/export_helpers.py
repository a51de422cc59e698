"""A tiny checkpoint directory whose detector is its own (tests/conftest.py shares it and its ONNX export
across test files: one `unimlm export det` takes a minute or two on 2 cores)."""
import torch

from unimlm_engine.checkpoint.loader import convert_checkpoint, save_checkpoint
from unimlm_engine.config.presets import TINY_SEED, get_preset
from unimlm_engine.inputs.tokenizer import ByteTokenizer
from unimlm_engine.model import build_model


def tiny_with_own_detector():
    """The tiny model with its detector weights moved away from the preset's (so an export of the preset
    instead of the checkpoint would fail the comparison)."""
    model = build_model(get_preset("tiny-random"), seed=TINY_SEED)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.decoders.gdino.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def save_tiny(path, fmt):
    """fmt "bin": save_checkpoint's .bin shards; "safetensors": those converted by convert_checkpoint
    (save_checkpoint(fmt="safetensors") refuses the detector's shared bbox_embed tensors)."""
    bin_dir = save_checkpoint(tiny_with_own_detector(), path / "tiny-bin", ByteTokenizer())
    return bin_dir if fmt == "bin" else convert_checkpoint(bin_dir, path / "tiny-st", progress=False)
