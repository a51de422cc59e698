"""Multi-scale deformable attention forward: `unimlm::ms_deform_attn`.

For each batch n, query q and head m (math in unimlm_engine/kernels/README_msda.md):

    out[n, q, m, :] = sum_{l, p} a[n, q, m, l, p] * bilinear(V_l[n, :, m, :], loc[n, q, m, l, p])

V_l is level l of `value` seen as an H_l x W_l image; bilinear sampling uses
align_corners=False (pixel x = loc_x * W - 0.5) with zero padding outside the image.
With `softmax_weights=True` the weights are logits, softmaxed over the L*P samples
of each (n, q, m) in fp32 first (the softmax Deformable-DETR applies before the op).

Shapes:
    value:              [N, S, M, D]        S = sum_l H_l * W_l
    spatial_shapes:     [L, 2] int64        (H_l, W_l)
    level_start_index:  [L] int64           first row of level l in S
    sampling_locations: [N, Lq, M, L, P, 2] (x, y) normalised to [0, 1], may fall outside
    attention_weights:  [N, Lq, M, L, P]
    returns             [N, Lq, M*D]        in value.dtype

Backends (ops/_dispatch.py, UNIMLM_KERNEL_BACKEND): CPU tensors take the C++ CPU kernel of
unimlm_engine._C (`msda_cpu_forward` / `msda_cpu_backward`, csrc/kernels/msda_cpu.cpp: fp32, forward
and backward) when every float input is fp32 and the backend is auto, else the reference. CUDA
tensors take the CUDA kernel of unimlm_engine._C (when built with CUDA) or the Triton kernel:
the one the GPU benchmark measured fastest for this device and dtype (the dispatch table),
else CUDA first (`_dispatch.DEFAULT_ORDER`); unimlm_engine/kernels/README_msda.md states the rule. On CUDA
the kernels trust `spatial_shapes` / `level_start_index` (checking them against S would need
a device-to-host copy each call).

Gradients: the CUDA and Triton kernels have no backward, so where a gradient is needed (grad mode on and
an input that requires it) CUDA tensors take the reference (grid_sample, differentiable), as the
layer ops do; CPU fp32 tensors take the C++ kernel's backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import custom_op, pick, requested_backend, triton_launch_guard

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Mirrors the dtype enum of csrc/kernels/msda.cuh (MsdaDtype).
_CUDA_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _softmax_samples(w: torch.Tensor) -> torch.Tensor:
    """[N, Lq, M, L, P] logits -> weights: softmax over the L*P samples of each (n, q, m)."""
    return torch.softmax(w.flatten(-2), dim=-1).view(w.shape)


def ms_deform_attn_reference(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                             sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                             softmax_weights: bool = False) -> torch.Tensor:
    """grid_sample formulation in fp32, output in value.dtype. Shapes as in the module doc."""
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    vf = value.float()
    grids = 2.0 * sampling_locations.float() - 1.0  # [N, Lq, M, L, P, 2] in grid_sample's [-1, 1]
    weights = attention_weights.float()
    if softmax_weights:
        weights = _softmax_samples(weights)
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    sampled = []
    for lvl, ((h, w), start) in enumerate(zip(shapes, starts)):
        v_l = vf[:, start:start + h * w].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        g_l = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(n * m, lq, n_points, 2)
        sampled.append(F.grid_sample(v_l, g_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2)  # [N*M, D, Lq, L, P]
    w = weights.permute(0, 2, 1, 3, 4).reshape(n * m, 1, lq, n_levels, n_points)
    out = (stacked * w).sum(dim=(-2, -1))  # [N*M, D, Lq]
    out = out.view(n, m, d, lq).permute(0, 3, 1, 2).reshape(n, lq, m * d)
    return out.to(value.dtype).contiguous()  # the fake declares a contiguous [N, Lq, M*D]; Inductor trusts it


def _check_dtypes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    if value.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"ms_deform_attn: value must be float32/float16/bfloat16, got {value.dtype}")
    if spatial_shapes.dtype != torch.int64 or level_start_index.dtype != torch.int64:
        raise ValueError(f"ms_deform_attn: spatial_shapes and level_start_index must be int64, got "
                         f"{spatial_shapes.dtype} and {level_start_index.dtype}")
    if sampling_locations.dtype != attention_weights.dtype:
        raise ValueError(f"ms_deform_attn: sampling_locations ({sampling_locations.dtype}) and attention_weights "
                         f"({attention_weights.dtype}) must share a dtype")
    if sampling_locations.dtype not in (value.dtype, torch.float32):
        raise ValueError(f"ms_deform_attn: sampling_locations must be float32 or value's dtype ({value.dtype}), "
                         f"got {sampling_locations.dtype}")
    devices = {t.device for t in (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)}
    if len(devices) != 1:
        raise ValueError(f"ms_deform_attn: all inputs must be on one device, got {sorted(map(str, devices))}")


def _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be [N, S, M, D], got {tuple(value.shape)}")
    n, _, m, _ = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"ms_deform_attn: spatial_shapes must be [L, 2], got {tuple(spatial_shapes.shape)}")
    n_levels = spatial_shapes.shape[0]
    if n_levels == 0:
        raise ValueError("ms_deform_attn: need at least one level")
    if tuple(level_start_index.shape) != (n_levels,):
        raise ValueError(f"ms_deform_attn: level_start_index must be [L={n_levels}], got "
                         f"{tuple(level_start_index.shape)}")
    loc = sampling_locations
    if loc.dim() != 6 or loc.shape[0] != n or loc.shape[2] != m or loc.shape[3] != n_levels or loc.shape[5] != 2:
        raise ValueError(f"ms_deform_attn: sampling_locations must be [N={n}, Lq, M={m}, L={n_levels}, P, 2], "
                         f"got {tuple(loc.shape)}")
    if tuple(attention_weights.shape) != tuple(loc.shape[:5]):
        raise ValueError(f"ms_deform_attn: attention_weights must be {tuple(loc.shape[:5])} [N, Lq, M, L, P], "
                         f"got {tuple(attention_weights.shape)}")
    if loc.shape[4] == 0:
        raise ValueError("ms_deform_attn: need at least one sampling point (P >= 1)")


def _check_levels(value, spatial_shapes, level_start_index) -> None:
    """Host-side check of the level table (CPU tensors only: on CUDA it would sync)."""
    hw = spatial_shapes.prod(dim=1)
    if bool((spatial_shapes <= 0).any()):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be positive, got {spatial_shapes.tolist()}")
    if int(hw.sum()) != value.shape[1]:
        raise ValueError(f"ms_deform_attn: value has S={value.shape[1]} rows but the levels "
                         f"{spatial_shapes.tolist()} hold {int(hw.sum())}")
    expected = torch.cumsum(hw, 0) - hw
    if not torch.equal(expected, level_start_index):
        raise ValueError(f"ms_deform_attn: level_start_index {level_start_index.tolist()} does not match the "
                         f"cumulative level sizes {expected.tolist()}")


def check_inputs(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                 sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> None:
    """Raise ValueError with a clear message for inputs the op cannot take."""
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _check_dtypes(*args)
    _check_shapes(*args)
    if not value.is_cuda:
        _check_levels(value, spatial_shapes, level_start_index)


def _cuda_module():
    try:
        from unimlm_engine import _C
    except ImportError:
        return None
    return _C if getattr(_C, "with_cuda", False) and hasattr(_C, "msda_forward") else None


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA kernel cannot run here (a skip reason for tests and benchmarks), or None."""
    try:
        from unimlm_engine import _C
    except ImportError as e:
        return f"unimlm_engine._C cannot be imported ({e}): build the package (pip install -e .)"
    if not getattr(_C, "with_cuda", False) or not hasattr(_C, "msda_forward"):
        return ("unimlm_engine._C was built without CUDA (UNIMLM_CUDA=AUTO found no nvcc / CUDA toolkit, or "
                "UNIMLM_CUDA=OFF): rebuild with UNIMLM_CUDA=ON")
    if not torch.cuda.is_available():
        return "no CUDA device (unimlm_engine._C has the CUDA kernel)"
    return None


def _cpu_module():
    try:
        from unimlm_engine import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "msda_cpu_forward") else None


class _MsdaCpu(torch.autograd.Function):
    """The C++ CPU kernel (fp32, contiguous inputs) with its backward; weights already softmaxed."""

    @staticmethod
    def forward(ctx, mod, value, spatial_shapes, level_start_index, loc, attn):
        n, s, m, d = value.shape
        _, lq, _, n_levels, n_points, _ = loc.shape
        out = value.new_empty((n, lq, m * d))
        ctx.mod, ctx.dims = mod, (n, s, m, d, n_levels, lq, n_points)
        ctx.save_for_backward(value, spatial_shapes, level_start_index, loc, attn)
        if out.numel():
            mod.msda_cpu_forward(value.data_ptr(), spatial_shapes.data_ptr(), level_start_index.data_ptr(),
                                 loc.data_ptr(), attn.data_ptr(), out.data_ptr(), *ctx.dims, torch.get_num_threads())
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        grad = grad.contiguous()
        g_value, g_loc, g_attn = torch.zeros_like(value), torch.empty_like(loc), torch.empty_like(attn)
        if grad.numel():
            ctx.mod.msda_cpu_backward(value.data_ptr(), shapes.data_ptr(), starts.data_ptr(), loc.data_ptr(),
                                      attn.data_ptr(), grad.data_ptr(), g_value.data_ptr(), g_loc.data_ptr(),
                                      g_attn.data_ptr(), *ctx.dims, torch.get_num_threads())
        else:
            g_loc.zero_(), g_attn.zero_()
        return None, g_value, None, None, g_loc, g_attn


def _cpu_kernel(value, loc, attn):
    """-> the module when the C++ CPU kernel takes this call, else None (the rule: module doc)."""
    if value.is_cuda or requested_backend() != "auto":
        return None
    if not all(t.dtype == torch.float32 for t in (value, loc, attn)) or not all(
            type(t) is torch.Tensor for t in (value, loc, attn)):
        return None
    return _cpu_module()


def _triton_module():
    try:
        from unimlm_engine.kernels import msda as kmod
    except ImportError:
        return None
    return kmod


def _cuda_forward(mod, value, spatial_shapes, level_start_index, loc, attn, softmax_weights: bool) -> torch.Tensor:
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = loc.shape
    out = torch.empty((n, lq, m * d), device=value.device, dtype=value.dtype)
    if out.numel() == 0:
        return out
    stream = torch.cuda.current_stream(value.device).cuda_stream
    mod.msda_forward(value.data_ptr(), spatial_shapes.data_ptr(), level_start_index.data_ptr(), loc.data_ptr(),
                     attn.data_ptr(), out.data_ptr(), n, s, m, d, n_levels, lq, n_points,
                     _CUDA_DTYPE_CODE[value.dtype], stream, softmax_weights, _CUDA_DTYPE_CODE[loc.dtype])
    return out


@custom_op("unimlm::ms_deform_attn", mutates_args=())
def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                   softmax_weights: bool = False) -> torch.Tensor:
    """value: [N, S, M, D], sampling_locations: [N, Lq, M, L, P, 2] -> [N, Lq, M*D] (see module doc)."""
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    cpu_mod = _cpu_kernel(value, sampling_locations, attention_weights)
    if cpu_mod is not None:
        w = _softmax_samples(attention_weights) if softmax_weights else attention_weights
        return _MsdaCpu.apply(cpu_mod, value.contiguous(), spatial_shapes.contiguous(),
                              level_start_index.contiguous(), sampling_locations.contiguous(), w.contiguous())
    if torch.is_grad_enabled() and any(t.requires_grad for t in (value, sampling_locations, attention_weights)):
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights, softmax_weights)
    cuda_mod = _cuda_module()
    triton_mod = _triton_module()
    backend = pick(value, has_triton=triton_mod is not None, has_cuda=cuda_mod is not None, op="ms_deform_attn")
    if backend == "reference":
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights, softmax_weights)
    args = [t.contiguous() for t in (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)]
    if backend == "cuda":
        return _cuda_forward(cuda_mod, *args, softmax_weights)
    with triton_launch_guard():
        return triton_mod.ms_deform_attn_triton(*args, softmax_weights=softmax_weights)


@ms_deform_attn.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax_weights=False):
    return value.new_empty((value.shape[0], sampling_locations.shape[1], value.shape[2] * value.shape[3]))
