"""Triton fused LoRA-MoE linear in two launches (math: README_lora_moe.md).

    launch 1  mid[T, E*r] = scaling * gate(x)[:, j // r] * (x A_cat^T)[:, j]   gate = softmax(x Wg^T), fp32
    launch 2  out[T, N]   = [x | mid] @ [W0 | B_cat]^T                       (expand = extra K iterations)

Launch 1 shares each x tile between the router and the shrink; launch 2 is the base GEMM
whose K loop continues over the E*r middle columns. Runs on CUDA, and on CPU only under
TRITON_INTERPRET=1 (tests); the GPU path has not been run in this repository yet.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_EXPERTS = 16
MAX_RANK = 64
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by token count; under the interpreter big tiles are cheapest
# (its cost is per program and per op, not per element)
_GEMM_CONFIGS = {"small_t": (16, 64, 64, 4), "mid_t": (64, 128, 64, 4), "large_t": (128, 128, 64, 8),
                 "interpret": (64, 128, 128, 1)}


@triton.jit
def _router_shrink_kernel(x_ptr, wg_ptr, a_ptr, mid_ptr, T, K, E, R, ER, scaling,
                          stride_xt, stride_wg, stride_a, stride_mt,
                          BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_E: tl.constexpr, F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # middle columns of this program
    e = tl.arange(0, BLOCK_E)
    kk = tl.arange(0, BLOCK_K)
    logits = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    shrink = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    t64 = t.to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        x = tl.load(x_ptr + t64[:, None] * stride_xt + k[None, :], mask=(t < T)[:, None] & (k < K)[None, :],
                    other=0.0)  # [BM, BK], shared by router and shrink
        wg = tl.load(wg_ptr + e[None, :] * stride_wg + k[:, None], mask=(e < E)[None, :] & (k < K)[:, None],
                     other=0.0)  # [BK, BE]
        a = tl.load(a_ptr + j[None, :].to(tl.int64) * stride_a + k[:, None],
                    mask=(j < ER)[None, :] & (k < K)[:, None], other=0.0)  # [BK, BR]
        if F32:
            x = x.to(tl.float32)
            logits += tl.dot(x, wg.to(tl.float32), input_precision="ieee")
            shrink += tl.dot(x, a.to(tl.float32), input_precision="ieee")
        else:
            logits += tl.dot(x, wg)
            shrink += tl.dot(x, a)
    logits = tl.where((e < E)[None, :], logits, float("-inf"))
    mx = tl.max(logits, axis=1)
    p = tl.exp(logits - mx[:, None])
    gates = p / tl.sum(p, axis=1)[:, None]  # [BM, BE] fp32 softmax
    onehot = ((j[None, :] // R) == e[:, None]).to(tl.float32)  # [BE, BR]: column j belongs to expert j // r
    gate_cols = tl.dot(gates, onehot, input_precision="ieee")  # [BM, BR] exact selection
    mid = shrink * gate_cols * scaling
    tl.store(mid_ptr + t64[:, None] * stride_mt + j[None, :], mid.to(mid_ptr.dtype.element_ty),
             mask=(t < T)[:, None] & (j < ER)[None, :])


@triton.jit
def _base_expand_kernel(x_ptr, w0_ptr, mid_ptr, b_ptr, o_ptr, T, N, K, ER,
                        stride_xt, stride_w0, stride_mt, stride_b, stride_ot,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_KR: tl.constexpr, F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    tmask = t < T
    nmask = n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    kk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):  # base GEMM: x W0^T
        k = k0 + kk
        x = tl.load(x_ptr + t[:, None] * stride_xt + k[None, :], mask=tmask[:, None] & (k < K)[None, :], other=0.0)
        w = tl.load(w0_ptr + n[None, :] * stride_w0 + k[:, None], mask=nmask[None, :] & (k < K)[:, None], other=0.0)
        if F32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    kr = tl.arange(0, BLOCK_KR)
    for j0 in range(0, ER, BLOCK_KR):  # expand: the same accumulator continues over the E*r columns
        j = j0 + kr
        m = tl.load(mid_ptr + t[:, None] * stride_mt + j[None, :], mask=tmask[:, None] & (j < ER)[None, :],
                    other=0.0)  # [BM, BKR]
        bt = tl.load(b_ptr + n[None, :] * stride_b + j[:, None], mask=nmask[None, :] & (j < ER)[:, None],
                     other=0.0)  # [BKR, BN]
        if F32:
            acc += tl.dot(m.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(m, bt)
    tl.store(o_ptr + t[:, None] * stride_ot + n[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=tmask[:, None] & nmask[None, :])


def _config(t: int) -> tuple[int, int, int, int]:
    if _INTERPRET:
        bm, bn, bk, warps = _GEMM_CONFIGS["interpret"]
        return (16 if t <= 16 else bm), bn, bk, warps
    return _GEMM_CONFIGS["small_t" if t <= 32 else ("mid_t" if t <= 1024 else "large_t")]


def lora_moe_triton(x: torch.Tensor, w0: torch.Tensor, w_router: torch.Tensor, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """x: [T, K], w0: [N, K], w_router: [E, K], lora_a: [E*r, K], lora_b: [N, E*r] -> [T, N] (x.dtype)."""
    assert x.dtype == w0.dtype == w_router.dtype == lora_a.dtype == lora_b.dtype, "one dtype for all operands"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    for name, t_ in (("x", x), ("w0", w0), ("w_router", w_router), ("lora_a", lora_a), ("lora_b", lora_b)):
        assert t_.stride(-1) == 1, f"{name} must have a contiguous last dimension"
    t, k = x.shape
    n, e, er = w0.shape[0], w_router.shape[0], lora_a.shape[0]
    assert 1 <= e <= MAX_EXPERTS and er // e <= MAX_RANK, f"E <= {MAX_EXPERTS}, r <= {MAX_RANK}"
    out = torch.empty((t, n), device=x.device, dtype=x.dtype)
    if t == 0:
        return out
    f32 = x.dtype == torch.float32 or (_INTERPRET and x.dtype == torch.bfloat16)
    bm, bn, bk, warps = _config(t)
    mid = torch.empty((t, er), device=x.device, dtype=x.dtype)
    block_r = max(16, min(64, triton.next_power_of_2(er)))
    _router_shrink_kernel[(triton.cdiv(t, bm), triton.cdiv(er, block_r))](
        x, w_router, lora_a, mid, t, k, e, er // e, er, scaling,
        x.stride(0), w_router.stride(0), lora_a.stride(0), mid.stride(0),
        BLOCK_M=bm, BLOCK_R=block_r, BLOCK_K=bk, BLOCK_E=MAX_EXPERTS, F32=f32, num_warps=4)
    _base_expand_kernel[(triton.cdiv(t, bm), triton.cdiv(n, bn))](
        x, w0, mid, lora_b, out, t, n, k, er,
        x.stride(0), w0.stride(0), mid.stride(0), lora_b.stride(0), out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_KR=max(16, min(bk, triton.next_power_of_2(er))), F32=f32,
        num_warps=warps)
    return out
