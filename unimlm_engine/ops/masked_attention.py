"""Exact attention under a sparse boolean mask: each tile of query rows attends only over the column span that
holds every column any of its rows may see.

UniPose's keypoint decoder layer runs self-attention over 50 groups x 69 queries = 3,450 tokens under the
official group mask (unipose/network.py `group_self_attention`): a row sees its own group and little else, so
the dense [3450 x 3450] SDPA spends most of its work on masked entries. Tiled over rows, the same softmax is
computed over the columns that can be non-zero; the masked-out columns outside a tile's span would contribute
exp(-inf) = 0, so the result is the dense one up to floating-point summation order.

Measured on the 2-core CPU (benchmarks/RESULTS.md, "UniPose group self-attention"); on the GPU the dense
kernel is kept (the tiled path was not measured there).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

TILE = 128  # query rows per tile
MIN_SAVING = 2.0  # tile only when the dense score matrix is at least this many times the tiled one
TILED = True  # False: always the dense call (benchmarks/bench_unipose.py times both)


class SparseMask(NamedTuple):
    """A bool mask with its column spans computed once (for a mask used by several layers or calls)."""
    allowed: torch.Tensor
    spans: list  # column_spans(allowed, TILE)


def column_spans(allowed: torch.Tensor, tile: int = TILE) -> list[tuple[int, int, int, int]]:
    """allowed [..., Lq, Lk] bool -> [(row0, row1, col0, col1)]: per tile of rows, the smallest column range
    that holds every allowed column of those rows (over every batch and head). A tile with no allowed column
    at all gets the full range (so a fully masked row behaves exactly as in the dense call)."""
    lq, lk = allowed.shape[-2:]
    rows = allowed.reshape(-1, lq, lk).any(0).to(torch.uint8)  # [Lq, Lk]
    seen = rows.amax(-1).bool().cpu()
    first = rows.argmax(-1).cpu()  # the first maximum: the first allowed column (0 where none)
    last = lk - 1 - rows.flip(-1).argmax(-1).cpu()
    first[~seen], last[~seen] = lk, -1
    spans = []
    for r0 in range(0, lq, tile):
        r1 = min(lq, r0 + tile)
        c0, c1 = int(first[r0:r1].min()), int(last[r0:r1].max()) + 1
        if c1 <= c0:
            c0, c1 = 0, lk
        spans.append((r0, r1, c0, c1))
    return spans


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | SparseMask | None,
                tile: int = TILE) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask=allowed) for q [B, h, Lq, d], k / v [B, h, Lk, d] and
    allowed a bool mask broadcastable to [B, h, Lq, Lk] (True = may attend), or a SparseMask (its spans were
    computed at TILE). Tiled over the query rows when the mask is sparse enough (on the CPU); otherwise the
    dense call."""
    spans = None
    if isinstance(allowed, SparseMask):
        allowed, spans = allowed.allowed, (allowed.spans if tile == TILE else None)
    if (not TILED or allowed is None or q.device.type != "cpu" or q.shape[-2] <= tile
            or allowed.shape[-2] != q.shape[-2] or type(allowed) is not torch.Tensor
            or torch.compiler.is_compiling()):  # traced graphs (compile, export, FakeTensors): one dense op
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    spans = spans if spans is not None else column_spans(allowed, tile)
    tiled = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in spans)
    if tiled * MIN_SAVING > q.shape[-2] * k.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _TiledSDPA.apply(q, k, v, allowed, spans)
    out = [F.scaled_dot_product_attention(q[..., r0:r1, :], k[..., c0:c1, :], v[..., c0:c1, :],
                                          attn_mask=allowed[..., r0:r1, c0:c1]) for r0, r1, c0, c1 in spans]
    return torch.cat(out, -2)


class _TiledSDPA(torch.autograd.Function):
    """The tiled attention with a backward that writes each tile's gradients into one buffer per input.

    Differentiating the tiles through autograd's slicing gives every tile's q / k / v slice a gradient of the
    full input's size (zeros, then the slice copied in) that is then summed: 3 full-size fills and adds per
    tile, 27 tiles per UniPose keypoint layer, which measured ~0.65 s of a 4-5 s training step on the 2-core
    CPU (torch.profiler, training/train_shapes.py). Here each tile's SDPA runs on detached slices as its own
    small graph; backward runs those graphs and adds their gradients into the row / column ranges of one
    zeroed buffer per input. Same SDPA calls, same gradients up to summation order."""

    @staticmethod
    def forward(ctx, q, k, v, allowed, spans):
        tiles, outs = [], []
        need = (q.requires_grad, k.requires_grad, v.requires_grad)
        with torch.enable_grad():
            for r0, r1, c0, c1 in spans:
                leaves = tuple(x.detach().requires_grad_(n) for x, n in
                               ((q[..., r0:r1, :], need[0]), (k[..., c0:c1, :], need[1]), (v[..., c0:c1, :], need[2])))
                o = F.scaled_dot_product_attention(*leaves, attn_mask=allowed[..., r0:r1, c0:c1])
                tiles.append((leaves, o))
                outs.append(o.detach())
        ctx.tiles, ctx.spans, ctx.need = tiles, spans, need
        ctx.shapes = (q.shape, k.shape, v.shape)
        return torch.cat(outs, -2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        grads = [grad.new_zeros(s) if n else None for s, n in zip(ctx.shapes, ctx.need)]
        for (r0, r1, c0, c1), (leaves, o) in zip(ctx.spans, ctx.tiles):
            wanted = [x for x, n in zip(leaves, ctx.need) if n]
            got = iter(torch.autograd.grad(o, wanted, grad[..., r0:r1, :]))
            for i, (lo, hi) in enumerate(((r0, r1), (c0, c1), (c0, c1))):
                if ctx.need[i]:
                    grads[i][..., lo:hi, :] += next(got)
        ctx.tiles = None
        return grads[0], grads[1], grads[2], None, None
