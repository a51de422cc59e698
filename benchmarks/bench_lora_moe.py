"""Fused LoRA-MoE linear (Triton, two launches) at the shipped shapes: d 4096 -> 11008, E=8,
r=4 and r=16, bf16, tokens 1..4096. GPU only.

Both bases side by side (`cublas_base_ms`, `triton_base_ms`): x W0^T by cuBLAS with the expand added to
its output, or by launch 2's own K loop (kernels/lora_moe.lora_moe_triton); `fused_ms` is the op as
dispatched (the default base).

Baselines in the same run: the base GEMM alone (torch.matmul, the floor: target fused <=
1.15x of it) and a per-expert loop in bf16 (router softmax in fp32, then expert by expert
B_i (g_i * A_i x)). The launch split: `router_shrink_ms` (launch 1, K split over `splits`
programs per tile) and `base_gate_expand_ms` (launch 2), each timed alone (`launch_split`).
A case whose kernel output disagrees with the fp32 reference on the same inputs is reported
as FAIL with no speedup.

    python benchmarks/bench_lora_moe.py [--quick]
"""
from __future__ import annotations

import argparse
import sys

import torch

from common import device_info, matmul_tflops, print_table, require_cuda, time_cuda, write_json

K_IN, N_OUT, EXPERTS, ALPHA = 4096, 11008, 8, 32.0
TOKENS = (1, 16, 64, 256, 1024, 4096)
RANKS = (4, 16)


def make_inputs(t: int, r: int, dtype=torch.bfloat16, device: str = "cuda", k: int = K_IN, n: int = N_OUT,
                e: int = EXPERTS):
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, std):
        return (torch.randn(*shape, device=device, generator=g) * std).to(dtype)

    return (rnd(t, k, std=1.0), rnd(n, k, std=k ** -0.5), rnd(e, k, std=k ** -0.5),
            rnd(e * r, k, std=k ** -0.5), rnd(n, e * r, std=(e * r) ** -0.5))


def per_expert_loop(x, w0, wg, a, b, scaling):
    """Same-dtype LoRAMoE loop: one shrink and one expand GEMM per expert."""
    r = a.shape[0] // wg.shape[0]
    gate = torch.softmax((x @ wg.t()).float(), dim=-1).to(x.dtype)
    out = x @ w0.t()
    for i in range(wg.shape[0]):
        mid = (x @ a[i * r:(i + 1) * r].t()) * (scaling * gate[:, i:i + 1])
        out += mid @ b[:, i * r:(i + 1) * r].t()
    return out


def launch_split(x, w0, wg, a, b, scaling, splits=None, base=None) -> dict:
    """The launches of kernels/lora_moe.lora_moe_triton as separate closures on shared buffers:
    {"base_gemm": fn or None (base "triton": no such launch), "router_shrink": fn, "base_gate_expand": fn
    (base "cublas": the expand adding to the base output), "out": [T, N] tensor, "splits": S, "gated": bool
    (launch 1 applied the gate), "base": str}. Run them in that order for a correct `out`; timed alone,
    the in-place expand adds to `out` again each time (the time is right, the values are not)."""
    from unimlm_engine.kernels import lora_moe as klm

    base = base or klm.default_base()
    t, e, er = x.shape[0], wg.shape[0], a.shape[0]
    plan = klm._plan(x, w0.shape[0], e, er, splits)
    part, mid = klm._workspace(plan, x, e, er)
    out = torch.empty((t, w0.shape[0]), device=x.device, dtype=x.dtype)
    gemm = (lambda: torch.mm(x, w0.t(), out=out)) if base == "cublas" else None
    return {"base_gemm": gemm, "router_shrink": lambda: klm._launch_router_shrink(plan, x, wg, a, part, mid, scaling),
            "base_gate_expand": lambda: klm._launch_base_gate_expand(plan, x, w0, part, mid, b, scaling, out,
                                                                     base=base == "triton"),
            "out": out, "splits": plan.splits, "gated": plan.gated, "base": base}


def run_case(t, r, op, reference, timer=time_cuda, device="cuda", dtype=torch.bfloat16, k=K_IN, n=N_OUT, e=EXPERTS):
    """One row of the table. timer/device/dtype/k/n/e: a CPU smoke run (benchmarks/gpu_suite.py, dry)
    passes a wall-clock timer, "cpu", float16 and small shapes."""
    x, w0, wg, a, b = make_inputs(t, r, dtype, device, k, n, e)
    scaling = ALPHA / r
    out = op(x, w0, wg, a, b, scaling)
    ref = reference(x, w0, wg, a, b, scaling).float()
    err = ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    ok = err <= 2e-2
    t_fused = timer(lambda: op(x, w0, wg, a, b, scaling))
    t_base = timer(lambda: torch.matmul(x, w0.t()))
    t_loop = timer(lambda: per_expert_loop(x, w0, wg, a, b, scaling))
    split = launch_split(x, w0, wg, a, b, scaling)
    t_launch1, t_launch2 = timer(split["router_shrink"]), timer(split["base_gate_expand"])
    flops = 2 * t * k * n + 2 * t * k * e * (r + 1) + 2 * t * e * r * n
    row = {"tokens": t, "rank": r, "rel_err": err, "check": "ok" if ok else "FAIL", "fused_ms": t_fused,
           "base_gemm_ms": t_base, "loop_ms": t_loop, "fused/base": t_fused / t_base if ok else None,
           "speedup_vs_loop": t_loop / t_fused if ok else None, "TFLOP/s": flops / (t_fused * 1e-3) / 1e12,
           "base": split["base"], "splits": split["splits"], "gated_in_launch1": split["gated"],
           "router_shrink_ms": t_launch1, "base_gate_expand_ms": t_launch2}
    # the A/B of who computes x W0^T: the kernel with each base, checked and timed the same way
    from unimlm_engine.kernels import lora_moe as klm
    for base in klm.BASES:
        out_b = klm.lora_moe_triton(x, w0, wg, a, b, scaling, base=base)
        err_b = ((out_b.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
        t_b = timer(lambda base=base: klm.lora_moe_triton(x, w0, wg, a, b, scaling, base=base))
        row[f"{base}_base_ms"] = t_b
        row[f"{base}_base/base"] = t_b / t_base if err_b <= 2e-2 else None
        row[f"{base}_base_rel_err"] = err_b
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    args = parser.parse_args()
    if not require_cuda("bench_lora_moe"):
        return 0
    from unimlm_engine.ops.lora_moe import lora_moe_linear, lora_moe_reference
    from unimlm_engine.ops._dispatch import backend_override

    peak = matmul_tflops()
    print(f"measured bf16 matmul: {peak:.0f} TFLOP/s")
    rows = []
    with backend_override("triton"):
        for r in RANKS:
            for t in ((1, 256, 4096) if args.quick else TOKENS):
                rows.append(run_case(t, r, lora_moe_linear, lora_moe_reference))
    print_table(rows)
    write_json("lora_moe", {"device": device_info(), "bf16_matmul_tflops": peak, "K": K_IN, "N": N_OUT,
                            "experts": EXPERTS, "alpha": ALPHA, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
