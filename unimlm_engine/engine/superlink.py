"""Super links in the engine: query markers, query insertion, payload collection, embedding override.

A sequence's `tokens` hold vocabulary ids and, at super-link query positions, *markers*: negative ints
that name (query table, row). They travel through the C++ scheduler like any token (block accounting,
prefix hashing, recompute after preemption) and are turned into the model's learned query rows when the
step's input embeddings are built (`override_embeddings`, through `VisionLLM.query_table`).

- A generated routing token: its K markers follow it (`open_payload`; core.py decides when they are fed).
- A routing token already in the prompt: K markers follow it at prefill (`expand_prompt`). When the
  prompt already spells the K query positions ([EMB] [EMB2] ... or K x [EMB], the official training
  format) those ids become the markers; otherwise K markers are inserted right after the token. This is
  what `model.generation.prompt_embeddings` computes; README's fidelity table lists where the official
  code places prompt-side queries differently.
- Each routing token opens a `PendingPayload`; `collect` copies the final-norm hidden states of its K
  positions out of each step's output (they may span chunked-prefill steps) and, once complete, appends a
  `RoutedPayload` to the sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..model.superlink import RoutedPayload, table_param_name
from ..routes import all_routes, get_route, query_tables
from .sequence import PLACEHOLDER, Sequence

_STRIDE = 1 << 16  # markers of table t are -(1 + t * _STRIDE + row)


@dataclass
class PendingPayload:
    route: str
    token_index: int  # generated: index among generated tokens; prompt: index in the prompt ids
    start: int  # position of the first query
    rows: torch.Tensor  # [K, hidden], filled as the query positions are computed
    source: str = "generated"
    filled: set = field(default_factory=set)

    @property
    def complete(self) -> bool:
        return len(self.filled) == self.rows.shape[0]


class SuperLinks:
    """The super-link logic for one model (its routing token ids, query tables and K per route)."""

    def __init__(self, model):
        self.model = model
        self.tables = tuple(t for t in query_tables() if table_param_name(t) in model.query_table_names)
        self.route_ids: dict[int, str] = dict(model.route_ids)  # the routes this model's vocabulary spells
        self.num_queries = {s.token: s.num_queries_in(model.cfg.superlink) for s in all_routes()
                            if s.table in self.tables}
        self._markers = {r: self._table_markers(get_route(r).table, self.num_queries[r]) for r in self.num_queries}
        self._spelled: dict[str, Optional[list[int]]] = {}
        for r, k in self.num_queries.items():
            names = get_route(r).prompt_query_tokens(k)
            ids = None if names is None else [model.special_ids.get(n) for n in names]
            self._spelled[r] = None if ids is None or None in ids else ids

    def _table_markers(self, table: str, k: int) -> list[int]:
        t = self.tables.index(table)
        return [-(1 + t * _STRIDE + row) for row in range(k)]

    def markers(self, route: str) -> list[int]:
        """The K markers fed after `route`'s token."""
        return self._markers[route]

    def _pending(self, route: str, token_index: int, start: int, source: str) -> PendingPayload:
        rows = torch.empty(self.num_queries[route], self.model.cfg.llm.hidden_size, dtype=self.model.dtype,
                           device=self.model.device)
        return PendingPayload(route, token_index, start, rows, source)

    # ---- query insertion ---------------------------------------------------------------------
    def expand_prompt(self, ids: list[int]) -> tuple[list[int], list[PendingPayload], np.ndarray]:
        """Prompt ids -> (ids with the markers of the prompt's routing tokens, their pending payloads,
        new position of every old position [len(ids)])."""
        if not any(i in self.route_ids for i in ids):
            return ids, [], np.arange(len(ids))
        out: list[int] = []
        pending: list[PendingPayload] = []
        where = np.empty(len(ids), dtype=np.int64)
        i = 0
        while i < len(ids):
            where[i] = len(out)
            out.append(ids[i])
            route = self.route_ids.get(ids[i])
            i += 1
            if route is None:
                continue
            k, spelled = self.num_queries[route], self._spelled[route]
            pending.append(self._pending(route, i - 1, len(out), "prompt"))
            if spelled is not None and ids[i:i + k] == spelled:
                where[i:i + k] = np.arange(len(out), len(out) + k)
                i += k
            out += self.markers(route)
        return out, pending, where

    def open_payload(self, seq: Sequence, tok: int, token_index: int, start: int) -> list[int]:
        """A generated routing token `tok` (index `token_index` among the generated tokens) whose K query
        positions start at `start`: open its pending payload and return the K markers to feed."""
        route = self.route_ids[tok]
        seq.pending.append(self._pending(route, token_index, start, "generated"))
        return self.markers(route)

    # ---- payload collection --------------------------------------------------------------------
    @staticmethod
    def collect(seqs: list[Sequence], starts: list[int], counts: list[int], row_starts: list[int],
                hidden: torch.Tensor) -> None:
        """hidden: [T, hidden] final-norm states of one step; sequence i fed positions
        [starts[i], starts[i] + counts[i]) at rows [row_starts[i], ...)."""
        for s, a, n, row in zip(seqs, starts, counts, row_starts):
            if not s.pending or s.text_done:  # text done: its payloads belong to the output processor now
                continue
            b = a + n
            for p in list(s.pending):
                lo, hi = max(a, p.start), min(b, p.start + p.rows.shape[0])
                if lo < hi:
                    p.rows[lo - p.start:hi - p.start] = hidden[row + lo - a:row + hi - a]
                    p.filled.update(range(lo, hi))
                if p.complete:
                    s.pending.remove(p)
                    s.payloads.append(RoutedPayload(p.route, p.token_index, p.rows, p.source))

    # ---- embedding override --------------------------------------------------------------------
    def override_embeddings(self, embeds: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        """embeds: [T, hidden] (marker rows hold garbage), ids: [T] int64 -> embeds with every marker row
        replaced by its query row (in place when there are markers; PLACEHOLDER is not a marker)."""
        neg = np.flatnonzero((ids < 0) & (ids != PLACEHOLDER))
        if neg.size == 0:
            return embeds
        code = -ids[neg] - 1
        table, row = code // _STRIDE, code % _STRIDE
        for t in np.unique(table):
            sel = table == t
            weight = self.model.query_table(self.tables[int(t)])
            dst = torch.from_numpy(neg[sel]).to(embeds.device)
            embeds[dst] = weight[torch.from_numpy(row[sel]).to(weight.device)].to(embeds.dtype)
        return embeds
