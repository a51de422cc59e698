"""PNG plots for bench_e2e.py: throughput against concurrency, and latency CDFs."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(result: dict, path: Path) -> Path:
    """Engine req/s and output tok/s per concurrency, the serial baseline as a flat line."""
    plt = _pyplot()
    runs = result["engine"]
    conc = [r["concurrency"] for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "req_per_s", "requests / s"), (axes[1], "output_tok_per_s", "output tokens / s")):
        ax.plot(conc, [r["summary"][key] for r in runs], "o-", label="engine")
        ax.axhline(result["baseline"]["summary"][key], color="tab:red", linestyle="--", label="HF serial (batch 1)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrency (closed-loop clients)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['setup']['preset']} on {result['setup']['device']}, workload {result['setup']['workload']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency_cdfs(result: dict, path: Path) -> Path:
    """Empirical CDF of per-request end-to-end latency, baseline and each engine run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    series = [("HF serial", result["baseline"]["e2e_s"])]
    series += [(f"engine c={r['concurrency']}", r["e2e_s"]) for r in result["engine"]]
    for label, xs in series:
        xs = np.sort(np.asarray(xs, dtype=float))
        if xs.size:
            ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency per request (s)")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
