"""Triton kernels for the LLaMA layer's small ops: (residual add +) RMSNorm, RoPE on q and k, SiLU-and-mul.

Why: a decode step at batch 1 is a chain of small kernels. In eager PyTorch each RMSNorm is ~8 kernels
(cast, pow, mean, add, rsqrt, mul, cast, mul), each RoPE ~7, SiLU x up 2, every residual add 1: about
35 of a layer's ~45 launches are these, and in a CUDA graph each still costs the GPU a few microseconds
of launch gap. Measured on an H200 (RESULTS.md): 4 Vicuna-7B layers at batch 1 took 0.876 ms in a CUDA
graph against a 0.41 ms weight-read floor. Each op here is one launch, with the same rounding points
as the eager code (the sum rounded to the activation dtype before the norm, the normalised value rounded
before the weight multiply, SiLU rounded before the multiply by up), so outputs agree with the
PyTorch reference (`unimlm_engine/ops/layer_ops.py`) to about one unit in the last place.

All three compute in fp32 and run on CUDA, and on CPU only under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, o_ptr, s_ptr, N, eps, stride_x, stride_r, stride_o, stride_s,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:  # s = x + residual, rounded to the activation dtype as torch's add rounds it
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    y = (xf * inv).to(x.dtype).to(tl.float32)  # `xf.to(x.dtype)` in the reference
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * stride_o + cols, (w * y).to(o_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [T, N] (+ residual [T, N]) -> (weight * norm(s), s) with s = x + residual (None without one)."""
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [T, N] with contiguous rows"
    t, n = x.shape
    assert weight.shape == (n,) and weight.is_contiguous()
    out = torch.empty((t, n), device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    s = None
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
        s = torch.empty_like(x, memory_format=torch.contiguous_format)
    if t == 0:
        return out, s
    block = triton.next_power_of_2(n)
    src_r = residual if residual is not None else x
    dst_s = s if s is not None else out
    _rms_norm_kernel[(t,)](x, src_r, weight, out, dst_s, n, eps, x.stride(0), src_r.stride(0), out.stride(0),
                           dst_s.stride(0), HAS_RES=residual is not None, BLOCK=block,
                           num_warps=max(1, min(16, block // 256)))
    return out, s


@triton.jit
def _rope_heads(x_ptr, o_ptr, cos, sin, t, NH, stride_xt, stride_xh, stride_ot, stride_oh, D, HALF,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate-half RoPE of token t's NH heads: o = x cos + rotate_half(x) sin (fp32), one [BLOCK_H, BLOCK_D] tile."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NH) & (d < D)
    base = x_ptr + t * stride_xt + h * stride_xh
    x = tl.load(base + d, mask=mask, other=0.0).to(tl.float32)
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    rot = tl.load(base + partner, mask=mask, other=0.0).to(tl.float32)
    rot = tl.where(d < HALF, -rot, rot)
    out = x * cos + rot * sin
    tl.store(o_ptr + t * stride_ot + h * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, H, HKV, D, HALF, stride_qt, stride_qh,
                 stride_kt, stride_kh, stride_cs, stride_qot, stride_qoh, stride_kot, stride_koh,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    cos = tl.load(cos_ptr + t * stride_cs + d, mask=d < D, other=0.0)
    sin = tl.load(sin_ptr + t * stride_cs + d, mask=d < D, other=0.0)
    if tl.program_id(1) == 0:
        _rope_heads(q_ptr, qo_ptr, cos, sin, t, H, stride_qt, stride_qh, stride_qot, stride_qoh, D, HALF,
                    BLOCK_H, BLOCK_D)
    else:
        _rope_heads(k_ptr, ko_ptr, cos, sin, t, HKV, stride_kt, stride_kh, stride_kot, stride_koh, D, HALF,
                    BLOCK_H, BLOCK_D)


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D], k [T, Hkv, D] (any token / head strides, head_dim contiguous), cos / sin [T, 1, D] fp32
    -> rotated q, k, contiguous, in their dtypes. One launch: grid (T, 2), program (t, 0) takes q's heads."""
    assert q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2]
    assert q.stride(2) == 1 and k.stride(2) == 1, "head_dim must be contiguous"
    t, h, d = q.shape
    hkv = k.shape[1]
    assert d % 2 == 0, "rotate-half RoPE needs an even head_dim"
    cos2, sin2 = cos.reshape(t, d), sin.reshape(t, d)
    assert cos2.dtype == sin2.dtype == torch.float32 and cos2.is_contiguous() and sin2.is_contiguous()
    qo = torch.empty((t, h, d), device=q.device, dtype=q.dtype)
    ko = torch.empty((t, hkv, d), device=k.device, dtype=k.dtype)
    if t == 0:
        return qo, ko
    block_h, block_d = triton.next_power_of_2(max(h, hkv)), triton.next_power_of_2(d)
    _rope_kernel[(t, 2)](q, k, cos2, sin2, qo, ko, h, hkv, d, d // 2, q.stride(0), q.stride(1), k.stride(0),
                         k.stride(1), cos2.stride(0), qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
                         BLOCK_H=block_h, BLOCK_D=block_d, num_warps=max(1, min(8, block_h * block_d // 512)))
    return qo, ko


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, N, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(o_ptr.dtype.element_ty).to(tl.float32)  # F.silu rounds to the dtype
    tl.store(o_ptr + row * stride_o + cols, (act * u).to(o_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up [T, I] (row strides free, columns contiguous) -> [T, I] contiguous."""
    assert gate.dim() == 2 and gate.shape == up.shape and gate.dtype == up.dtype
    assert gate.stride(1) == 1 and up.stride(1) == 1, "columns must be contiguous"
    t, n = gate.shape
    out = torch.empty((t, n), device=gate.device, dtype=gate.dtype)
    if t == 0 or n == 0:
        return out
    block = min(2048, triton.next_power_of_2(n))
    _silu_mul_kernel[(t, triton.cdiv(n, block))](gate, up, out, n, gate.stride(0), up.stride(0), out.stride(0),
                                                BLOCK=block, num_warps=max(1, min(8, block // 256)))
    return out
