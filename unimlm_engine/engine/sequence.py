"""Sequence: the engine's plain-data record of one request in flight.

`tokens` is everything fed (or to be fed) to the LLM, in position order: prompt ids,
generated ids, and super-link query markers (negative ints, see `query_marker`). The C++
scheduler holds the same list for block accounting and prefix hashing; preemption
recomputes from it, so it must be enough to rebuild every input embedding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..config import ROUTE_TABLE
from ..model.superlink import RoutedPayload
from .handle import RequestHandle
from .types import Request, TaskResult

QUERY_TABLES = ("det", "pose", "gen", "edit")
_MARKER_STRIDE = 1 << 16


def query_marker(route: str, k: int) -> int:
    """Token id standing for query k of `route`'s table (negative: never a vocabulary id)."""
    return -(1 + QUERY_TABLES.index(ROUTE_TABLE[route]) * _MARKER_STRIDE + k)


def decode_marker(marker: int) -> tuple[str, int]:
    """-> (table name, row) for a query marker."""
    v = -marker - 1
    return QUERY_TABLES[v // _MARKER_STRIDE], v % _MARKER_STRIDE


@dataclass
class PendingPayload:
    route: str
    token_index: int  # index of the routing token among generated tokens
    start: int  # position of the first query
    rows: torch.Tensor  # [K, hidden], filled as the query positions are computed
    filled: set = field(default_factory=set)

    @property
    def complete(self) -> bool:
        return len(self.filled) == self.rows.shape[0]


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    handle: RequestHandle
    tokens: list[int]
    prompt_len: int
    patch_index: Optional[torch.Tensor] = None  # [prompt_len] row of image_features, -1 elsewhere
    pixel_values: list[torch.Tensor] = field(default_factory=list)
    image_features: Optional[torch.Tensor] = None  # [P, hidden]
    images: list[Any] = field(default_factory=list)  # decoded PIL images (decoders need them)
    image_spans: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, image key)
    generator: Optional[torch.Generator] = None
    detok: Any = None
    deadline: Optional[float] = None
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: Optional[float] = None
    first_token: Optional[float] = None
    last_token: Optional[float] = None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    pending: list[PendingPayload] = field(default_factory=list)
    payloads: list[RoutedPayload] = field(default_factory=list)
    finish_after_payload: Optional[str] = None
    stop_string_hit: bool = False
    finish_reason: Optional[str] = None
    text_done: bool = False
    tasks: list[Optional[TaskResult]] = field(default_factory=list)
    decoders_pending: int = 0
    num_cached_tokens: int = 0

    def needs_images(self, start: int, end: int) -> bool:
        """True if positions [start, end) include image tokens whose features are not computed."""
        if self.image_features is not None or self.patch_index is None or start >= self.prompt_len:
            return False
        return bool((self.patch_index[start:min(end, self.prompt_len)] >= 0).any())
