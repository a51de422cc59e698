"""Token sampling shared by the reference generation loop and the engine.

Greedy when temperature == 0; otherwise temperature, then top-k, then top-p (nucleus) on
fp32 logits, drawn with a per-request `torch.Generator` so a seed reproduces a request.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # token id -> additive bias on its logit (e.g. forbid a routing token)
    logit_bias: dict[int, float] = field(default_factory=dict)
    # the first generated tokens are these, whatever the model says (e.g. force a route);
    # they are fed and routed exactly like sampled tokens
    forced_prefix: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams: max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams: temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams: top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams: top_k must be >= 0, got {self.top_k}")
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.forced_prefix = tuple(int(t) for t in self.forced_prefix)
        if len(self.forced_prefix) > self.max_tokens:
            raise ValueError(f"SamplingParams: forced_prefix has {len(self.forced_prefix)} tokens, more than "
                             f"max_tokens={self.max_tokens}")

    def make_generator(self) -> Optional[torch.Generator]:
        if self.temperature == 0:
            return None
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    if not bias:
        return logits
    logits = logits.clone()
    for tok, b in bias.items():
        logits[..., tok] += b
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator],
                 step: int = 0) -> int:
    """logits: [V] -> one token id; `step` = index of the token among the generated ones."""
    if step < len(params.forced_prefix):
        return params.forced_prefix[step]
    logits = apply_logit_bias(logits.float(), params.logit_bias)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p  # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
