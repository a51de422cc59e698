"""Triton fused LoRA-MoE linear in two launches (math: README_lora_moe.md).

    launch 1  part[s, t, :] = x[t, K_s] @ [Wg ; A_cat][:, K_s]^T       fp32 partial sums, K slice s of SPLITS
    launch 2  out[T, N] = x @ W0^T + mid @ B_cat^T,  mid[t, j] = scaling * g[t, j // r] * sum_s part[s, t, E + j]
              with g = softmax(sum_s part[s, :, :E]) (fp32)

Launch 1 is the router and the shrink as one skinny product against the stacked rows
[Wg ; A_cat] ([E + E r, K]). Up to SPLIT_MAX_T tokens (decode) it is split over K so that a
handful of tokens still runs on many programs, and launch 2, the base GEMM whose K loop
continues over the E r middle columns, reduces the partials, takes the softmax gate and scales
the middle activations before those extra iterations (GATED=False). With more tokens launch 1
holds whole rows (one split, one column tile), applies the gate itself and stores mid
(GATED=True): the gate prologue in launch 2 nearly doubles its registers at BM >= 64 (half the
occupancy, 1.25-2x slower on an H100), while at BM = 16 it costs a few microseconds. Runs on
CUDA, and on CPU only under TRITON_INTERPRET=1 (tests).

The base product x W0^T has two owners (`base`, $UNIMLM_LORA_MOE_BASE): "cublas" (default) runs
torch's GEMM first and launch 2 skips its K loop, adding the expand to that output in place (BASE=False);
"triton" is launch 2's own K loop as above. Measured on GPUs so far (RESULTS.md), the K loop alone kept
the fused linear at 1.5-2.9x cuBLAS's x W0^T; which base wins at each T is for the next GPU run to show
(benchmarks/bench_lora_moe.py and the GPU suite time both).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from unimlm_engine.config.model import LORA_MOE_MAX_EXPERTS, LORA_MOE_MAX_RANK

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_EXPERTS = LORA_MOE_MAX_EXPERTS
MAX_RANK = LORA_MOE_MAX_RANK
MAX_SPLITS = 16  # launch 2 unrolls its partial-sum reduction over the splits
BASES = ("cublas", "triton")  # who computes x W0^T (lora_moe_triton)
SPLIT_MAX_T = 64  # K is split for at most this many tokens (decode batches); more tokens: launch 1 gates
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by token count; under the interpreter big tiles are cheapest
# (its cost is per program and per op, not per element)
_GEMM_CONFIGS = {"small_t": (16, 64, 64, 4), "mid_t": (64, 128, 64, 4), "large_t": (128, 128, 64, 8),
                 "interpret": (64, 128, 128, 1)}


@triton.jit
def _gate(logits, scaling):
    """[BM, BE] router logits (padded experts -inf) -> scaling * softmax over E, fp32."""
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None] * scaling


@triton.jit
def _select(gates, expert, BLOCK_E: tl.constexpr):
    """gates [BM, BE], expert [BC] int -> [BM, BC] = gates[:, expert] (a gather along the experts;
    out-of-range experts read the last column, masked by the caller)."""
    idx = tl.broadcast_to(tl.minimum(expert, BLOCK_E - 1)[None, :], [gates.shape[0], expert.shape[0]])
    return tl.gather(gates, idx, axis=1)


@triton.jit
def _router_shrink_kernel(x_ptr, wg_ptr, a_ptr, part_ptr, mid_ptr, T, K, E, R, EJ, k_slice, scaling,
                          stride_xt, stride_wg, stride_a, stride_ps, stride_pt, stride_mh, stride_mt,
                          BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                          GATED: tl.constexpr, F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    t = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)  # column of [Wg ; A_cat]: router row j < E, else A_cat row j - E
    is_router = j < E
    is_a = (j >= E) & (j < EJ)
    g_row = tl.where(is_router, j, 0).to(tl.int64)
    a_row = tl.where(is_a, j - E, 0).to(tl.int64)
    tmask = t < T
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_J], tl.float32)
    k_lo = pid_s * k_slice
    k_hi = tl.minimum(k_lo + k_slice, K)  # an empty slice (k_lo >= K) stores zeros
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + kk
        kmask = k < k_hi
        x = tl.load(x_ptr + t[:, None] * stride_xt + k[None, :], mask=tmask[:, None] & kmask[None, :],
                    other=0.0)  # [BM, BK]
        w = tl.load(wg_ptr + g_row[None, :] * stride_wg + k[:, None], mask=is_router[None, :] & kmask[:, None],
                    other=0.0)  # [BK, BJ]
        w += tl.load(a_ptr + a_row[None, :] * stride_a + k[:, None], mask=is_a[None, :] & kmask[:, None], other=0.0)
        if F32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if GATED:  # whole rows here (one split, one tile): mid = gate * shrink, stored as hi + lo in x's dtype
        gates = _gate(tl.where(is_router[None, :], acc, float("-inf")), scaling)  # [BM, BJ], 0 past E
        mid = acc * _select(gates, tl.where(is_a, (j - E) // R, 0), BLOCK_J)
        hi = mid.to(mid_ptr.dtype.element_ty)
        ptrs = mid_ptr + t[:, None] * stride_mt + (j - E)[None, :]
        tl.store(ptrs, hi, mask=tmask[:, None] & is_a[None, :])
        tl.store(ptrs + stride_mh, (mid - hi.to(tl.float32)).to(hi.dtype), mask=tmask[:, None] & is_a[None, :])
    else:
        tl.store(part_ptr + pid_s * stride_ps + t[:, None] * stride_pt + j[None, :], acc,
                 mask=tmask[:, None] & (j < EJ)[None, :])


@triton.jit
def _sum_splits(ptrs, mask, stride_ps, SPLITS: tl.constexpr):
    """sum_s ptrs[s * stride_ps] (fp32); unrolled so the SPLITS loads are in flight together."""
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLITS):
        acc += tl.load(ptrs + s * stride_ps, mask=mask, other=0.0)
    return acc


@triton.jit
def _base_gate_expand_kernel(x_ptr, w0_ptr, part_ptr, mid_ptr, b_ptr, o_ptr, T, N, K, E, R, ER, scaling,
                             stride_xt, stride_w0, stride_ps, stride_pt, stride_mh, stride_mt, stride_b, stride_ot,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_E: tl.constexpr, BLOCK_KR: tl.constexpr, SPLITS: tl.constexpr,
                             GATED: tl.constexpr, F32: tl.constexpr, BASE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    tmask = t < T
    nmask = n < N
    if BASE:  # base GEMM: x W0^T
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        kk = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            x = tl.load(x_ptr + t[:, None] * stride_xt + k[None, :], mask=tmask[:, None] & (k < K)[None, :],
                        other=0.0)
            w = tl.load(w0_ptr + n[None, :] * stride_w0 + k[:, None], mask=nmask[None, :] & (k < K)[:, None],
                        other=0.0)
            if F32:
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(x, w)
    else:  # the base product is already in `out` (cuBLAS): the expand adds to it in place
        acc = tl.load(o_ptr + t[:, None] * stride_ot + n[None, :], mask=tmask[:, None] & nmask[None, :],
                      other=0.0).to(tl.float32)
    rows = part_ptr + t[:, None] * stride_pt
    if not GATED:  # the gate from the router logits summed over the K splits
        e = tl.arange(0, BLOCK_E)
        logits = _sum_splits(rows + e[None, :], tmask[:, None] & (e < E)[None, :], stride_ps, SPLITS)  # [BM, BE]
        gates = _gate(tl.where((e < E)[None, :], logits, float("-inf")), scaling)
    kr = tl.arange(0, BLOCK_KR)
    for j0 in range(0, ER, BLOCK_KR):  # expand: the same accumulator continues over the E*r columns
        j = j0 + kr
        mask = tmask[:, None] & (j < ER)[None, :]
        bt = tl.load(b_ptr + n[None, :] * stride_b + j[:, None], mask=nmask[None, :] & (j < ER)[:, None],
                     other=0.0)  # [BKR, BN]
        # mid as hi + lo in B's dtype: the fp32 mid's precision for one more dot on E*r / K of the work
        if GATED:  # launch 1 stored them
            hi = tl.load(mid_ptr + t[:, None] * stride_mt + j[None, :], mask=mask, other=0.0)  # [BM, BKR]
            lo = tl.load(mid_ptr + stride_mh + t[:, None] * stride_mt + j[None, :], mask=mask, other=0.0)
        else:  # column j belongs to expert j // r
            mid = _sum_splits(rows + (E + j)[None, :], mask, stride_ps, SPLITS) * _select(gates, j // R, BLOCK_E)
            hi = mid.to(bt.dtype)
            lo = (mid - hi.to(tl.float32)).to(bt.dtype)
        if F32:
            acc += tl.dot(hi.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
            acc += tl.dot(lo.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(hi, bt)
            acc += tl.dot(lo, bt)
    tl.store(o_ptr + t[:, None] * stride_ot + n[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=tmask[:, None] & nmask[None, :])


def _config(t: int) -> tuple[int, int, int, int]:
    if _INTERPRET:
        bm, bn, bk, warps = _GEMM_CONFIGS["interpret"]
        return (16 if t <= 16 else bm), bn, bk, warps
    return _GEMM_CONFIGS["small_t" if t <= 32 else ("mid_t" if t <= 1024 else "large_t")]


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pow2_floor(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


def _splits(t: int, bm: int, m_blocks: int, j_blocks: int, k_tiles: int, device: torch.device) -> int:
    """K splits of launch 1 (a power of two <= MAX_SPLITS). Up to SPLIT_MAX_T tokens (decode batches):
    about one program per SM, splits x BM <= 256 (launch 2 reduces splits x BM rows of partials per
    program), none past K's tiles; the interpreter uses up to 4 so tests exercise the reduction.
    Above SPLIT_MAX_T: 1, so launch 1 holds whole rows and applies the gate itself (launch 2's gate
    prologue halves its occupancy at BM >= 64: 1.25-2x slower on an H100 at T = 64..4096)."""
    if t > SPLIT_MAX_T:
        return 1
    programs = 4 if device.type != "cuda" else _sm_count(device.index or 0) // (m_blocks * j_blocks)
    return _pow2_floor(min(programs, MAX_SPLITS // m_blocks, 256 // bm, k_tiles, MAX_SPLITS))


class _Plan(NamedTuple):
    """Tiles and grids of both launches for one call (the launcher's arithmetic, shared with the benchmark)."""
    bm: int
    bn: int
    bk: int
    warps: int
    warps1: int
    block_j: int
    block_kr: int
    splits: int
    k_slice: int
    grid1: tuple[int, int, int]
    grid2: tuple[int, int]
    f32: bool
    gated: bool


def _plan(x: torch.Tensor, n: int, e: int, er: int, splits: int | None = None) -> _Plan:
    t, k = x.shape
    bm, bn, bk, warps = _config(t)
    ej = e + er
    block_j = max(16, min(128 if _INTERPRET else 64, triton.next_power_of_2(ej)))
    m_blocks, j_blocks, k_tiles = triton.cdiv(t, bm), triton.cdiv(ej, block_j), triton.cdiv(k, bk)
    splits = splits or _splits(t, bm, m_blocks, j_blocks, k_tiles, x.device)
    assert splits in (1, 2, 4, 8, 16) and splits <= MAX_SPLITS, f"splits must be a power of two <= {MAX_SPLITS}"
    # launch 2 keeps splits x [BM, BKR] partial loads in flight: narrower middle tiles with more splits
    block_kr = max(16, min(bk, triton.next_power_of_2(er), 4096 // (bm * splits)))
    f32 = x.dtype == torch.float32 or (_INTERPRET and x.dtype == torch.bfloat16)
    # launch 1 gated at BM = 128 needs 8 warps to hold its [BM, BJ] tiles without spilling
    return _Plan(bm, bn, bk, warps, 8 if bm >= 128 else 4, block_j, block_kr, splits,
                 triton.cdiv(k_tiles, splits) * bk, (m_blocks, j_blocks, splits), (m_blocks, triton.cdiv(n, bn)), f32,
                 splits == j_blocks == 1)


def _workspace(plan: _Plan, x: torch.Tensor, e: int, er: int) -> tuple[torch.Tensor, torch.Tensor]:
    """part [splits, T, E + E*r] fp32 (ungated) and mid [2, T, E*r] x.dtype (gated); the unused one is empty."""
    t = x.shape[0]
    part = torch.empty((0, 0, e + er) if plan.gated else (plan.splits, t, e + er), device=x.device, dtype=torch.float32)
    mid = torch.empty((2, t, er) if plan.gated else (0, 0, 0), device=x.device, dtype=x.dtype)
    return part, mid


def _launch_router_shrink(plan: _Plan, x, w_router, lora_a, part, mid, scaling: float):
    """Launch 1: part [splits, T, E + E*r] fp32 partial router logits and shrink, or, gated, mid
    [2, T, E*r] (hi, lo in x.dtype). -> the compiled kernel."""
    t, k = x.shape
    e, er = w_router.shape[0], lora_a.shape[0]
    return _router_shrink_kernel[plan.grid1](
        x, w_router, lora_a, part, mid, t, k, e, er // e, e + er, plan.k_slice, scaling,
        x.stride(0), w_router.stride(0), lora_a.stride(0), part.stride(0), part.stride(1), mid.stride(0),
        mid.stride(1),
        BLOCK_M=plan.bm, BLOCK_J=plan.block_j, BLOCK_K=plan.bk, GATED=plan.gated, F32=plan.f32,
        num_warps=plan.warps1)


def _launch_base_gate_expand(plan: _Plan, x, w0, part, mid, lora_b, scaling: float, out, base: bool = True):
    """Launch 2: out [T, N] = x W0^T + mid B_cat^T (mid gated here from the partials, or read); base=False:
    out += mid B_cat^T (out already holds x W0^T). -> the compiled kernel."""
    t, k = x.shape
    n, er = w0.shape[0], lora_b.shape[1]
    e = part.shape[2] - er
    return _base_gate_expand_kernel[plan.grid2](
        x, w0, part, mid, lora_b, out, t, n, k, e, er // e, er, scaling,
        x.stride(0), w0.stride(0), part.stride(0), part.stride(1), mid.stride(0), mid.stride(1), lora_b.stride(0),
        out.stride(0),
        BLOCK_M=plan.bm, BLOCK_N=plan.bn, BLOCK_K=plan.bk, BLOCK_E=max(16, triton.next_power_of_2(e)),
        BLOCK_KR=plan.block_kr, SPLITS=plan.splits, GATED=plan.gated, F32=plan.f32, BASE=base,
        num_warps=plan.warps)


def default_base() -> str:
    """$UNIMLM_LORA_MOE_BASE (read per call): "cublas" (default) or "triton"; see lora_moe_triton."""
    base = os.environ.get("UNIMLM_LORA_MOE_BASE", "cublas")
    if base not in BASES:
        raise ValueError(f"UNIMLM_LORA_MOE_BASE must be one of {BASES}, got {base!r}")
    return base


def lora_moe_triton(x: torch.Tensor, w0: torch.Tensor, w_router: torch.Tensor, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scaling: float, splits: int | None = None,
                    base: str | None = None) -> torch.Tensor:
    """x: [T, K], w0: [N, K], w_router: [E, K], lora_a: [E*r, K], lora_b: [N, E*r] -> [T, N] (x.dtype).
    splits: launch 1's K splits (a power of two <= MAX_SPLITS; None: by occupancy, `_splits`).
    base: who computes x W0^T (None: `default_base()`). "triton": launch 2's own K loop, the expand continuing
    the same accumulator (one rounding, no extra pass over the output). "cublas": torch's GEMM first, then
    launch 2 adds mid B_cat^T to that output in place (the base rounded to x.dtype once more, one extra read
    and write of [T, N]). Why cuBLAS by default: on an H200 (2026-11-28) the Triton K loop alone made the
    fused linear 1.5-2.9x cuBLAS's x W0^T (0.099 vs 0.034 ms at T = 1), and the expand-add costs a few
    microseconds; README_lora_moe.md has the measured table once a GPU has run both."""
    assert x.dtype == w0.dtype == w_router.dtype == lora_a.dtype == lora_b.dtype, "one dtype for all operands"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    for name, t_ in (("x", x), ("w0", w0), ("w_router", w_router), ("lora_a", lora_a), ("lora_b", lora_b)):
        assert t_.stride(-1) == 1, f"{name} must have a contiguous last dimension"
    base = base or default_base()
    assert base in BASES, f"base must be one of {BASES}"
    t = x.shape[0]
    n, e, er = w0.shape[0], w_router.shape[0], lora_a.shape[0]
    assert 1 <= e <= MAX_EXPERTS and er // e <= MAX_RANK, f"E <= {MAX_EXPERTS}, r <= {MAX_RANK}"
    if t == 0:
        return torch.empty((t, n), device=x.device, dtype=x.dtype)
    out = torch.nn.functional.linear(x, w0) if base == "cublas" else torch.empty((t, n), device=x.device,
                                                                                   dtype=x.dtype)
    plan = _plan(x, n, e, er, splits)
    part, mid = _workspace(plan, x, e, er)
    _launch_router_shrink(plan, x, w_router, lora_a, part, mid, scaling)
    _launch_base_gate_expand(plan, x, w0, part, mid, lora_b, scaling, out, base=base == "triton")
    return out
