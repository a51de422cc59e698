"""Small timing helpers shared by the kernel benchmarks (CUDA only).

- `require_cuda(name)`: False (after saying why) when no GPU is present; benchmarks exit 0.
- `time_cuda(fn)`: median milliseconds over CUDA events, after warmup, optionally flushing L2
  before each timed call so bandwidth-bound kernels are not measured out of cache.
- `copy_bandwidth_gbs()`: measured device-to-device copy bandwidth (bytes read + written / s),
  the ceiling a memory-bound kernel is compared against.
- `matmul_tflops()`: measured bf16 GEMM throughput, the ceiling for compute-bound kernels.
- `print_table(rows)`, `write_json(name, payload)`: report in one place (benchmarks/results/).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_L2_FLUSH_BYTES = 256 << 20


def require_cuda(name: str) -> bool:
    if torch.cuda.is_available():
        return True
    print(f"{name}: needs a CUDA GPU (none found); nothing measured.")
    return False


def time_cuda(fn: Callable[[], object], warmup: int = 5, iters: int = 20, flush_l2: bool = True) -> float:
    """Median time of fn() in milliseconds, each call timed by its own pair of CUDA events."""
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if flush_l2 else None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy of nbytes: (read + write) bytes per second, in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), flush_l2=False)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = time_cuda(lambda: a @ b, flush_l2=False)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def device_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "sms": props.multi_processor_count, "memory_gib": props.total_memory / 2 ** 30,
            "torch": torch.__version__, "cuda": torch.version.cuda}


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, width)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, width)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_json(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path
