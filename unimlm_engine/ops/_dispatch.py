"""One rule for picking an op's implementation.

`UNIMLM_KERNEL_BACKEND` (read at call time) = auto | reference | triton | cuda.
- auto: CUDA tensors take the best compiled kernel available (CUDA, then Triton);
  CPU tensors take the PyTorch reference and never launch Triton.
- triton: force the Triton kernel, also on CPU tensors (tests, under TRITON_INTERPRET=1).
- reference: force the PyTorch reference everywhere.
- cuda: force the CUDA C++ kernel (error if the module was built without CUDA).
`backend_override(name)` sets it for a block of code (thread-local), for tests.

`triton_launch_guard()` wraps every Triton launch: the Triton interpreter
(TRITON_INTERPRET=1) is not thread-safe (two threads launching kernels at once fail with
"Did you forget @triton.jit"), so under the interpreter launches take `interpreter_lock`;
compiled (GPU) launches take no lock.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

_VALID = ("auto", "reference", "triton", "cuda")
_local = threading.local()
interpreter_lock = threading.Lock()


def requested_backend() -> str:
    name = getattr(_local, "override", None) or os.environ.get("UNIMLM_KERNEL_BACKEND", "auto")
    if name not in _VALID:
        raise ValueError(f"UNIMLM_KERNEL_BACKEND must be one of {_VALID}, got {name!r}")
    return name


@contextlib.contextmanager
def backend_override(name: str):
    if name not in _VALID:
        raise ValueError(f"backend must be one of {_VALID}, got {name!r}")
    prev = getattr(_local, "override", None)
    _local.override = name
    try:
        yield
    finally:
        _local.override = prev


@contextlib.contextmanager
def triton_launch_guard():
    """Hold `interpreter_lock` for the block when TRITON_INTERPRET=1 (read at call time), else nothing."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    with interpreter_lock:
        yield


def pick(t: torch.Tensor, *, has_triton: bool, has_cuda: bool = False) -> str:
    """Return 'reference', 'triton' or 'cuda' for an op whose main input is `t`."""
    want = requested_backend()
    if want == "reference":
        return "reference"
    if want == "triton":
        if not has_triton:
            raise RuntimeError("UNIMLM_KERNEL_BACKEND=triton but the Triton kernel is not available")
        return "triton"
    if want == "cuda":
        if not (has_cuda and t.is_cuda):
            raise RuntimeError("UNIMLM_KERNEL_BACKEND=cuda needs CUDA tensors and a CUDA build of unimlm_engine._C")
        return "cuda"
    if t.is_cuda:
        if has_cuda:
            return "cuda"
        if has_triton:
            return "triton"
    return "reference"
