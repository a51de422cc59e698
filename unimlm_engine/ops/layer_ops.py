"""The LLaMA layer's small ops as one launch each on CUDA: `unimlm::rms_norm`, `unimlm::add_rms_norm`,
`unimlm::rope`, `unimlm::silu_mul` (kernels: `unimlm_engine/kernels/layer_ops.py`, why: its docstring).

The references are the eager code the model ran before these ops existed, line for line, so CPU results
are unchanged bit for bit. The Triton kernels run when `pick` chooses Triton (CUDA tensors, or forced
under the interpreter) and no gradient is needed: the kernels have no backward, so training (the shapes
model's script, also on CUDA) takes the references. `fused_layer_ops(False)` turns the kernels off for a
block of code (benchmarks: the A/B against the eager ops; not thread-local).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from ._dispatch import custom_op, pick, requested_backend, triton_launch_guard

_enabled = True


@contextlib.contextmanager
def fused_layer_ops(enabled: bool):
    """Use (True) or bypass (False) the Triton kernels of this module inside the block."""
    global _enabled
    prev, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = prev


@functools.cache
def _kernels():
    try:
        from unimlm_engine.kernels import layer_ops
    except ImportError:
        return None
    return layer_ops


def _triton(*ts: torch.Tensor):
    """The kernel module when these tensors should take it, else None. CPU tensors return at the first test
    unless Triton is forced (tests): the CPU engine calls these ops ~20 times a step."""
    if not _enabled or (not ts[0].is_cuda and requested_backend() != "triton"):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return None
    mod = _kernels()
    return mod if pick(ts[0], has_triton=mod is not None) == "triton" else None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in fp32, round to x's dtype, then multiply by the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D] (rotate-half convention, computed in fp32), cos / sin [T, 1, D] fp32."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


@custom_op("unimlm::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N] -> weight * RMSNorm(x), in promote(weight, x) dtype."""
    mod = _triton(x, weight)
    if mod is None or x.shape[-1] == 0 or x.stride(-1) != 1:
        return rms_norm_reference(x, weight, eps)
    with triton_launch_guard():
        out, _ = mod.rms_norm_triton(_rows(x), weight, eps)
    return out.view(*x.shape[:-1], out.shape[-1])


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


@custom_op("unimlm::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (weight * RMSNorm(s), s) with s = x + residual (the pre-norm block's residual stream), one launch."""
    mod = _triton(x, residual, weight)
    if mod is None or x.shape != residual.shape or x.dtype != residual.dtype or x.stride(-1) != 1 \
            or residual.stride(-1) != 1:
        s = x + residual
        return rms_norm_reference(s, weight, eps), s
    with triton_launch_guard():
        out, s = mod.rms_norm_triton(_rows(x), weight, eps, residual=_rows(residual))
    return out.view(*x.shape[:-1], out.shape[-1]), s.view(x.shape)


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype)), torch.empty_like(x)


@custom_op("unimlm::rope", mutates_args=())
def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D], k [T, Hkv, D] (views of a fused QKV projection allowed), cos / sin [T, 1, D] fp32 ->
    rotated (q, k), contiguous."""
    mod = _triton(q, k)
    if mod is None or q.stride(-1) != 1 or k.stride(-1) != 1 or not cos.is_contiguous() or not sin.is_contiguous():
        return rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    with triton_launch_guard():
        return mod.rope_triton(q, k, cos, sin)


@rope.register_fake
def _(q, k, cos, sin):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format)


@custom_op("unimlm::silu_mul", mutates_args=())
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (SwiGLU's middle), gate / up [T, I] (views of a fused gate-up projection allowed)."""
    mod = _triton(gate, up)
    if mod is None or gate.dim() != 2 or gate.shape != up.shape or gate.dtype != up.dtype \
            or gate.stride(-1) != 1 or up.stride(-1) != 1:
        return F.silu(gate) * up
    with triton_launch_guard():
        return mod.silu_mul_triton(gate, up)


@silu_mul.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)
