"""Super-link query tables (DESIGN.md section 1).

Checkpoint keys `emb_embeddings_{det,pose,gen,edit}.weight`: [K, llm_hidden], K = num_embs
(DET/GRD/SEG share `det`; POSE uses `pose`) or num_embs_gen (GEN, EDIT).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ROUTE_TABLE, ModelConfig


@dataclass
class RoutedPayload:
    """The final-norm hidden states of the K query positions that followed a routing token.

    route: "[DET]" ... "[EDIT]"; token_index: index of the routing token among the
    generated tokens; payload: [K, llm_hidden].
    """

    route: str
    token_index: int
    payload: torch.Tensor


def build_query_tables(cfg: ModelConfig) -> dict[str, nn.Embedding]:
    h = cfg.llm.hidden_size
    k, k_gen = cfg.superlink.num_embs, cfg.superlink.num_embs_gen
    return {"emb_embeddings_det": nn.Embedding(k, h), "emb_embeddings_pose": nn.Embedding(k, h),
            "emb_embeddings_gen": nn.Embedding(k_gen, h), "emb_embeddings_edit": nn.Embedding(k_gen, h)}


def query_table_name(route: str) -> str:
    try:
        return f"emb_embeddings_{ROUTE_TABLE[route]}"
    except KeyError:
        raise ValueError(f"unknown route {route!r}; routes: {', '.join(ROUTE_TABLE)}") from None


def query_embeddings(model: nn.Module, route: str) -> torch.Tensor:
    """-> [K, llm_hidden]: the learned queries fed after `route`'s token."""
    return getattr(model, query_table_name(route)).weight
