"""Shared state of the gpu_suite driver (benchmarks/gpu_suite.py): settings, result records,
NaN poisoning and input builders used by several modes.

GPU_SUITE_DRY=1: CPU tensors, Triton under TRITON_INTERPRET=1, fp16 for bf16 (the interpreter
gets bf16 wrong), tiny shapes, wall-clock timers. Otherwise CUDA, TRITON_INTERPRET=0, bf16.
Every record goes to $OUT/results.json ({"records": [...]}, rewritten after each record so a
timeout kill loses nothing already measured) and to stdout as one `RESULT {json}` line.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

DRY = os.environ.get("GPU_SUITE_DRY") == "1"
os.environ.setdefault("TRITON_INTERPRET", "1" if DRY else "0")  # before any kernel module is imported

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = Path(os.environ.get("OUT") or HERE.parent / "out" / ("gpu_suite_dry" if DRY else "gpu_suite"))
RESULTS = OUT / "results.json"
DEV = "cpu" if DRY else "cuda"
LOW = torch.float16 if DRY else torch.bfloat16  # the "bf16" of a run: fp16 under the interpreter
MODE = {"name": "?"}
_records: list[dict] = []
_earlier: list[dict] = []  # records of the modes run before this process (read once)


def low_name() -> str:
    return str(LOW).removeprefix("torch.")


def load_records() -> list[dict]:
    """Every record in $OUT/results.json (none when it is missing or unreadable)."""
    try:
        return list(json.loads(RESULTS.read_text())["records"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _save() -> None:
    if not _records[:-1]:
        OUT.mkdir(parents=True, exist_ok=True)
        _earlier[:] = load_records()
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"records": _earlier + _records}, indent=1, default=str))
    os.replace(tmp, RESULTS)


def record(name: str, status: str = "ok", **metrics) -> dict:
    """One result row: status ok | FAIL | ERROR | SKIP, plus metrics (floats, ints, strings)."""
    row = {"mode": MODE["name"], "name": name, "status": status, "dry": DRY, **metrics}
    _records.append(row)
    print("RESULT " + json.dumps(row, default=str), flush=True)
    _save()
    return row


def headline(text: str) -> None:
    """The mode's one-line summary for the final table (the last headline of a mode wins)."""
    record(f"{MODE['name']}.headline", status="info", headline=text)


def failures() -> list[dict]:
    return [r for r in _records if r["status"] in ("FAIL", "ERROR")]


def case(fn):
    """Run one case; an exception becomes an ERROR record and the mode goes on with the next case."""
    @functools.wraps(fn)
    def run(*args, **kw):
        shown = [a for a in args if isinstance(a, (int, float, str, list, tuple))]
        name = f"{fn.__name__}{str(shown)[:120] if shown else ''}"
        t0 = time.time()
        try:
            return fn(*args, **kw)
        except Exception as e:  # one broken case must not hide the others
            record(name, status="ERROR", error=f"{type(e).__name__}: {e}"[:1500], tb=traceback.format_exc()[-2500:])
            return None
        finally:
            print(f"[{name}] {time.time() - t0:.1f}s", flush=True)
            if DEV == "cuda":
                torch.cuda.empty_cache()
    return run


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def wall_timer(fn, warmup: int = 1, iters: int = 2, flush_l2: bool = False) -> float:
    """Milliseconds per call by the wall clock (dry runs; same signature as common.time_cuda)."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / max(1, iters) * 1e3


def timer():
    """common.time_cuda on a GPU, wall_timer in a dry run."""
    if DRY:
        return wall_timer
    from common import time_cuda
    return time_cuda


@contextlib.contextmanager
def poison_empty():
    """torch.empty / empty_like return NaN-filled float tensors, so an output element (or workspace
    entry) a kernel forgets to write shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: nan(empty(*a, **k))
    torch.empty_like = lambda *a, **k: nan(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def make_paged(lens, hkv, d, bs, dtype, pad_cols=3, poison=True, seed=0):
    """Caches [NB, BS, Hkv, D] with shuffled pages and -1-padded block tables [B, P + pad_cols];
    with poison, unused blocks and the slots past each context in its last page are NaN."""
    torch.manual_seed(seed)
    pages = [max(1, math.ceil(n / bs)) for n in lens]
    nb = sum(pages) + 5
    kc = torch.randn(nb, bs, hkv, d, device=DEV).to(dtype)
    vc = torch.randn(nb, bs, hkv, d, device=DEV).to(dtype)
    perm = torch.randperm(nb).tolist()
    table = torch.full((len(lens), max(pages) + pad_cols), -1, dtype=torch.int32)
    i = 0
    for b, p in enumerate(pages):
        table[b, :p] = torch.tensor(perm[i:i + p], dtype=torch.int32)
        i += p
    if poison:
        unused = torch.tensor(perm[i:], dtype=torch.long, device=DEV)
        kc[unused] = float("nan")
        vc[unused] = float("nan")
        for b, n in enumerate(lens):
            last, off = int(table[b, pages[b] - 1]), n - (pages[b] - 1) * bs
            kc[last, off:] = float("nan")
            vc[last, off:] = float("nan")
    return kc, vc, table.to(DEV), torch.tensor(lens, dtype=torch.int32, device=DEV)


def lora_inputs(t, k, n, e, r, dtype, seed=0):
    """x [T, K], w0 [N, K], wg [E, K], a [E*r, K], b [N, E*r]; a sharp router so the gate matters."""
    torch.manual_seed(seed)
    x = torch.randn(t, k, device=DEV)
    w0 = torch.randn(n, k, device=DEV) * k ** -0.5
    wg = torch.randn(e, k, device=DEV) * k ** -0.5 * 3
    a = torch.randn(e * r, k, device=DEV) * k ** -0.5
    b = torch.randn(n, e * r, device=DEV) * (e * r) ** -0.5
    return [z.to(dtype) for z in (x, w0, wg, a, b)]


def msda_inputs(levels, n, m, d, lq, p, dtype, loc_dtype=None, softmax=False, spread=(1.4, -0.2), seed=0):
    """value, spatial_shapes, level_start_index, locations (some outside [0, 1]), weights."""
    torch.manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.int64, device=DEV)
    hw = shapes.prod(dim=1)
    starts = torch.cumsum(hw, 0) - hw
    value = torch.randn(n, int(hw.sum()), m, d, device=DEV).to(dtype)
    loc = (torch.rand(n, lq, m, len(levels), p, 2, device=DEV) * spread[0] + spread[1]).to(loc_dtype or dtype)
    attn = torch.randn(n, lq, m, len(levels), p, device=DEV)
    attn = (attn if softmax else attn.softmax(-1)).to(loc_dtype or dtype)
    return value, shapes, starts, loc, attn


def msda_backends() -> tuple[list[str], str | None]:
    """(backends to run, why CUDA is left out or None)."""
    from unimlm_engine.ops.msda import cuda_unavailable_reason
    reason = "dry run: no GPU" if DRY else cuda_unavailable_reason()
    return (["triton"] if reason else ["triton", "cuda"]), reason


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor (so NaN == NaN when comparing caches)."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])
