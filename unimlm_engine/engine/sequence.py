"""Sequence: the engine's plain-data record of one request in flight.

`tokens` is everything fed (or to be fed) to the LLM, in position order: prompt ids,
generated ids, and super-link query markers (negative ints, see engine/superlink.py). The C++
scheduler holds the same list for block accounting and prefix hashing; preemption
recomputes from it, so it must be enough to rebuild every input embedding. With overlapped
scheduling (core.py) the last token can be PLACEHOLDER for one step: sampled on the device,
fed to the next step from there, and resolved when the host learns its value.

Ownership: the engine loop thread owns the sequence until its text is done (`text_done`);
the output thread owns `text_parts`, `held`, `detok`, `stop_cut` and, after text_done, the rest.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..model.superlink import RoutedPayload
from .handle import RequestHandle
from .types import Request, TaskResult

PLACEHOLDER = -(1 << 31)  # a sampled token whose value the host does not know yet (never a marker)


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    handle: RequestHandle
    tokens: list[int]
    prompt_len: int
    # [prompt_len] row of image_features at <im_patch> and <region> positions, -1 elsewhere
    patch_index: Optional[torch.Tensor] = None
    pixel_values: list[torch.Tensor] = field(default_factory=list)
    image_features: Optional[torch.Tensor] = None  # [P + R, hidden]: image rows, then one row per region
    regions: list[Any] = field(default_factory=list)  # model.region_encoder.RegionInput, in <region> order
    images: list[Any] = field(default_factory=list)  # decoded PIL images (decoders need them)
    image_spans: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, image / region key)
    seed: int = 0  # SamplingParams.resolved_seed(): the counter-based sampler's key
    num_sampled: int = 0  # valid samples drawn, in flight included (the next sample's index)
    placeholder_pos: Optional[int] = None  # position of the unresolved PLACEHOLDER in tokens
    sample_row: int = -1  # its row in the last launched step's sampled ids
    greedy_from: int = -1  # greedy, no logit bias: the sample index from which argmax alone decides (-1: never)
    detok: Any = None
    deadline: Optional[float] = None
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: Optional[float] = None
    first_token: Optional[float] = None
    last_token: Optional[float] = None
    generated: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)  # the text streamed so far, in pieces
    held: str = ""  # text after it, held back while it could start a stop string
    pending: list[Any] = field(default_factory=list)  # superlink.PendingPayload, filled as positions compute
    payloads: list[RoutedPayload] = field(default_factory=list)
    finish_after_payload: Optional[str] = None
    stop_string_hit: bool = False
    output_error: Optional[BaseException] = None  # the output thread could not process a token: ends in error
    stop_cut: Optional[int] = None  # index in `generated` of the token that completed a stop string
    text_finalized: bool = False  # the output thread flushed the text and applied stop_cut
    finish_reason: Optional[str] = None
    text_done: bool = False
    tasks: list[Optional[TaskResult]] = field(default_factory=list)
    decoders_pending: int = 0  # routed calls not returned yet (super-link tasks and spans)
    planned: bool = False  # the super-link tasks are planned (text done): the request ends at pending == 0
    span_parser: Any = None  # engine/spans.SpanParser, when the model serves span routes
    span_fed: int = 0  # text_parts already fed to it
    spans: list[Optional[TaskResult]] = field(default_factory=list)  # span results in text order
    num_cached_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.text_parts) + self.held

    def needs_images(self, start: int, end: int) -> bool:
        """True if positions [start, end) include image tokens whose features are not computed."""
        if self.image_features is not None or self.patch_index is None or start >= self.prompt_len:
            return False
        return bool((self.patch_index[start:min(end, self.prompt_len)] >= 0).any())
