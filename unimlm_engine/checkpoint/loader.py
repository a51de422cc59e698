"""Checkpoint directories in the official VisionLLM v2 layout -> modules, and back.

Accepted layouts (first match wins):
  model.safetensors.index.json + model-*.safetensors   |  model.safetensors
  pytorch_model.bin.index.json + pytorch_model-*.bin   |  pytorch_model.bin
Pickle shards are read with `torch.load(weights_only=True)` only. Parameters keep their
official names; decoder weights (`gdino.` `unipose.` `sd.` `ip2p.`) load into
`model.decoders` when the model has that decoder, and are reported as not loaded
otherwise; so are `region_encoder.` keys (loaded when config.json has use_region_encoder).
The diffusers pipelines stored in the official checkpoint (`sd.sd_unet.*` ...) are skipped
and reported too: generation decoders load their pipeline from a local diffusers directory.
Every problem raises `CheckpointError` naming the file and the keys.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..config import ModelConfig

log = logging.getLogger("unimlm_engine")

# optional top-level modules: loaded when the model has them, else reported not loaded
UNSERVED_PREFIXES = ("region_encoder.",)


def _decoder_prefixes() -> tuple[tuple[str, ...], tuple[str, ...], dict[str, tuple[str, str]]]:
    """(every registered decoder's checkpoint prefix "gdino." ..., the keys of theirs this engine does not
    load: TaskDecoder.unserved_keys, e.g. the frozen diffusers weights the official sd./ip2p. store,
    full prefix -> (decoder, component) of TaskDecoder.component_keys: "ip2p.sd_unet." -> ("ip2p", "unet"))."""
    from ..model.decoders.base import decoder_classes

    classes = decoder_classes()
    return (tuple(f"{n}." for n in classes),
            tuple(f"{n}.{k}" for n, cls in classes.items() for k in cls.unserved_keys),
            {f"{n}.{k}": (n, c) for n, cls in classes.items() for k, c in cls.component_keys.items()})


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names files and keys."""


@dataclass
class LoadReport:
    loaded: int = 0
    not_loaded: dict[str, int] = field(default_factory=dict)  # prefix -> number of keys skipped
    files: list[str] = field(default_factory=list)
    # decoder components (TaskDecoder.component_keys) the checkpoint did not provide: "ip2p.unet"
    stock_components: list[str] = field(default_factory=list)


def decoder_classes_with_components() -> dict:
    from ..model.decoders.base import decoder_classes

    return {n: c for n, c in decoder_classes().items() if c.component_keys}


def _fmt_keys(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_config(path: Path) -> ModelConfig:
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json")
    try:
        return ModelConfig.from_official_dict(json.loads(f.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{f}: {e}") from None


def find_shards(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory, checked against the index if there is one."""
    for index_name, single, pattern in (("model.safetensors.index.json", "model.safetensors", "model*.safetensors"),
                                        ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin")):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid index file ({e!r})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard files listed in the index are missing: {', '.join(missing)}")
            return [path / f for f in files]
        if (path / single).is_file():
            return [path / single]
        found = sorted(path.glob(pattern))
        if found:
            return found
    raise CheckpointError(f"{path}: no weights found (expected model*.safetensors or pytorch_model*.bin)")


def read_shard(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(file))
        else:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # noqa: BLE001 - any failure here means a bad file; name it
        raise CheckpointError(f"{file}: cannot read shard, truncated or corrupt? ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{file}: not a state dict of tensors")
    return sd


def _target_key(key: str, model_keys: set[str], decoder_prefixes: tuple[str, ...]) -> Optional[str]:
    if key.startswith(decoder_prefixes):
        k = "decoders." + key
        return k if k in model_keys else None
    return key


def _skip_prefix(key: str) -> str:
    return key.split(".", 1)[0]


def _key_summary(kind: str, keys: set[str], first: int = 5) -> str:
    """'3 missing keys (gdino: 2, llm: 1), first: a, b, c'."""
    by_prefix: dict[str, int] = {}
    for k in keys:
        by_prefix[_skip_prefix(k)] = by_prefix.get(_skip_prefix(k), 0) + 1
    counts = ", ".join(f"{p}: {n}" for p, n in sorted(by_prefix.items()))
    return f"{len(keys)} {kind} keys ({counts}), first: {_fmt_keys(keys, first)}"


def load_state_into(model: torch.nn.Module, shards: list[Path], report: LoadReport) -> None:
    """Copy shard tensors into `model`; all problems raise CheckpointError. Missing and unexpected keys
    are reported together in one error (counts per top-level prefix and the first few names), after every
    shard was read; a decoder's component weights (TaskDecoder.component_keys) go to that decoder."""
    own = model.state_dict()
    model_keys = set(own)
    seen: set[str] = set()
    unexpected: dict[str, str] = {}
    decoders, unserved, components = _decoder_prefixes()
    staged: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    written: dict[tuple, str] = {}  # storage of a shared tensor -> the first checkpoint name written into it
    for file in shards:
        sd = read_shard(file)
        report.files.append(file.name)
        for key, tensor in sd.items():
            has_decoder = key.startswith(decoders) and any(
                k.startswith("decoders." + _skip_prefix(key) + ".") for k in model_keys)
            comp = next((c for p, c in components.items() if key.startswith(p)), None)
            if comp is not None and has_decoder:
                sub = next(p for p in components if key.startswith(p))
                staged.setdefault(comp, {})[key[len(sub):]] = tensor
                report.loaded += 1
                continue
            optional_absent = key.startswith(UNSERVED_PREFIXES) and not any(
                k.startswith(_skip_prefix(key) + ".") for k in model_keys)
            if optional_absent or key.startswith(unserved) or comp is not None or (
                    key.startswith(decoders) and not has_decoder):
                p = _skip_prefix(key)
                report.not_loaded[p] = report.not_loaded.get(p, 0) + 1
                continue
            target = _target_key(key, model_keys, decoders)
            if target is None or target not in model_keys:
                unexpected[key] = file.name
                continue
            dst = own[target]
            if tuple(tensor.shape) != tuple(dst.shape):
                raise CheckpointError(f"{file}: shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, model "
                                      f"{tuple(dst.shape)} (config.json does not match the weights?)")
            where = (dst.untyped_storage().data_ptr(), dst.storage_offset(), tuple(dst.shape))
            first = written.setdefault(where, key) if dst.numel() else key
            if first != key and not torch.equal(dst, tensor.to(dst.dtype)):
                raise CheckpointError(f"{file}: {key} and {first} are one tensor in the model (a module shared "
                                      f"under two names) but differ in the checkpoint")
            with torch.no_grad():
                dst.copy_(tensor.to(dst.dtype))
            seen.add(target)
            report.loaded += 1
    tied = {"llm.lm_head.weight"} if model.cfg.llm.tie_word_embeddings else set()
    tied |= _shared_with_loaded(own, model_keys - seen, seen)
    missing = {k[len("decoders."):] if k.startswith("decoders.") else k for k in model_keys - seen - tied}
    if missing or unexpected:
        parts = ([_key_summary("missing", missing)] if missing else []) + (
            [_key_summary("unexpected", set(unexpected))] if unexpected else [])
        files = ", ".join(sorted(set(unexpected.values()) | set(report.files)))
        raise CheckpointError(f"checkpoint does not match the model built from config.json ({files}): "
                              + "; ".join(parts))
    for (name, component), state in staged.items():
        try:
            getattr(model.decoders, name).load_component_weights(component, state)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    for name, cls in decoder_classes_with_components().items():
        dec = getattr(model.decoders, name, None) if getattr(model, "decoders", None) is not None else None
        for component in cls.component_keys.values():
            if dec is not None and (name, component) not in staged:
                report.stock_components.append(f"{name}.{component}")
                log.warning("checkpoint has no %s weights for the %s decoder: its pipeline's own %s will run "
                            "(the official model trains it)", component, name, component)


def _shared_with_loaded(own: dict[str, torch.Tensor], unloaded: set[str], seen: set[str]) -> set[str]:
    """Keys not in the checkpoint whose tensor shares storage with one that was loaded: a module registered
    under two names (the official detector's shared heads appear as `gdino.bbox_embed.*` and
    `gdino.model.decoder.bbox_embed.*`) may be written once or twice."""
    def where(t: torch.Tensor):
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))

    loaded_storage = {where(own[k]) for k in seen if own[k].numel()}
    return {k for k in unloaded if own[k].numel() and where(own[k]) in loaded_storage}


def load_checkpoint(path: str | os.PathLike, device: Optional[str | torch.device] = None,
                    dtype: Optional[torch.dtype] = None, with_decoders: bool = True):
    """-> (model, tokenizer, LoadReport). dtype defaults to bf16 on CUDA, fp32 on CPU."""
    from ..model import VisionLLM
    from ..inputs.tokenizer_files import load_checkpoint_tokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    cfg = read_config(path)
    shards = find_shards(path)
    device = torch.device(device or "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with torch.device(device):
        model = VisionLLM(cfg, with_decoders=with_decoders)
    report = LoadReport()
    load_state_into(model, shards, report)
    model = model.to(dtype=dtype).eval()
    tokenizer = load_checkpoint_tokenizer(path)
    model.special_ids = dict(tokenizer.special_ids)
    if tokenizer.vocab_size > cfg.llm.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the LLM vocabulary is "
                              f"{cfg.llm.vocab_size}")
    return model, tokenizer, report


def official_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under official key names (decoders. prefix removed)."""
    out = {}
    for k, v in model.state_dict().items():
        out[k[len("decoders."):] if k.startswith("decoders.") else k] = v.detach().cpu().contiguous()
    if model.cfg.llm.tie_word_embeddings:
        out.pop("llm.lm_head.weight", None)
    return out


def _split(keys: list[str], num_shards: int) -> list[list[str]]:
    size = max(1, -(-len(keys) // num_shards))
    return [keys[i:i + size] for i in range(0, len(keys), size)]


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike, tokenizer=None, fmt: str = "bin",
                    num_shards: int = 2) -> Path:
    """Write `model` as an official-layout directory: config.json, shards + index, tokenizer files."""
    from ..inputs.tokenizer_files import save_checkpoint_tokenizer

    if fmt not in ("bin", "safetensors"):
        raise ValueError(f"fmt must be 'bin' or 'safetensors', got {fmt!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.cfg.to_official_dict(), indent=2))
    sd = official_state_dict(model)
    groups = _split(sorted(sd), num_shards)
    weight_map = {}
    for i, keys in enumerate(groups, 1):
        if fmt == "bin":
            name = f"pytorch_model-{i:05d}-of-{len(groups):05d}.bin"
            torch.save({k: sd[k] for k in keys}, path / name)
        else:
            from safetensors.torch import save_file

            name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            # safetensors refuses tensors that share storage (the detector's shared bbox_embed heads)
            save_file({k: sd[k].clone() for k in keys}, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (path / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer is not None:
        save_checkpoint_tokenizer(tokenizer, path)
    return path


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, num_shards: Optional[int] = None,
                       progress: bool = True) -> Path:
    """Rewrite any accepted checkpoint directory as safetensors shards (same keys, same config).
    progress: a tqdm bar on stderr (one step per shard read when re-sharding, and per shard written)."""
    import sys

    from safetensors.torch import save_file
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    read_config(src)  # validates
    shards = find_shards(src)
    dst.mkdir(parents=True, exist_ok=True)
    n = num_shards or len(shards)
    weight_map, total = {}, 0
    bar = tqdm(total=n if n == len(shards) else len(shards) + n, desc=f"convert {src.name}", unit="shard",
               file=sys.stderr, disable=not progress)
    if n == len(shards):
        plan = ((i, read_shard(f)) for i, f in enumerate(shards, 1))  # one shard in memory at a time
    else:
        merged: dict[str, torch.Tensor] = {}
        for f in shards:
            merged.update(read_shard(f))
            bar.update()
        groups = _split(sorted(merged), n)
        n, bar.total = len(groups), len(shards) + len(groups)
        plan = ((i, {k: merged[k] for k in keys}) for i, keys in enumerate(groups, 1))
    for i, sd in plan:
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        sd = {k: v.contiguous().clone() for k, v in sd.items()}  # drop shared storage (tied weights)
        save_file(sd, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in sd})
        total += sum(t.numel() * t.element_size() for t in sd.values())
        bar.update()
    bar.close()
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for name in ("config.json",) + TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst
