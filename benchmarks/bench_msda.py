"""Multi-scale deformable attention forward: reference vs classic CUDA vs our Triton vs our CUDA.

Shapes: Grounding-DINO encoder (queries = all 22,223 tokens of the 4-level pyramid
100x167, 50x84, 25x42, 13x21; M=8, D=32, L=4, P=4), its decoder (900 queries) and
DCNv4's MSDA benchmark shape (Lq=15,200, P=8) over the same pyramid.

On a GPU: CUDA-event timing after warmup; every kernel is first checked against the
reference on the same inputs and a kernel that fails gets no speedup printed. Bytes are
the compulsory traffic (value read once, locations + weights read, output written);
%copy compares that rate with a measured device-to-device copy. On a CPU: the C++ CPU kernel
against the reference, forward and forward + backward, at the shapes model's training shapes.

    python benchmarks/bench_msda.py [--dtype bf16] [--batches 1 2 4 8] [--iters 50]
Writes benchmarks/results/bench_msda.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from unimlm_engine.ops.msda import _CUDA_DTYPE_CODE, _cuda_module, ms_deform_attn_reference

HERE = Path(__file__).resolve().parent
GDINO_LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
SMALL_LEVELS = [(25, 42), (13, 21), (7, 11), (4, 6)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass(slots=True)
class Shape:
    name: str
    levels: list
    n: int
    lq: int  # 0 means "all encoder tokens"
    m: int = 8
    d: int = 32
    p: int = 4

    def __post_init__(self):
        if self.n < 1 or self.lq < 0 or self.m < 1 or self.d < 1 or self.p < 1 or not self.levels:
            raise ValueError(f"bad benchmark shape {self}")
        if self.lq == 0:
            self.lq = sum(h * w for h, w in self.levels)


def gpu_shapes(batches: list[int]) -> list[Shape]:
    shapes = [Shape(f"gdino-encoder-N{n}", GDINO_LEVELS, n, 0) for n in batches]
    shapes += [Shape(f"gdino-decoder-N{n}", GDINO_LEVELS, n, 900) for n in batches]
    shapes += [Shape("dcnv4-N1", GDINO_LEVELS, 1, 15200, p=8)]
    return shapes


def make_inputs(shape: Shape, dtype: torch.dtype, device: str):
    gen = torch.Generator(device="cpu").manual_seed(0)
    spatial = torch.tensor(shape.levels, dtype=torch.int64)
    hw = spatial.prod(dim=1)
    starts = torch.cumsum(hw, 0) - hw
    n_levels = len(shape.levels)
    value = torch.randn(shape.n, int(hw.sum()), shape.m, shape.d, generator=gen)
    loc = torch.rand(shape.n, shape.lq, shape.m, n_levels, shape.p, 2, generator=gen) * 1.2 - 0.1
    attn = torch.softmax(torch.randn(shape.n, shape.lq, shape.m, n_levels * shape.p, generator=gen), dim=-1)
    attn = attn.view(shape.n, shape.lq, shape.m, n_levels, shape.p)
    tensors = (value.to(dtype), spatial, starts, loc.to(dtype), attn.to(dtype))
    return tuple(t.to(device).contiguous() for t in tensors)


def compulsory_bytes(args) -> int:
    value, _, _, loc, attn = args
    out_bytes = loc.shape[0] * loc.shape[1] * value.shape[2] * value.shape[3] * value.element_size()
    return value.numel() * value.element_size() + loc.numel() * loc.element_size() + \
        attn.numel() * attn.element_size() + out_bytes


def cuda_time_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def copy_bandwidth_gbs(warmup: int, iters: int) -> float:
    """Measured device-to-device copy rate (read + write bytes per second) of a 1 GiB buffer."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup, iters)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def gpu_impls(skip_classic: bool) -> dict:
    impls = {"reference": ms_deform_attn_reference}
    if not skip_classic:
        try:
            sys.path.insert(0, str(HERE / "baselines"))
            from msda_classic import load_classic

            impls["classic-cuda"] = load_classic()
        except Exception as exc:  # a failed JIT build leaves the other columns usable
            print(f"classic CUDA baseline unavailable: {exc}")
    try:
        from unimlm_engine.kernels.msda import ms_deform_attn_triton

        impls["triton"] = ms_deform_attn_triton
    except ImportError as exc:
        print(f"Triton kernel unavailable: {exc}")
    mod = _cuda_module()
    if mod is not None:
        impls["cuda"] = _ours_cuda(mod)
    else:
        print("unimlm_engine._C has no CUDA msda_forward (module built without CUDA): 'cuda' column skipped")
    return impls


def _ours_cuda(mod):
    def run(value, spatial, starts, loc, attn):
        n, s, m, d = value.shape
        _, lq, _, n_levels, n_points, _ = loc.shape
        out = torch.empty((n, lq, m * d), device=value.device, dtype=value.dtype)
        mod.msda_forward(value.data_ptr(), spatial.data_ptr(), starts.data_ptr(), loc.data_ptr(), attn.data_ptr(),
                         out.data_ptr(), n, s, m, d, n_levels, lq, n_points, _CUDA_DTYPE_CODE[value.dtype],
                         torch.cuda.current_stream().cuda_stream, False, _CUDA_DTYPE_CODE[loc.dtype])
        return out

    return run


def bench_shape(shape: Shape, dtype, impls: dict, warmup: int, iters: int, copy_gbs: float, device: str = "cuda",
                timer=None) -> list[dict]:
    """Rows for one shape. device/timer (ms per call of fn): a CPU smoke run (benchmarks/gpu_suite.py,
    dry) passes "cpu" and a wall-clock timer; by default CUDA events (`cuda_time_ms`)."""
    args = make_inputs(shape, dtype, device)
    expected = ms_deform_attn_reference(*args).float()
    nbytes = compulsory_bytes(args)
    rows = []
    for name, fn in impls.items():
        try:
            err = (fn(*args).float() - expected).abs().max().item()
        except Exception as exc:
            print(f"{shape.name} {name}: failed to run: {exc}")
            continue
        ok = err <= TOL[dtype] * max(1.0, expected.abs().max().item())
        ms = (timer or cuda_time_ms)(lambda: fn(*args), warmup, iters)
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append(dict(shape=shape.name, impl=name, ms=ms, max_abs_err=err, correct=ok, gbs=gbs,
                         copy_fraction=gbs / copy_gbs, bytes=nbytes))
    base = {r["impl"]: r for r in rows if r["correct"]}.get("classic-cuda")
    for r in rows:
        r["speedup_vs_classic"] = base["ms"] / r["ms"] if (base and r["correct"]) else None
    return rows


def fastest_backend(rows: list[dict]) -> tuple[str | None, dict]:
    """The faster of our two kernels ("triton", "cuda") over the shapes where both ran and passed:
    (winner or None when either is missing there, {impl: total ms over those shapes})."""
    by_shape: dict[str, dict] = {}
    for r in rows:
        if r["impl"] in ("triton", "cuda") and r["correct"]:
            by_shape.setdefault(r["shape"], {})[r["impl"]] = r["ms"]
    both = [v for v in by_shape.values() if len(v) == 2]
    totals = {impl: sum(v[impl] for v in both) for impl in ("triton", "cuda")} if both else {}
    return (min(totals, key=totals.get) if totals else None), totals


def record_dispatch(rows: list[dict], dtype: torch.dtype, device_name: str, path: Path | None = None):
    """Store the measured winner for (device, "ms_deform_attn", dtype) in the dispatch table that
    `unimlm_engine.ops._dispatch.pick` reads; -> (winner, table path), or (None, None) when the rows do
    not have both kernels correct on a common shape."""
    from unimlm_engine.ops._dispatch import record_fastest

    winner, _ = fastest_backend(rows)
    if winner is None:
        return None, None
    return winner, record_fastest("ms_deform_attn", device_name, dtype, winner, path)


def print_table(rows: list[dict]) -> None:
    w = max([22] + [len(r["shape"]) + 2 for r in rows])
    head = f"{'shape':<{w}}{'impl':<14}{'ms':>10}{'GB/s':>9}{'%copy':>7}{'max err':>11}  {'vs classic':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        speed = "mismatch" if not r["correct"] else (
            f"{r['speedup_vs_classic']:.2f}x" if r.get("speedup_vs_classic") else "-")
        gbs = f"{r['gbs']:.0f}" if r.get("gbs") is not None else "-"
        frac = f"{100 * r['copy_fraction']:.0f}" if r.get("copy_fraction") is not None else "-"
        print(f"{r['shape']:<{w}}{r['impl']:<14}{r['ms']:>10.3f}{gbs:>9}{frac:>7}{r['max_abs_err']:>11.2e}  {speed:>10}")


def run_gpu(opts) -> dict:
    dtype = DTYPES[opts.dtype]
    copy_gbs = copy_bandwidth_gbs(opts.warmup, opts.iters)
    print(f"device: {torch.cuda.get_device_name()}  dtype: {opts.dtype}  d2d copy: {copy_gbs:.0f} GB/s")
    impls = gpu_impls(opts.no_classic)
    rows = []
    for shape in gpu_shapes(opts.batches):
        rows += bench_shape(shape, dtype, impls, opts.warmup, opts.iters, copy_gbs)
        torch.cuda.empty_cache()
    print_table(rows)
    result = dict(device=torch.cuda.get_device_name(), dtype=opts.dtype, copy_gbs=copy_gbs, rows=rows)
    if opts.record_dispatch:
        winner, path = record_dispatch(rows, dtype, torch.cuda.get_device_name())
        print(f"dispatch table: {winner} for ms_deform_attn/{opts.dtype} -> {path}" if winner else
              "dispatch table unchanged: Triton and CUDA did not both pass on a common shape")
        result["dispatch"] = winner
    return result


SHAPES_LEVELS = [(28, 28), (14, 14), (7, 7), (4, 4)]  # the shapes model's decoders (224 x 224, strides 8-64)


def cpu_shapes() -> list[Shape]:
    """The calls of one training step of training/train_shapes.py (batch 3 POSE / 2 DET samples)."""
    return [Shape("unipose-kpt-layer-N3", SHAPES_LEVELS, 3, 3450, m=8, d=32, p=2),
            Shape("unipose-encoder-N3", SHAPES_LEVELS, 3, 0, m=8, d=32, p=2),
            Shape("gdino-encoder-N2", SHAPES_LEVELS, 2, 0, m=4, d=16, p=4)]


def _cpu_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def run_cpu(opts) -> dict:
    """The C++ CPU kernel (`_C.msda_cpu_forward` / `_backward`, what auto takes for CPU fp32) against the
    grid_sample reference, forward and forward + backward, fp32; outputs and gradients compared first."""
    from unimlm_engine.ops._dispatch import backend_override
    from unimlm_engine.ops.msda import _cpu_module, ms_deform_attn

    print(f"no CUDA device: the C++ CPU kernel vs the PyTorch reference, fp32, {torch.get_num_threads()} threads")
    if _cpu_module() is None:
        raise SystemExit("unimlm_engine._C has no msda_cpu_forward: build the package (pip install -e .)")
    iters = max(1, min(opts.iters, 5))
    rows = []
    shapes = cpu_shapes()
    for shape in shapes:
        value, spatial, starts, loc, attn = make_inputs(shape, torch.float32, "cpu")
        up = torch.randn(shape.n, shape.lq, shape.m * shape.d, generator=torch.Generator().manual_seed(1))
        leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
        impls = {"reference": ms_deform_attn_reference, "cpu": ms_deform_attn}
        got = {}
        for name, fn in impls.items():
            with backend_override("auto"):
                out = fn(leaves[0], spatial, starts, leaves[1], leaves[2])
                got[name] = (out.detach(),) + torch.autograd.grad((out * up).sum(), leaves)
        abs_err = float((got["cpu"][0] - got["reference"][0]).abs().max())
        err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got["cpu"], got["reference"]))
        for name, fn in impls.items():
            def fwd(fn=fn):
                with torch.no_grad(), backend_override("auto"):
                    fn(value, spatial, starts, loc, attn)

            def train(fn=fn):
                with backend_override("auto"):
                    out = fn(leaves[0], spatial, starts, leaves[1], leaves[2])
                    torch.autograd.grad((out * up).sum(), leaves)

            for mode, f in (("forward", fwd), ("forward+backward", train)):
                rows.append(dict(shape=f"{shape.name} {mode}", impl=name, ms=_cpu_ms(f, iters),
                                 max_abs_err=abs_err if name == "cpu" else 0.0,
                                 max_rel_err=err if name == "cpu" else 0.0, correct=err < TOL[torch.float32],
                                 gbs=None, copy_fraction=None, bytes=compulsory_bytes((value, spatial, starts, loc,
                                                                                       attn)),
                                 speedup_vs_classic=None))
    for r in rows:
        if r["impl"] == "cpu":
            ref = next(x for x in rows if x["shape"] == r["shape"] and x["impl"] == "reference")
            r["speedup_vs_reference"] = ref["ms"] / r["ms"]
    print_table(rows)
    for r in rows:
        if r["impl"] == "cpu":
            print(f"{r['shape']}: C++ kernel {r['speedup_vs_reference']:.2f}x the reference (largest relative "
                  f"difference of output / gradients {r['max_rel_err']:.1e})")
    return dict(device="cpu", dtype="fp32", threads=torch.get_num_threads(), copy_gbs=None, rows=rows,
                shapes=[asdict(s) for s in shapes])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-classic", action="store_true", help="skip the JIT-built classic CUDA baseline")
    ap.add_argument("--record-dispatch", action="store_true",
                    help="write the faster of triton/cuda into the dispatch table (ops/_dispatch.py)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "bench_msda.json")
    opts = ap.parse_args(argv)
    result = run_gpu(opts) if torch.cuda.is_available() else run_cpu(opts)
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {opts.json}")


if __name__ == "__main__":
    main()
