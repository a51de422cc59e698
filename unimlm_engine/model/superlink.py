"""Super-link query tables (DESIGN.md section 1), built from the route registry.

Checkpoint keys `emb_embeddings_<table>.weight`: [K, llm_hidden], one table per `RouteSpec.table`
(the official model: det, pose, gen, edit; DET/GRD/SEG share `det`), K from the SuperLinkConfig
field the route names (num_embs, or num_embs_gen for GEN/EDIT).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..routes import query_tables


@dataclass
class RoutedPayload:
    """The final-norm hidden states of the K query positions that followed a routing token.

    route: "[DET]" ...; payload: [K, llm_hidden]; source: "generated" (token_index = index of the
    routing token among the generated tokens) or "prompt" (token_index = its index in the prompt ids
    as given, before query positions were added).
    """

    route: str
    token_index: int
    payload: torch.Tensor
    source: str = "generated"


def table_param_name(table: str) -> str:
    return f"emb_embeddings_{table}"


def build_query_tables(cfg: ModelConfig) -> dict[str, nn.Embedding]:
    """One nn.Embedding [K, hidden] per query table of the registry, under its checkpoint name."""
    h = cfg.llm.hidden_size
    return {table_param_name(t): nn.Embedding(int(getattr(cfg.superlink, k_field)), h)
            for t, k_field in query_tables().items()}
