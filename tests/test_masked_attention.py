"""ops/masked_attention.py: the row-tiled attention equals the dense masked SDPA (values and gradients) on
UniPose's group mask and on random banded masks, and the tiled path is the one taken; the cached group mask
(unipose/network.py group_mask) equals group_self_attention and its spans cover it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unimlm_engine.model.decoders.unipose.network import group_mask, group_self_attention
from unimlm_engine.ops.masked_attention import MIN_SAVING, TILE, SparseMask, column_spans, masked_sdpa


def _check(allowed: torch.Tensor, b: int, heads: int = 4, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dense = allowed.allowed if isinstance(allowed, SparseMask) else allowed
    lq, lk = dense.shape[-2:]
    q = torch.randn(b, heads, lq, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, heads, lk, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, heads, lk, d, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(b, heads, lq, d, generator=g, dtype=torch.float64)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    gw = torch.autograd.grad((want.nan_to_num() * up).sum(), (q, k, v), allow_unused=True)
    got = masked_sdpa(q, k, v, allowed)
    gg = torch.autograd.grad((got.nan_to_num() * up).sum(), (q, k, v), allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, equal_nan=True)
    for a, w in zip(gg, gw):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-10, equal_nan=True)


def _tiled_fraction(allowed: torch.Tensor) -> float:
    spans = column_spans(allowed)
    return sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in spans) / (allowed.shape[-2] * allowed.shape[-1])


def test_unipose_group_mask():
    km = torch.zeros(3, 69, dtype=torch.bool)
    km[:, 0] = True
    for i, n in enumerate((3, 17, 68)):
        km[i, 1:1 + n] = True
    allowed = group_self_attention(km, 50)  # [3, 1, 3450, 3450]
    frac = _tiled_fraction(allowed)
    assert frac * MIN_SAVING < 1, frac  # the tiled path is taken (about a tenth of the dense scores)
    _check(allowed, b=3, heads=2)


def test_spans_hold_every_allowed_column():
    g = torch.Generator().manual_seed(1)
    lq = lk = 700
    r = torch.arange(lq)
    allowed = ((r[:, None] - r[None, :]).abs() < 40) & (torch.rand(2, 1, lq, lk, generator=g) < 0.7)
    allowed[1, 0, 650:, :] = True  # late rows that see everything, as the group mask's last rows do
    for r0, r1, c0, c1 in column_spans(allowed):
        outside = allowed[..., r0:r1, :].clone()
        outside[..., c0:c1] = False
        assert not outside.any()
        assert r1 - r0 <= TILE
    _check(allowed, b=2)


def test_fully_masked_rows_and_broadcast_batch():
    lq = lk = 600
    r = torch.arange(lq)
    allowed = ((r[:, None] - r[None, :]).abs() < 20)[None, None].clone()  # [1, 1, L, L], broadcast over B
    allowed[..., 300:310, :] = False  # rows with nothing to attend to: NaN in the dense call, the same here
    assert _tiled_fraction(allowed) * MIN_SAVING < 1
    _check(allowed, b=2)


@pytest.mark.parametrize("shape", [(1, 1, 1, 300), (1, 1, 100, 100)])
def test_dense_calls_where_tiling_does_not_pay(shape):
    allowed = torch.ones(shape, dtype=torch.bool)
    allowed[..., -1] = False
    _check(allowed, b=2)


def test_group_mask_cache_equals_the_mask_and_covers_it():
    km = torch.zeros(4, 69, dtype=torch.bool)
    km[:, 0] = True
    for i, n in enumerate((3, 4, 3, 68)):
        km[i, 1:1 + n] = True
    got = group_mask(km, 50)
    assert torch.equal(got.allowed, group_self_attention(km, 50))
    for r0, r1, c0, c1 in got.spans:  # the merged spans hold every row's allowed columns
        outside = got.allowed[..., r0:r1, :].clone()
        outside[..., c0:c1] = False
        assert not outside.any()
    again = group_mask(km[:1].expand(3, -1), 50)  # one validity row: its cached mask, expanded over the batch
    assert again.allowed.stride(0) == 0 and torch.equal(again.allowed[2], got.allowed[0])
    assert again.allowed.data_ptr() == group_mask(km[2:3], 50).allowed.data_ptr()
    _check(again, b=3, heads=2)
