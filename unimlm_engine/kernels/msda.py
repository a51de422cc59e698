"""Triton multi-scale deformable attention forward (math: unimlm_engine/kernels/README_msda.md).

One program per (block of BLOCK_Q queries, batch*head): it holds a [BLOCK_Q, BLOCK_D]
fp32 accumulator covering all D channels of its head and walks the L*P samples
(L and P constexpr, fully unrolled). Each sample gathers 4 bilinear corners as
[BLOCK_Q, BLOCK_D] rows of `value`; corners outside the level contribute 0.
Location math and accumulation are fp32 whatever the data dtype; addresses are int64.

Tested on CPU under TRITON_INTERPRET=1 (fp32, fp16). On a GPU: this kernel and the CUDA one
(csrc/kernels/msda.cu) ran on an H100 in an A/B check against the reference; bf16 correctness
and timing against the classic kernel are steps of benchmarks/gpu_suite.sh.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_Q, num_warps) picked by the launcher from D: one program covers BLOCK_Q*BLOCK_D outputs.
_CONFIGS = {16: (64, 4), 32: (32, 4), 64: (16, 4), 128: (8, 4)}


@triton.jit
def _corner(value_ptr, row0, h, w, yi, xi, cw, d_off, d_mask, stride_s):
    """Weighted gather of one bilinear corner: [BQ, BD] fp32 (0 outside the level)."""
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    s = row0 + yi.to(tl.int64) * w + xi.to(tl.int64)  # [BQ] int64 row in S
    ptrs = value_ptr + (s * stride_s)[:, None] + d_off[None, :]
    v = tl.load(ptrs, mask=inside[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    return v * tl.where(inside, cw, 0.0)[:, None]


@triton.jit
def _msda_fwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
                     S, M, Lq, D, stride_s,
                     L: tl.constexpr, P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
                     SOFTMAX: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_nm = tl.program_id(1)
    n = (pid_nm // M).to(tl.int64)
    m = (pid_nm % M).to(tl.int64)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BQ]
    q_mask = q < Lq
    d_off = tl.arange(0, BLOCK_D)  # [BD]
    d_mask = d_off < D
    nqm = (n * Lq + q.to(tl.int64)) * M + m  # [BQ] int64 index of (n, q, m)
    attn_base = nqm * (L * P)
    # stride_s = M*D is its own argument so the JIT sees its divisibility (vector loads).
    value_base = value_ptr + n * S * stride_s + m * D

    if SOFTMAX:
        # Max then sum over the L*P logits of each query (fp32); two passes keep a -inf
        # (masked) logit harmless as long as one logit is finite.
        run_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        for i in tl.static_range(L * P):
            logit = tl.load(attn_ptr + attn_base + i, mask=q_mask, other=0.0).to(tl.float32)
            run_max = tl.maximum(run_max, logit)
        run_sum = tl.zeros([BLOCK_Q], tl.float32)
        for i in tl.static_range(L * P):
            logit = tl.load(attn_ptr + attn_base + i, mask=q_mask, other=0.0).to(tl.float32)
            run_sum += tl.exp(logit - run_max)

    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for lvl in tl.static_range(L):
        h = tl.load(shapes_ptr + 2 * lvl)
        w = tl.load(shapes_ptr + 2 * lvl + 1)
        row0 = tl.load(starts_ptr + lvl)
        hf = h.to(tl.float32)
        wf = w.to(tl.float32)
        for pt in tl.static_range(P):
            i = lvl * P + pt
            a = tl.load(attn_ptr + attn_base + i, mask=q_mask, other=0.0).to(tl.float32)  # [BQ]
            if SOFTMAX:
                a = tl.exp(a - run_max) / run_sum
            lx = tl.load(loc_ptr + (attn_base + i) * 2, mask=q_mask, other=0.0).to(tl.float32)
            ly = tl.load(loc_ptr + (attn_base + i) * 2 + 1, mask=q_mask, other=0.0).to(tl.float32)
            # Clamping far-outside points keeps the int32 cast defined; they stay fully outside.
            x = tl.minimum(tl.maximum(lx * wf - 0.5, -2.0), wf + 1.0)
            y = tl.minimum(tl.maximum(ly * hf - 0.5, -2.0), hf + 1.0)
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            fx = x - x0f
            fy = y - y0f
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            sample = _corner(value_base, row0, h, w, y0, x0, (1.0 - fy) * (1.0 - fx), d_off, d_mask, stride_s)
            sample += _corner(value_base, row0, h, w, y0, x0 + 1, (1.0 - fy) * fx, d_off, d_mask, stride_s)
            sample += _corner(value_base, row0, h, w, y0 + 1, x0, fy * (1.0 - fx), d_off, d_mask, stride_s)
            sample += _corner(value_base, row0, h, w, y0 + 1, x0 + 1, fy * fx, d_off, d_mask, stride_s)
            acc += sample * a[:, None]

    out_ptrs = out_ptr + (nqm * D)[:, None] + d_off[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


def ms_deform_attn_triton(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                          sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                          softmax_weights: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """value: [N, S, M, D], sampling_locations: [N, Lq, M, L, P, 2] -> [N, Lq, M*D] in value.dtype.

    `out` ([N, Lq, M*D], contiguous, value.dtype) is written in place when given."""
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    assert all(t.is_contiguous() for t in tensors), "ms_deform_attn_triton: inputs must be contiguous"
    assert spatial_shapes.dtype == torch.int64 and level_start_index.dtype == torch.int64
    assert value.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert sampling_locations.dtype == attention_weights.dtype
    assert attention_weights.shape == (n, lq, m, n_levels, n_points)
    if out is None:
        out = torch.empty((n, lq, m * d), device=value.device, dtype=value.dtype)
    assert out.shape == (n, lq, m * d) and out.dtype == value.dtype and out.is_contiguous()
    if out.numel() == 0:
        return out
    block_d = max(16, triton.next_power_of_2(d))
    block_q, num_warps = _CONFIGS.get(block_d, (4, 4))
    grid = (triton.cdiv(lq, block_q), n * m)
    _msda_fwd_kernel[grid](value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out,
                           s, m, lq, d, m * d, L=n_levels, P=n_points, BLOCK_Q=block_q, BLOCK_D=block_d,
                           SOFTMAX=softmax_weights, num_warps=num_warps)
    return out
