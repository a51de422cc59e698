"""Tokenizer files of a checkpoint directory.

Real checkpoints carry `tokenizer.json` or `tokenizer.model` (see tokenizer.load_tokenizer).
A checkpoint written from the `tiny` preset carries the built-in byte tokenizer, named by
`tokenizer_config.json: {"tokenizer_class": "UnimlmByteTokenizer"}`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

BYTE_TOKENIZER_CLASS = "UnimlmByteTokenizer"
_SOURCE_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json")


class TokenizerFilesError(ValueError):
    pass


def load_checkpoint_tokenizer(path: Path) -> Tokenizer:
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            cls = json.loads(cfg_file.read_text()).get("tokenizer_class")
        except json.JSONDecodeError as e:
            raise TokenizerFilesError(f"{cfg_file}: invalid JSON ({e})") from None
        if cls == BYTE_TOKENIZER_CLASS:
            return ByteTokenizer(extra_special=json.loads(cfg_file.read_text()).get("extra_special", ()))
    try:
        return load_tokenizer(path)
    except (FileNotFoundError, ValueError) as e:
        raise TokenizerFilesError(str(e)) from None


def save_checkpoint_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    if isinstance(tokenizer, ByteTokenizer):
        cfg = {"tokenizer_class": BYTE_TOKENIZER_CLASS}
        if tokenizer.extra_special:  # the span tokens of a tiny-unified checkpoint
            cfg["extra_special"] = list(tokenizer.extra_special)
        (path / "tokenizer_config.json").write_text(json.dumps(cfg))
        return
    src = getattr(tokenizer, "directory", None)
    if src is None:
        raise TokenizerFilesError(f"cannot save a {type(tokenizer).__name__} that was not loaded from a directory")
    for name in _SOURCE_FILES:
        if (Path(src) / name).is_file() and Path(src).resolve() != Path(path).resolve():
            shutil.copy2(Path(src) / name, path / name)
