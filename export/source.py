"""The decoder an export is made from: the detector (`gdino`) the engine serves for `--model M` (the only
decoder with an export path; UniPose, the [POSE] decoder, has none).

- a shipped preset (`tiny`, the trained shapes model): its checkpoint directory in the package, as below;
- another preset name: the engine's `load_pretrained(M)` builds the whole model with `build_model(get_preset(M),
  seed=TINY_SEED)` (every weight drawn from one seeded stream, so the decoder's weights depend on the modules
  built before it); this does the same build on the CPU in fp32 and takes the decoder (no tokenizer, no
  diffusers pipelines: they draw no weights the decoder uses);
- a checkpoint directory: only the decoder is loaded. `config.json` gives its config; the weights are the
  keys under the decoder's prefix (`gdino.`, as `checkpoint.loader` maps them into
  `model.decoders`), read from the shards the index lists for them (safetensors: only those tensors), cast
  to fp32 like `load_checkpoint` on the CPU, loaded strictly (a missing or unexpected key raises
  CheckpointError).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .wrappers import check_kind

PREFIX = "gdino"


def model_config(model: str | os.PathLike):
    """ModelConfig of a preset or checkpoint directory (ValueError for anything else)."""
    from unimlm_engine.checkpoint.loader import read_config
    from unimlm_engine.config.presets import PRESETS, get_preset

    name = str(model)
    if name in PRESETS:
        return get_preset(name)
    if not Path(name).is_dir():
        raise ValueError(f"--model {name}: neither a preset ({', '.join(sorted(PRESETS))}) nor a checkpoint "
                         f"directory")
    return read_config(Path(name))


def _decoder_config(kind: str, cfg, model) -> object:
    check_kind(kind)
    if cfg.detector is None:
        raise ValueError(f"--model {model}: its config has no detector decoder ({PREFIX})")
    return cfg.detector


def _prefixed_state(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """{key without prefix: tensor} for every checkpoint key under `prefix`."""
    from unimlm_engine.checkpoint.loader import find_shards, read_shard

    shards = find_shards(path)
    index = next((path / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (path / n).is_file()), None)
    if index is not None:
        wanted = {f for k, f in json.loads(index.read_text())["weight_map"].items() if k.startswith(prefix)}
        shards = [s for s in shards if s.name in wanted]
    out = {}
    for shard in shards:
        if shard.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(shard), framework="pt") as f:
                out.update({k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
        else:
            out.update({k[len(prefix):]: v for k, v in read_shard(shard).items() if k.startswith(prefix)})
    return out


def load_decoder(kind: str, model: str | os.PathLike) -> torch.nn.Module:
    """kind: "detector"; model: preset name or checkpoint directory -> the decoder in eval mode,
    fp32 on the CPU, with the weights the engine serves for `model`."""
    from unimlm_engine.checkpoint.loader import CheckpointError
    from unimlm_engine.config.presets import PRESETS, SHIPPED, TINY_SEED
    from unimlm_engine.model import build_model

    cfg = model_config(model)
    sub = _decoder_config(kind, cfg, model)
    if str(model) in SHIPPED:  # a preset whose weights ship with the package: its checkpoint directory
        model = SHIPPED[str(model)]()
    elif str(model) in PRESETS:
        full = build_model(cfg, seed=TINY_SEED, dtype=torch.float32, device="cpu")
        return getattr(full.decoders, PREFIX).eval()
    from unimlm_engine.model.decoders.detector import DetectorDecoder

    decoder = DetectorDecoder(sub)
    prefix = PREFIX + "."
    state = _prefixed_state(Path(model), prefix)
    own = decoder.state_dict()
    for k, v in state.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{model}: shape mismatch for {prefix}{k}: checkpoint {tuple(v.shape)}, model "
                                  f"{tuple(own[k].shape)}")
    # the module's own load_state_dict: the detector's pre-hook accepts its tied heads written once or twice
    res = decoder.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise CheckpointError(f"{model}: {prefix}* weights do not match the {kind} decoder of config.json: "
                              f"missing {sorted(res.missing_keys)[:8]}, unexpected {sorted(res.unexpected_keys)[:8]}")
    return decoder.eval()
