"""Token sampling, shared by the reference generation loop and the engine (one implementation).

Greedy when temperature == 0 (argmax of the fp32 logits plus logit_bias); otherwise temperature, then
top-k, then top-p (nucleus, on the top-k renormalised probabilities; the top token always stays), then
an exponential race: token = argmax_v p_v / E_v with E_v = -log(u_v) ~ Exp(1), which draws v with
probability p_v. The uniforms come from a counter-based hash of (seed, step, v) (`uniforms`), so a
request's tokens depend only on its seed and the token index: the same whatever the batch it runs in,
with no generator state to carry, and computed on the logits' device (no host sync).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None  # None: a random seed per request
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
        if any(not s for s in self.stop):
            raise ValueError("SamplingParams: stop strings must be non-empty")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.forced_prefix = tuple(int(t) for t in self.forced_prefix)
        if len(self.forced_prefix) > self.max_tokens:
            raise ValueError(f"SamplingParams: forced_prefix has {len(self.forced_prefix)} tokens, more than "
                             f"max_tokens={self.max_tokens}")

    def resolved_seed(self) -> int:
        """The seed to sample with: `seed`, or a fresh random one when None."""
        return int(self.seed) if self.seed is not None else random.getrandbits(62)


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32): split in 16-bit halves so no product leaves int64."""
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniforms(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """seeds, steps: [n] int64 -> [n, vocab] float64 in (0, 1), a pure function of (seed, step, v)."""
    s = seeds.to(torch.int64)
    row = _fmix32((s >> 32) & _M32 ^ 0x9E3779B9)
    row = _fmix32(row ^ (s & _M32))
    row = _fmix32(row ^ (steps.to(torch.int64) & _M32))  # [n]
    col = _fmix32(torch.arange(vocab, device=s.device, dtype=torch.int64) * 0x27D4EB2F & _M32)  # [V]
    h = _fmix32(row[:, None] ^ col[None, :])
    return (h.double() + 0.5) * (1.0 / 4294967296.0)


def _filter(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """x: [m, V] scaled logits -> x with -inf outside each row's top-k, then outside its top-p nucleus."""
    srt, order = torch.sort(x, dim=-1, descending=True)
    rank = torch.arange(x.shape[-1], device=x.device)[None, :]
    k = torch.where(top_k > 0, top_k, x.shape[-1])[:, None]
    srt = srt.masked_fill(rank >= k, float("-inf"))
    p = torch.softmax(srt, dim=-1)
    keep = (torch.cumsum(p, dim=-1) - p) < top_p[:, None]  # the top token always stays
    return torch.full_like(x, float("-inf")).scatter(1, order, srt.masked_fill(~keep, float("-inf")))


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                seeds: torch.Tensor, steps: torch.Tensor, filtered: bool = True) -> torch.Tensor:
    """Random sampling of every row. logits: [m, V] fp32 (bias applied); temperature (> 0), top_p: [m]
    float; top_k, seeds, steps: [m] int64 -> [m] int64. filtered=False skips top-k / top-p (all rows
    have top_k == 0 and top_p == 1)."""
    x = logits / temperature[:, None]
    if filtered:
        x = _filter(x, top_k, top_p)
    probs = torch.softmax(x, dim=-1).double()
    race = probs / -torch.log(uniforms(seeds, steps, logits.shape[-1]))
    return race.argmax(-1)


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    if not bias:
        return logits
    logits = logits.clone()
    for tok, b in bias.items():
        logits[..., tok] += b
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, seed: int, step: int = 0) -> int:
    """logits: [V] -> one token id (the reference's per-request call; the engine batches the same math).
    step: index of the token among the generated ones; seed: params.resolved_seed() of the request."""
    if step < len(params.forced_prefix):
        return params.forced_prefix[step]
    logits = apply_logit_bias(logits.float(), params.logit_bias)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    dev = logits.device
    tok = sample_rows(logits[None], torch.tensor([params.temperature], device=dev),
                      torch.tensor([params.top_k], device=dev), torch.tensor([params.top_p], device=dev),
                      torch.tensor([seed], device=dev), torch.tensor([step], device=dev),
                      filtered=params.top_k > 0 or params.top_p < 1.0)
    return int(tok[0])
