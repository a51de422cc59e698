"""One rule for picking an op's implementation.

`UNIMLM_KERNEL_BACKEND` (read at call time) = auto | reference | triton | cuda.
- auto: CPU tensors take the PyTorch reference (or the op's C++ CPU kernel where it has one:
  ms_deform_attn in fp32) and never launch Triton. CUDA tensors take a
  compiled kernel, chosen among the available ones (`pick(..., op=...)`) by:
    1. the measured table: the backend the GPU benchmark found fastest for this op on this
       device (by `torch.cuda.get_device_name`) and dtype, if that backend is available;
    2. else the op's documented default order, `DEFAULT_ORDER[op]` (first available wins);
       ops without an entry use ("cuda", "triton").
  The table is JSON, `{device name: {op: {dtype: backend}}}`, at $UNIMLM_BACKEND_TABLE or
  ~/.cache/unimlm_engine/backend_table.json, read once per process (`reload_table()` rereads
  it); benchmarks write it with `record_fastest`.
- triton: force the Triton kernel (tests). On CPU tensors it needs the interpreter
  (TRITON_INTERPRET=1): without it the launch is refused with a clear error.
- reference: force the PyTorch reference everywhere.
- cuda: force the CUDA C++ kernel (error if the module was built without CUDA).
`backend_override(name)` sets it for a block of code (thread-local), for tests.

`custom_op(name, mutates_args=...)` is `torch.library.custom_op` with an eager fast path: called with
plain tensors outside torch.compile, the function runs directly, skipping the dispatcher's 15-20 us
per call (measured on the CPU for `unimlm::lora_moe_linear`, tiny shapes): the engine's hot path
calls these ops ~10x (tiny) to ~160x (7B) per step. Under torch.compile (`is_compiling()`) and
torch.export / opcheck (FakeTensors and other tensor subclasses) the registered op runs, so graphs
still hold one node per op. `.op` is the registered op.

`triton_launch_guard()` wraps every Triton launch: the Triton interpreter
(TRITON_INTERPRET=1) is not thread-safe (two threads launching kernels at once fail with
"Did you forget @triton.jit"), so under the interpreter launches take `interpreter_lock`;
compiled (GPU) launches take no lock.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from pathlib import Path

import torch

_VALID = ("auto", "reference", "triton", "cuda")
DEFAULT_ORDER = {"ms_deform_attn": ("cuda", "triton")}
_FALLBACK_ORDER = ("cuda", "triton")
TABLE_ENV = "UNIMLM_BACKEND_TABLE"
_local = threading.local()
interpreter_lock = threading.Lock()


def custom_op(name: str, *, mutates_args):
    """`torch.library.custom_op(name, mutates_args=...)` returning a callable with the eager fast path
    (module doc); `.register_fake` and `.op` reach the registered op."""
    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if type(args[0]) is torch.Tensor and not torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            return op(*args, **kwargs)

        call.op = op
        call.register_fake = op.register_fake
        return call
    return wrap


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


def interpreting() -> bool:
    """TRITON_INTERPRET=1 (read at call time)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def triton_launch_guard():
    """Hold `interpreter_lock` for the block when TRITON_INTERPRET=1 (read at call time), else nothing."""
    if not interpreting():
        yield
        return
    with interpreter_lock:
        yield


def table_path() -> Path:
    return Path(os.environ.get(TABLE_ENV) or Path.home() / ".cache" / "unimlm_engine" / "backend_table.json")


@functools.cache
def _table(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def reload_table() -> None:
    _table.cache_clear()


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def measured_backend(op: str, t: torch.Tensor) -> str | None:
    """The table's fastest backend for `op` on t's CUDA device and dtype, or None."""
    entry = _table(str(table_path())).get(_device_name(t.device.index or 0), {}).get(op, {})
    choice = entry.get(str(t.dtype).removeprefix("torch.")) if isinstance(entry, dict) else None
    return choice if choice in ("cuda", "triton") else None


def record_fastest(op: str, device_name: str, dtype: torch.dtype, backend: str, path: Path | None = None) -> Path:
    """Store the measured winner for (device, op, dtype) in the table (merging), for `pick`."""
    if backend not in ("cuda", "triton"):
        raise ValueError(f"record_fastest: backend must be 'cuda' or 'triton', got {backend!r}")
    path = Path(path or table_path())
    data = dict(_table(str(path)))
    data.setdefault(device_name, {}).setdefault(op, {})[str(dtype).removeprefix("torch.")] = backend
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True))
    reload_table()
    return path


def pick(t: torch.Tensor, *, has_triton: bool, has_cuda: bool = False, op: str | None = None) -> str:
    """Return 'reference', 'triton' or 'cuda' for an op whose main input is `t` (rule: module doc)."""
    want = requested_backend()
    if want == "reference":
        return "reference"
    if want == "triton":
        if not has_triton:
            raise RuntimeError("UNIMLM_KERNEL_BACKEND=triton but the Triton kernel is not available")
        if not t.is_cuda and not interpreting():
            raise RuntimeError("UNIMLM_KERNEL_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 (set before "
                               "the kernels are imported); compiled Triton runs on CUDA tensors only")
        return "triton"
    if want == "cuda":
        if not (has_cuda and t.is_cuda):
            raise RuntimeError("UNIMLM_KERNEL_BACKEND=cuda needs CUDA tensors and a CUDA build of unimlm_engine._C")
        return "cuda"
    if not t.is_cuda:
        return "reference"
    available = {"cuda": has_cuda, "triton": has_triton}
    if op is not None and has_cuda and has_triton:
        choice = measured_backend(op, t)
        if choice is not None:
            return choice
    order = DEFAULT_ORDER.get(op, _FALLBACK_ORDER)
    return next((name for name in order if available[name]), "reference")
