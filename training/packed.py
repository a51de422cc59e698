"""The training LLM's attention over a batch of sequences (train_shapes.llm_forward): packed without padding,
the shared system prompt once (PackedCausal), and the padded batch it is tested against (PaddedCausal)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class PaddedCausal:
    """The LLM's attention interface over B right-padded sequences of length L packed as [B * L]."""

    def __init__(self, b: int, length: int):
        self.b, self.length = b, length

    def forward(self, layer_idx, q, k, v, scale):
        b, n = self.b, self.length
        q, k, v = (x.view(b, n, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(b * n, q.shape[1], q.shape[3])


class _Pad(torch.autograd.Function):
    """Packed rows -> right-padded [B, L, ...] (PackedCausal.pad). The backward is two gathers (each sequence's
    own rows; the prefix summed over the sequences): the autograd of an indexed gather would be a serial
    accumulating scatter on the CPU (~15% of the LLM's step)."""

    @staticmethod
    def forward(ctx, x, attn):
        ctx.attn = attn
        out = x.index_select(0, attn.gather).view(attn.b, attn.length, *x.shape[1:])
        return out.masked_fill(~attn.valid.view(attn.b, attn.length, *[1] * (x.dim() - 1)), 0)

    @staticmethod
    def backward(ctx, g):
        a = ctx.attn
        gx = g.flatten(0, 1).index_select(0, a.scatter)
        if a.b > 1 and a.prefix:
            gx[:a.prefix] += g[1:, :a.prefix].sum(0)
        return gx, None


class _Unpad(torch.autograd.Function):
    """Right-padded [B, L, ...] -> packed rows, the prefix read from sequence 0 (PackedCausal.unpad)."""

    @staticmethod
    def forward(ctx, y, attn):
        ctx.attn = attn
        return y.flatten(0, 1).index_select(0, attn.scatter)

    @staticmethod
    def backward(ctx, g):
        a = ctx.attn
        gy = g.index_select(0, a.gather).view(a.b, a.length, *g.shape[1:])
        return gy.masked_fill(~a.read.view(a.b, a.length, *[1] * (g.dim() - 1)), 0), None


class PackedCausal:
    """The LLM's attention interface over B causal sequences packed without padding: the rows are the first
    `prefix` tokens, which every sequence shares (the system prompt up to the image), once, then each sequence's
    tokens after them. The linear layers run on these rows only (a joint step's padded batch is ~22% padding
    and the shared prompt another ~20%); attention builds the right-padded [B, L] batch from the rows (the
    prefix in every sequence; causal, so no real query sees a pad key) and returns the real rows. The same
    function as PaddedCausal on the padded batch: the prefix's hidden states are the same in every sequence
    (causal attention, same tokens and positions), and the gradients through its K / V sum over the sequences
    that read them (tests/test_shapes_model.py compares both)."""

    def __init__(self, lens: list[int], prefix: int, device):
        self.b, self.length, self.prefix = len(lens), max(lens), prefix
        gather = torch.zeros(self.b, self.length, dtype=torch.long)  # padded (b, j) -> packed row (pads: 0)
        scatter = list(range(prefix))  # packed row -> flat padded index (the prefix: sequence 0's rows)
        row = prefix
        for b, n in enumerate(lens):
            gather[b, :prefix] = torch.arange(prefix)
            gather[b, prefix:n] = torch.arange(row, row + n - prefix)
            scatter += range(b * self.length + prefix, b * self.length + n)
            row += n - prefix
        self.gather = gather.flatten().to(device)
        self.scatter = torch.tensor(scatter, dtype=torch.long, device=device)
        self.valid = (torch.arange(self.length) < torch.tensor(lens)[:, None]).to(device)
        self.read = self.valid.clone()  # the padded rows unpad reads: the prefix rows of sequences 1.. are not
        self.read[1:, :prefix] = False
        self.watch = None  # training only: aids.AttentionTargets, shown each layer's q and k

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Packed rows [rows, ...] -> right-padded [B, L, ...] (pads: 0)."""
        return _Pad.apply(x, self)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """Right-padded [B, L, ...] -> packed rows (the prefix from sequence 0)."""
        return _Unpad.apply(x, self)

    def forward(self, layer_idx, q, k, v, scale):
        q, k, v = (self.pad(x).transpose(1, 2) for x in (q, k, v))
        if self.watch is not None:
            self.watch.observe(layer_idx, q, k, scale)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return self.unpad(out.transpose(1, 2))


def shared_prefix(ids, lens: list[int], stop: set[int]) -> int:
    """The length of the token prefix every sequence shares, ended before the first token whose embedding is
    replaced (an image patch, a query token), and before the last token of the shortest sequence."""
    first = ids[0, :min(lens) - 1]
    same = (ids[:, :first.numel()] == first).all(0)
    for t in stop:
        same &= first != t
    bad = (~same).nonzero()
    return int(bad[0, 0]) if bad.numel() else first.numel()
