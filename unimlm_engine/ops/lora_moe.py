"""Fused LoRA-MoE linear: `unimlm::lora_moe_linear`.

    o = x W0^T + (alpha / r) * B_cat (g (x) (A_cat x)),   g = softmax(x Wg^T) in fp32

Shapes (the concatenated layout the kernel reads; expert i owns rows i*r:(i+1)*r of A_cat
and columns i*r:(i+1)*r of B_cat):
    x:       [T, K]        tokens
    w0:      [N, K]        frozen base weight (nn.Linear layout)
    w_router:[E, K]        dense router
    lora_a:  [E*r, K]      A_cat
    lora_b:  [N, E*r]      B_cat
    returns  [T, N]        in x.dtype
"""
from __future__ import annotations

import functools

import torch

from ._dispatch import custom_op, pick, triton_launch_guard


def lora_moe_reference(x: torch.Tensor, w0: torch.Tensor, w_router: torch.Tensor, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """fp32 reference of the concatenated form (one rank-E*r LoRA with gate-scaled middle)."""
    e = w_router.shape[0]
    r = lora_a.shape[0] // e
    xf = x.float()
    gate = torch.softmax(xf @ w_router.float().t(), dim=-1)  # [T, E]
    mid = (xf @ lora_a.float().t()).view(-1, e, r) * gate.unsqueeze(-1)  # [T, E, r]
    out = xf @ w0.float().t() + scaling * (mid.reshape(-1, e * r) @ lora_b.float().t())
    return out.to(x.dtype)


def lora_moe_per_expert_loop(x: torch.Tensor, w0: torch.Tensor, w_router: torch.Tensor, lora_a: torch.Tensor,
                             lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The LoRAMoE formulation, expert by expert, in fp32: W0 x + s * sum_i g_i B_i A_i x."""
    e = w_router.shape[0]
    r = lora_a.shape[0] // e
    xf = x.float()
    gate = torch.softmax(xf @ w_router.float().t(), dim=-1)
    out = xf @ w0.float().t()
    for i in range(e):
        a_i = lora_a[i * r:(i + 1) * r].float()
        b_i = lora_b[:, i * r:(i + 1) * r].float()
        out = out + scaling * gate[:, i:i + 1] * ((xf @ a_i.t()) @ b_i.t())
    return out.to(x.dtype)


def _check(x, w0, w_router, lora_a, lora_b) -> None:
    if x.dim() != 2:
        raise ValueError(f"lora_moe_linear: x must be [T, K], got {tuple(x.shape)}")
    t, k = x.shape
    n = w0.shape[0]
    e = w_router.shape[0]
    if w0.shape != (n, k) or w_router.shape != (e, k):
        raise ValueError(f"lora_moe_linear: w0 {tuple(w0.shape)} / w_router {tuple(w_router.shape)} do not match K={k}")
    if lora_a.shape[1] != k or lora_a.shape[0] % e or lora_b.shape != (n, lora_a.shape[0]):
        raise ValueError(f"lora_moe_linear: lora_a {tuple(lora_a.shape)} / lora_b {tuple(lora_b.shape)} do not match "
                         f"E={e}, K={k}, N={n}")


@custom_op("unimlm::lora_moe_linear", mutates_args=())
def lora_moe_linear(x: torch.Tensor, w0: torch.Tensor, w_router: torch.Tensor, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    _check(x, w0, w_router, lora_a, lora_b)
    impl = _triton_impl()
    if pick(x, has_triton=impl is not None) == "triton":
        with triton_launch_guard():
            return impl(x, w0, w_router, lora_a, lora_b, scaling)
    return lora_moe_reference(x, w0, w_router, lora_a, lora_b, scaling)


@lora_moe_linear.register_fake
def _(x, w0, w_router, lora_a, lora_b, scaling):
    return x.new_empty((x.shape[0], w0.shape[0]))


@functools.cache
def _triton_impl():
    """The two-launch Triton kernel (unimlm_engine/kernels/lora_moe.py), or None when Triton cannot be imported."""
    try:
        from unimlm_engine.kernels.lora_moe import lora_moe_triton
    except ImportError:
        return None
    return lora_moe_triton
