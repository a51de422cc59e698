"""Tokenizers: the tiny preset's byte tokenizer, HF `tokenizer.json`, SentencePiece `tokenizer.model`.

Every tokenizer maps each special token string (`routes.special_tokens()`: placeholders,
routing tokens, query tokens) found inside text to its own id (so "<image>" and "[DET]" in a
prompt become one token each), exposes `special_ids` (string -> id) and `route_ids` (routing
token id -> route name such as "[DET]"). The official vocabulary's tokens are required; routing
tokens of routes registered later are used when the vocabulary has them. `IncrementalDetokenizer` turns a growing id list into text deltas
for streaming without splitting a multi-byte UTF-8 character.

Span tokens (`routes.span_tokens()`: <IMGSEG> </IMGSEG> ... <BOX> </BOX>, UnifiedMLLM) are special tokens
when the vocabulary has them (`ByteTokenizer(extra_special=...)`, or listed in the tokenizer files), and
unlike the others they stay in the text: `decode` writes them out even with skip_special
(`text_token_ids`), so the span parser and the caller see `<IMGSEG>dog</IMGSEG>`.
"""
from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import Optional, Sequence

from ..routes import PLACEHOLDER_TOKENS, required_special_tokens, route_tokens, span_tokens, special_tokens

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
_SPIECE = "\u2581"  # sentencepiece's word-boundary mark


class Tokenizer(ABC):
    """Common interface. Subclasses set the id attributes below and implement the four hooks.

    `bos_id` is None for a vocabulary without a BOS token (then `add_bos` is a no-op). Tokenizers
    loaded from files keep their source folder in `directory`.
    """

    vocab_size: int
    bos_id: Optional[int]
    eos_id: int
    pad_id: int
    unk_id: Optional[int]
    special_ids: dict[str, int]

    @abstractmethod
    def _encode_plain(self, text: str) -> list[int]:
        """Ids of text that contains no special token string."""

    @abstractmethod
    def _decode_plain(self, ids: Sequence[int]) -> str:
        """Text of a run of ids none of which is a special or control id."""

    @abstractmethod
    def token_to_id(self, token: str) -> int:
        """Id of one vocabulary entry; KeyError if it is not in the vocabulary."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """Vocabulary entry of one id; IndexError if the id is out of range."""

    @cached_property
    def route_ids(self) -> dict[int, str]:
        return {self.special_ids[t]: t for t in route_tokens() if t in self.special_ids}

    @cached_property
    def text_token_ids(self) -> frozenset[int]:
        """Special ids that stay in the text (the span tokens the vocabulary has)."""
        return frozenset(self.special_ids[t] for t in span_tokens() if t in self.special_ids)

    @cached_property
    def control_ids(self) -> frozenset[int]:
        """Ids that `decode(skip_special=True)` drops: the special tokens (not the span tokens) plus
        <unk>/<s>/</s>/pad."""
        extra = {i for i in (self.bos_id, self.eos_id, self.pad_id, self.unk_id) if i is not None}
        return (frozenset(self.special_ids.values()) - self.text_token_ids) | extra

    @cached_property
    def _text_specials(self) -> tuple[dict[str, int], re.Pattern]:
        """Strings recognised inside text (special tokens, BOS/EOS) and a splitter, longest match first."""
        table = dict(self.special_ids)
        for tid in (self.bos_id, self.eos_id):
            if tid is not None:
                table[self.id_to_token(tid)] = tid
        alternatives = sorted(table, key=len, reverse=True)
        return table, re.compile("(" + "|".join(re.escape(s) for s in alternatives) + ")")

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        specials, splitter = self._text_specials
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        for piece in splitter.split(text):
            if piece in specials:
                ids.append(specials[piece])
            elif piece:
                ids.extend(self._encode_plain(piece))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        control, kept = self.control_ids, self.text_token_ids
        parts: list[str] = []
        run: list[int] = []
        for tid in ids:
            tid = int(tid)
            if tid not in control and tid not in kept:
                run.append(tid)
                continue
            if run:
                parts.append(self._decode_plain(run))
                run = []
            if not skip_special or tid in kept:
                parts.append(self.id_to_token(tid))
        if run:
            parts.append(self._decode_plain(run))
        return "".join(parts)


class ByteTokenizer(Tokenizer):
    """The tiny preset's tokenizer, built in code: <unk> <s> </s>, bytes at 3 + b, special tokens from 259
    (`routes.special_tokens()` order, read at construction), then `extra_special` (the span tokens of
    the tiny-unified preset)."""

    BYTE_OFFSET = 3

    def __init__(self, extra_special: Sequence[str] = ()) -> None:
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = 0, 1, 2, 0
        first = self.BYTE_OFFSET + 256
        self.extra_special = tuple(extra_special)
        tokens = tuple(dict.fromkeys(tuple(special_tokens()) + self.extra_special))
        self.special_ids = {t: first + i for i, t in enumerate(tokens)}
        self._id_to_special = {i: t for t, i in self.special_ids.items()}
        self._id_to_special.update({0: UNK, 1: BOS, 2: EOS})
        self.vocab_size = first + len(self.special_ids)

    def _encode_plain(self, text: str) -> list[int]:
        return [self.BYTE_OFFSET + b for b in text.encode("utf-8")]

    def _decode_plain(self, ids: Sequence[int]) -> str:
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise IndexError(f"ByteTokenizer: id {i} out of range [0, {self.vocab_size})")
        return bytes(i - self.BYTE_OFFSET for i in ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int:
        if token in self.special_ids:
            return self.special_ids[token]
        fixed = {UNK: 0, BOS: 1, EOS: 2}
        if token in fixed:
            return fixed[token]
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
        if m is None:
            raise KeyError(f"ByteTokenizer: no token {token!r} (bytes are spelled '<0xAB>')")
        return self.BYTE_OFFSET + int(m.group(1), 16)

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"ByteTokenizer: id {token_id} out of range [0, {self.vocab_size})")
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        return f"<0x{token_id - self.BYTE_OFFSET:02X}>"


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _declared_added_tokens(directory: Path) -> dict[str, int]:
    """Added tokens listed beside the model: added_tokens.json, then tokenizer_config.json."""
    out: dict[str, int] = {}
    if (directory / "added_tokens.json").is_file():
        out.update({k: int(v) for k, v in _read_json(directory / "added_tokens.json").items()})
    if (directory / "tokenizer_config.json").is_file():
        decoder = _read_json(directory / "tokenizer_config.json").get("added_tokens_decoder", {})
        for tid, entry in decoder.items():
            content = entry["content"] if isinstance(entry, dict) else entry
            out.setdefault(content, int(tid))
    return out


def _config_token(directory: Path, key: str, default: Optional[str]) -> Optional[str]:
    """A token string named in tokenizer_config.json (a string or an AddedToken dict; null means none)."""
    path = directory / "tokenizer_config.json"
    value = _read_json(path).get(key, default) if path.is_file() else default
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json; special tokens come from that file or the added-token lists beside it."""

    def __init__(self, directory: str | Path) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as _HF

        directory = self.directory = Path(directory)
        self._tok = _HF.from_file(str(directory / "tokenizer.json"))
        declared = _declared_added_tokens(directory)
        required = required_special_tokens()
        wanted = [t for t in special_tokens() + span_tokens() if t in required
                  or self._tok.token_to_id(t) is not None or t in declared]
        missing = [t for t in wanted if self._tok.token_to_id(t) is None]
        undeclared = [t for t in missing if t not in declared]
        if undeclared:
            raise ValueError(f"tokenizer in {directory}: special tokens {undeclared} are neither in tokenizer.json "
                             f"nor in added_tokens.json / tokenizer_config.json")
        for token in sorted(missing, key=lambda t: declared[t]):
            self._tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
            got = self._tok.token_to_id(token)
            if got != declared[token]:
                raise ValueError(f"tokenizer in {directory}: {token!r} is declared as id {declared[token]} "
                                 f"but would get id {got} (added token ids must follow the vocabulary)")
        self.special_ids = {t: self._tok.token_to_id(t) for t in wanted}
        wrong = {t: (i, declared[t]) for t, i in self.special_ids.items() if declared.get(t, i) != i}
        if wrong:
            raise ValueError(f"tokenizer in {directory}: tokenizer.json and the added-token lists disagree "
                             f"(token: (tokenizer.json id, declared id)): {wrong}")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._optional_id(directory, "bos_token", BOS)
        self.unk_id = self._optional_id(directory, "unk_token", UNK)
        eos = self._optional_id(directory, "eos_token", EOS)
        if eos is None:
            raise ValueError(f"tokenizer in {directory}: no EOS token (set eos_token in tokenizer_config.json)")
        self.eos_id = eos
        pad = self._optional_id(directory, "pad_token", None)
        self.pad_id = next(i for i in (pad, self.unk_id, self.eos_id) if i is not None)

    def _optional_id(self, directory: Path, key: str, default: Optional[str]) -> Optional[int]:
        token = _config_token(directory, key, default)
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            control = self.control_ids
            ids = [i for i in ids if i not in control]
        return self._tok.decode(ids, skip_special_tokens=False)

    def _encode_plain(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode_plain(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise KeyError(f"HFTokenizer: no token {token!r}")
        return tid

    def id_to_token(self, token_id: int) -> str:
        token = self._tok.id_to_token(token_id)
        if token is None:
            raise IndexError(f"HFTokenizer: id {token_id} out of range [0, {self.vocab_size})")
        return token


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece tokenizer.model (LLaMA: <unk>=0, <s>=1, </s>=2) plus the special tokens as added tokens.

    Added-token ids come from added_tokens.json when present, else follow the sp vocabulary in
    `routes.special_tokens()` order (the official order: [PAD]=32000 ... [EMB8]=32025 after Llama-2's 32,000).

    Text is tokenized as the official code does (`tokenizer_image_token`: the prompt is split at `<image>`
    and each chunk goes through the transformers-4.34 slow `LlamaTokenizer`). `legacy` comes from
    tokenizer_config.json (Vicuna-v1.5 ships `false`; absent means true, 4.34's default):
      legacy=True   every run of text between special tokens gets sp's dummy prefix ("▁");
      legacy=False  only a chunk's first run does; a run right after another special token (`</s>USER:`
                    in multi-turn prompts, text after `[DET][EMB]...`) is encoded without it, and a run
                    that starts with a space keeps that space as its own "▁" (4.34's `<unk>` prefix trick).
    """

    def __init__(self, directory: str | Path, legacy: Optional[bool] = None) -> None:
        import sentencepiece as spm

        directory = self.directory = Path(directory)
        self._sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
        n = self._sp.get_piece_size()
        declared = {}
        if (directory / "added_tokens.json").is_file():
            declared = {k: int(v) for k, v in _read_json(directory / "added_tokens.json").items()}
        if declared:
            missing = [t for t in required_special_tokens() if t not in declared]
            if missing:
                raise ValueError(f"tokenizer in {directory}: added_tokens.json lacks special tokens {missing}")
            self.special_ids = {t: declared[t] for t in special_tokens() + span_tokens() if t in declared}
        else:
            self.special_ids = {t: n + i for i, t in enumerate(special_tokens())}
        clash = [t for t, i in self.special_ids.items() if i < n]
        if clash or len(set(self.special_ids.values())) != len(self.special_ids):
            raise ValueError(f"tokenizer in {directory}: added token ids must be distinct and >= {n}; bad: {clash}")
        self._id_to_added = {i: t for t, i in self.special_ids.items()}
        self.vocab_size = max(n, max(self.special_ids.values()) + 1)
        self.unk_id = self._sp.unk_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        if self._sp.eos_id() < 0:
            raise ValueError(f"tokenizer in {directory}: the sentencepiece model has no EOS piece")
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.unk_id
        if legacy is None:
            cfg = directory / "tokenizer_config.json"
            legacy = _read_json(cfg).get("legacy") if cfg.is_file() else None
            legacy = True if legacy is None else bool(legacy)
        self.legacy = legacy
        self._sp_plain = self._sp if legacy else self._without_dummy_prefix(self._sp)
        self._unk_text = self._sp.id_to_piece(self.unk_id)
        self._unk_len = len(self._sp_plain.encode(self._unk_text))

    @staticmethod
    def _without_dummy_prefix(sp):
        """The same model with `add_dummy_prefix` off (what 4.34 loads when legacy=False)."""
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb2

        proto = pb2.ModelProto.FromString(sp.serialized_model_proto())
        if not proto.normalizer_spec.add_dummy_prefix:
            return sp
        proto.normalizer_spec.add_dummy_prefix = False
        out = spm.SentencePieceProcessor()
        out.LoadFromSerializedProto(proto.SerializeToString())
        return out

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if self.legacy:
            return super().encode(text, add_bos)
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        for k, chunk in enumerate(text.split(PLACEHOLDER_TOKENS[0])):
            if k:
                ids.append(self.special_ids[PLACEHOLDER_TOKENS[0]])
            if chunk:
                ids.extend(self._encode_chunk(chunk))
        return ids

    def _encode_chunk(self, chunk: str) -> list[int]:
        """One `<image>`-free chunk as 4.34's LlamaTokenizer(legacy=False).tokenize: "▁" + text, split at
        special tokens, each run through `_tokenize`; a lone leading "▁" before a special token is dropped."""
        specials, splitter = self._text_specials
        out: list[int] = []
        for piece in splitter.split(_SPIECE + chunk.replace(_SPIECE, " ")):
            if piece in specials:
                out.append(specials[piece])
            elif piece:
                out.extend(self._tokenize_nonlegacy(piece))
        if len(out) > 1 and out[0] == self._sp_plain.piece_to_id(_SPIECE) and (
                out[1] in specials.values() or out[1] == self.unk_id):
            out = out[1:]
        return out

    def _tokenize_nonlegacy(self, text: str) -> list[int]:
        if not text.startswith((_SPIECE, " ")):
            return list(self._sp_plain.encode(text))
        ids = list(self._sp_plain.encode(self._unk_text + text))
        return ids[self._unk_len:] if len(ids) >= self._unk_len else ids

    def _encode_plain(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def _decode_plain(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def token_to_id(self, token: str) -> int:
        if token in self.special_ids:
            return self.special_ids[token]
        tid = self._sp.piece_to_id(token)
        if tid == self.unk_id and token != self._sp.id_to_piece(self.unk_id):
            raise KeyError(f"SentencePieceTokenizer: no token {token!r}")
        return tid

    def id_to_token(self, token_id: int) -> str:
        if token_id in self._id_to_added:
            return self._id_to_added[token_id]
        if not 0 <= token_id < self._sp.get_piece_size():
            raise IndexError(f"SentencePieceTokenizer: id {token_id} out of range [0, {self.vocab_size})")
        return self._sp.id_to_piece(token_id)


def load_tokenizer(checkpoint_dir: str | Path) -> Tokenizer:
    """tokenizer.json (HF `tokenizers`) if present, else tokenizer.model (SentencePiece)."""
    directory = Path(checkpoint_dir)
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer(directory)
    if (directory / "tokenizer.model").is_file():
        return SentencePieceTokenizer(directory)
    raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in checkpoint directory {directory}")


# Streaming detokenization lives in detokenizer.py; re-exported here for existing imports.
from .detokenizer import IncrementalDetokenizer, detokenize_step  # noqa: E402,F401
