"""Reference generation: one request, contiguous KV cache, super-link insertion exactly as
DESIGN.md section 1 says. This is what the engine's outputs are checked against.

After a routing token is sampled, the next step feeds 1 + K positions: the routing token
itself, then the K query embeddings of its table. The K positions occupy KV cache slots but
are not output tokens; their final-norm hidden states are the payload; the next token is
sampled from the last query position.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..sampling import SamplingParams, sample_token
from .attention import ContiguousKVCache
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


@torch.inference_mode()
def reference_generate(model, input_ids: Sequence[int] | torch.Tensor,
                       pixel_values: Optional[Sequence[torch.Tensor]] = None,
                       params: Optional[SamplingParams] = None,
                       route_ids: Optional[dict[int, str]] = None,
                       logits_processor: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
                       ) -> GenerationOutput:
    """Generate for one prompt. pixel_values: per image [n_tiles, 3, S, S] (prompt order).

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
    cache = ContiguousKVCache(model.cfg.llm.num_hidden_layers)
    hidden = model.llm.forward(model.embed_inputs(ids, feats), torch.arange(ids.numel(), device=ids.device), cache)
    logits = model.llm.logits(hidden[-1])
    gen = params.make_generator()
    out = GenerationOutput()
    while True:
        if logits_processor is not None:
            logits = logits_processor(len(out.token_ids), logits)
        tok = sample_token(logits, params, gen, step=len(out.token_ids))
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
