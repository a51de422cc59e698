"""Reference generation: one request, contiguous KV cache, super-link insertion exactly as
DESIGN.md section 1 says. This is what the engine's outputs are checked against.

After a routing token is sampled, the next step feeds 1 + K positions: the routing token
itself, then the K query embeddings of its table. The K positions occupy KV cache slots but
are not output tokens; their final-norm hidden states are the payload; the next token is
sampled from the last query position.

Routing tokens already in the prompt (multi-turn history, or an answer given in the prompt as the
official evaluation does) get their K query rows at prefill: when the K ids after the routing token
are the route's query tokens ([EMB] [EMB2] ... or K x [EMB], the official training format) their
embeddings are replaced by the query rows; otherwise K query positions are inserted right after the
routing token. Their hidden states become payloads with source "prompt".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..sampling import SamplingParams, sample_token
from ..routes import get_route
from .attention import ContiguousKVCache
from .region_encoder import RegionInput
from .superlink import RoutedPayload


@dataclass
class GenerationOutput:
    token_ids: list[int] = field(default_factory=list)  # generated ids; routing tokens in, queries out
    payloads: list[RoutedPayload] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" | "length"
    num_kv_positions: int = 0  # prompt + generated tokens fed + query positions


def _as_ids(input_ids, device) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
    return ids


def prompt_embeddings(model, ids: torch.Tensor, feats: Optional[torch.Tensor],
                      route_ids: dict[int, str], region_feats: Optional[torch.Tensor] = None,
                      ) -> tuple[torch.Tensor, list[tuple[str, int, int, int]]]:
    """Prompt ids [T] -> (input embeddings [T', hidden] with the query rows of the prompt's routing tokens,
    [(route, index of the routing token in ids, first query position, K)])."""
    embeds = model.embed_inputs(ids, feats, region_feats)
    ids_l = ids.tolist()
    pieces, spans, pos, i = [], [], 0, 0
    while i < len(ids_l):
        route = route_ids.get(ids_l[i])
        if route is None:
            i += 1
            continue
        rows = model.query_embeddings(route).to(embeds.dtype)
        k = rows.shape[0]
        spelled = get_route(route).prompt_query_tokens(k)
        given = spelled is not None and ids_l[i + 1:i + 1 + k] == [model.special_ids.get(t) for t in spelled]
        pieces.append(embeds[pos:i + 1])
        start = sum(p.shape[0] for p in pieces)
        pieces.append(rows)
        spans.append((route, i, start, k))
        pos = i + 1 + (k if given else 0)
        i = pos
    pieces.append(embeds[pos:])
    return torch.cat(pieces), spans


@torch.inference_mode()
def reference_generate(model, input_ids: Sequence[int] | torch.Tensor,
                       pixel_values: Optional[Sequence[torch.Tensor]] = None,
                       params: Optional[SamplingParams] = None,
                       route_ids: Optional[dict[int, str]] = None,
                       logits_processor: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
                       regions: Optional[Sequence[RegionInput]] = None,
                       ) -> GenerationOutput:
    """Generate for one prompt. pixel_values: per image [n_tiles, 3, S, S] (prompt order); regions: one
    per `<region>` token, in prompt order (`model.encode_regions`: the whole CLIP tower on each region's
    image canvas, then the region encoder).

    logits_processor(step, logits [V]) -> logits runs before sampling at each step
    (step = index of the token being sampled); tests use it to force a token.
    """
    params = params or SamplingParams()
    route_ids = model.route_ids if route_ids is None else route_ids
    eos = model.cfg.llm.eos_token_id
    ids = _as_ids(input_ids, model.device)
    feats = None
    if pixel_values:
        feats = torch.cat([model.encode_images(p) for p in pixel_values])
    region_feats = model.encode_regions(list(pixel_values or []), list(regions)) if regions else None
    cache = ContiguousKVCache(model.cfg.llm.num_hidden_layers)
    embeds, spans = prompt_embeddings(model, ids, feats, route_ids, region_feats)
    hidden = model.llm.forward(embeds, torch.arange(embeds.shape[0], device=ids.device), cache)
    logits = model.llm.logits(hidden[-1])
    seed = params.resolved_seed()
    out = GenerationOutput()
    out.payloads = [RoutedPayload(r, i, hidden[a:a + k].clone(), source="prompt") for r, i, a, k in spans]
    while True:
        if logits_processor is not None:
            logits = logits_processor(len(out.token_ids), logits)
        tok = sample_token(logits, params, seed, step=len(out.token_ids))
        out.token_ids.append(tok)
        if (tok == eos and not params.ignore_eos) or tok in params.stop_token_ids:
            out.finish_reason = "stop"
            break
        route = route_ids.get(tok)
        done = len(out.token_ids) >= params.max_tokens
        if done and route is None:
            break
        step = model.llm.embed(torch.tensor([tok], device=ids.device))
        if route is not None:
            step = torch.cat([step, model.query_embeddings(route).to(step.dtype)])
        pos = len(cache)
        hidden = model.llm.forward(step, torch.arange(pos, pos + step.shape[0], device=ids.device), cache)
        if route is not None:
            out.payloads.append(RoutedPayload(route, len(out.token_ids) - 1, hidden[1:].clone()))
        if done:
            break
        logits = model.llm.logits(hidden[-1])
    out.num_kv_positions = len(cache)
    return out
