"""Streaming detokenization: text deltas from a growing id list without splitting a multi-byte UTF-8
character (`IncrementalDetokenizer`), with O(1)-per-token fast paths for the byte and HF tokenizers."""
from __future__ import annotations

import codecs
from typing import Sequence

from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer


def detokenize_step(tokenizer: Tokenizer, ids: Sequence[int], prefix_offset: int, read_offset: int,
                    skip_special: bool = True) -> tuple[str, int, int]:
    """One streaming step: the text added by ids[read_offset:], and the new (prefix_offset, read_offset).

    ids[prefix_offset:read_offset] is a window of already-emitted ids decoded again for context
    (SentencePiece drops a leading space on the first piece; decoding from a window keeps deltas right).
    Text ending in U+FFFD is an unfinished UTF-8 character: nothing is emitted until it completes.
    """
    prefix_text = tokenizer.decode(ids[prefix_offset:read_offset], skip_special=skip_special)
    new_text = tokenizer.decode(ids[prefix_offset:], skip_special=skip_special)
    if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
        return new_text[len(prefix_text):], read_offset, len(ids)
    return "", prefix_offset, read_offset


class _WindowDecoder:
    """Any tokenizer: decode a window of recent ids twice per token (`detokenize_step`)."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0

    def step(self, tok: int) -> str:
        self.ids.append(tok)
        delta, self.prefix_offset, self.read_offset = detokenize_step(
            self.tokenizer, self.ids, self.prefix_offset, self.read_offset, self.skip_special)
        return delta

    def flush(self) -> str:
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix_text):]


_BYTES = tuple(bytes((b,)) for b in range(256))
_ASCII = tuple(chr(b) for b in range(128))


class _ByteDecoder:
    """ByteTokenizer: incremental UTF-8, O(1) per token (an ASCII byte with nothing pending is one table
    lookup; otherwise one C-level `codecs.utf_8_decode` over the pending bytes); a control id ends a
    byte run (as in `decode`, which decodes each run of plain ids on its own)."""

    def __init__(self, tokenizer: "ByteTokenizer", skip_special: bool):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self._pending = b""
        self._kept = tokenizer.text_token_ids
        self._control = tokenizer.control_ids | self._kept
        self._vocab = tokenizer.vocab_size

    def step(self, tok: int) -> str:
        if tok not in self._control:
            b = tok - ByteTokenizer.BYTE_OFFSET
            if not 0 <= tok < self._vocab:
                raise IndexError(f"ByteTokenizer: id {tok} out of range [0, {self._vocab})")
            if b < 0x80 and not self._pending:
                return _ASCII[b]
            text, used = codecs.utf_8_decode(self._pending + _BYTES[b], "replace", False)
            self._pending = (self._pending + _BYTES[b])[used:]
            return text
        text = self.flush()
        return text if self.skip_special and tok not in self._kept else text + self.tokenizer.id_to_token(tok)

    def flush(self) -> str:
        text = codecs.utf_8_decode(self._pending, "replace", True)[0]
        self._pending = b""
        return text


class _HFStreamDecoder:
    """HFTokenizer: the `tokenizers` DecodeStream (Rust) over the ids `decode` keeps; the end flushes what
    it still holds (an unfinished character) by one full decode."""

    def __init__(self, tokenizer: "HFTokenizer", skip_special: bool):
        from tokenizers.decoders import DecodeStream

        self.tokenizer, self.skip_special = tokenizer, skip_special
        self._stream = DecodeStream(skip_special_tokens=False)
        self._control = tokenizer.control_ids if skip_special else frozenset()
        self._kept: list[int] = []
        self._emitted = 0

    def step(self, tok: int) -> str:
        if tok in self._control:
            return ""
        self._kept.append(tok)
        text = self._stream.step(self.tokenizer._tok, tok) or ""
        self._emitted += len(text)
        return text

    def flush(self) -> str:
        full = self.tokenizer._tok.decode(self._kept, skip_special_tokens=False)
        tail, self._emitted = full[self._emitted:], len(full)
        return tail


class IncrementalDetokenizer:
    """Streaming text of a growing id list, without splitting a multi-byte UTF-8 character: feed ids one
    at a time (`step_one`) or all ids so far (`step`); `flush` at the end returns what is held back. The
    deltas plus the flush equal `tokenizer.decode(ids)`. Fast paths for the byte and HF tokenizers."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        if isinstance(tokenizer, ByteTokenizer):
            self._impl = _ByteDecoder(tokenizer, skip_special)
        elif isinstance(tokenizer, HFTokenizer):
            self._impl = _HFStreamDecoder(tokenizer, skip_special)
        else:
            self._impl = _WindowDecoder(tokenizer, skip_special)

    def step_one(self, tok: int) -> str:
        """One more id -> the new text (may be empty while a character is unfinished)."""
        self.ids.append(tok)
        return self._impl.step(tok)

    def step(self, ids: Sequence[int]) -> str:
        """ids: every id generated so far (the previous call's ids plus new ones)."""
        return "".join(self.step_one(t) for t in list(ids)[len(self.ids):])

    def flush(self) -> str:
        """Text still held back at the end of the stream (an unfinished character shows as U+FFFD)."""
        return self._impl.flush()
