"""End-to-end serving benchmark: the engine against the way these models are served today
(issue 7), the same workload through both in one run.

  baseline  benchmarks/baselines/hf_serial.py: one request at a time, HF transformers
            `generate(inputs_embeds=...)`, an extra forward for the super-link payloads,
            decoders called with a batch of one (a closed loop of one client).
  engine    unimlm_engine.Engine, closed loops of N clients for each --concurrency.

CPU (default): the `tiny-random` preset, saved with save_checkpoint to a temporary official-layout
directory that both sides load. CUDA: the visionllm-v2-7b shapes, random bf16 weights built
in memory and copied into the HF model (no checkpoint). THE CUDA PATH HAS NOT BEEN RUN:
the development machine has no GPU.

Workloads: vqa (one image, 1 to 5 tiles), text (text-only chat), det (one image, 1 to 20
classes = forced [DET] groups), mix (all three). Every request is greedy with ignore_eos, so
the two sides must produce the same tokens; the first --check requests of every engine run
are compared with the baseline (tokens equal, payloads within tolerance). If any differs the
benchmark says so and reports no speedup.

Prints a table, writes benchmarks/results/bench_e2e.json and two PNG plots beside it.
Usage: python benchmarks/bench_e2e.py [--workload mix] [--requests 64] [--concurrency 1,4,16,64]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from baselines.hf_serial import BaselineOutput, HFSerialBaseline, hf_llama_from_model  # noqa: E402
from common import RESULTS_DIR, print_table, write_json  # noqa: E402
from plots import plot_latency_cdfs, plot_throughput  # noqa: E402

from unimlm_engine import Engine  # noqa: E402
from unimlm_engine.config import EngineConfig  # noqa: E402
from unimlm_engine.engine.types import Request  # noqa: E402
from unimlm_engine.routes import all_routes  # noqa: E402
from unimlm_engine.sampling import SamplingParams  # noqa: E402
from unimlm_engine.cli.serve_bench import QUESTIONS, BenchResult, run_closed_loop  # noqa: E402

WORKLOADS = ("vqa", "text", "det", "mix")
# (width, height) in tiles of image_size -> anyres grid: 1x1 (small) = 1 tile; 2x1 = 2 + thumbnail;
# 3x1 = 3 + thumbnail; 4x1 and a large square (2x2) = 4 + thumbnail.
TILE_SHAPES = ((0.9, 0.9, 1), (2.0, 1.0, 3), (1.0, 3.0, 4), (4.0, 1.0, 5), (2.0, 2.0, 5))
PAYLOAD_ATOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def make_image(rng: random.Random, image_size: int) -> tuple[np.ndarray, int]:
    """A smooth random RGB image whose aspect ratio gives 1, 3, 4 or 5 anyres tiles."""
    w, h, tiles = rng.choice(TILE_SHAPES)
    width, height = max(8, int(w * image_size)), max(8, int(h * image_size))
    nrng = np.random.default_rng(rng.randrange(1 << 30))
    coarse = nrng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    img = np.kron(coarse, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]
    return np.ascontiguousarray(img), tiles


def make_request(kind: str, rng: random.Random, special: dict[str, int], image_size: int, max_tokens: int) -> Request:
    question = rng.choice(QUESTIONS)
    if kind == "text":  # text only: the routing tokens are barred (random weights would sample them)
        no_route = {special[r.token]: -1e4 for r in all_routes() if r.token in special}
        return Request(prompt=question, sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                                logit_bias=no_route))
    image, _ = make_image(rng, image_size)
    forced: tuple[int, ...] = ()
    if kind == "det":
        forced = (special["[DET]"],) * rng.randint(1, 20)
        question = "Detect every object of these classes."
    sp = SamplingParams(max_tokens=max(max_tokens, len(forced) + 1), forced_prefix=forced, ignore_eos=True)
    return Request(prompt=question, images=[image], sampling=sp)


def make_workload(workload: str, n: int, special: dict[str, int], image_size: int, max_tokens: int,
                  seed: int = 0) -> list[Request]:
    """`mix` cycles vqa, text, det so the first requests (the checked ones) cover every kind."""
    rng = random.Random(seed)
    kinds = ["vqa", "text", "det"] if workload == "mix" else [workload]
    return [make_request(kinds[i % len(kinds)], rng, special, image_size, max_tokens) for i in range(n)]


def clone_request(r: Request) -> Request:
    """A fresh Request (new id) with the same content, so runs never share handles."""
    return Request(prompt=r.prompt, images=r.images, sampling=r.sampling, chat=r.chat)


def setup_cpu(tmp: Path):
    """tiny-random, saved to an official-layout checkpoint; both sides load from it."""
    from unimlm_engine.checkpoint.loader import save_checkpoint
    from unimlm_engine.checkpoint.pretrained import load_pretrained
    from unimlm_engine.inputs.tokenizer import ByteTokenizer

    model, _ = load_pretrained("tiny-random", device="cpu")
    ckpt = save_checkpoint(model, tmp / "tiny-ckpt", tokenizer=ByteTokenizer())
    del model
    baseline = HFSerialBaseline.from_checkpoint(ckpt, device="cpu")
    engine_model, tok = load_pretrained(ckpt, device="cpu")
    return baseline, engine_model, tok, "tiny-random"


def setup_cuda():
    """visionllm-v2-7b shapes, random bf16 weights, one model shared by both sides (its LLM
    weights copied into the HF model). Not run on the development machine (no GPU).

    One change to the shapes: the vocabulary is the ByteTokenizer's (285 ids, no 32,000-entry tokenizer
    is at hand), so that every id the random model samples can be detokenized. The LM head is then
    285 x 4096 instead of 32,026 x 4096: 0.26 GB less read per decode step out of ~13.5 GB (2%)."""
    import dataclasses

    from unimlm_engine.model import build_model
    from unimlm_engine.config.presets import get_preset
    from unimlm_engine.inputs.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    cfg = get_preset("visionllm-v2-7b")
    cfg.llm = dataclasses.replace(cfg.llm, vocab_size=tok.vocab_size)
    model = build_model(cfg, dtype=torch.bfloat16, device="cuda")
    model.special_ids = dict(tok.special_ids)
    baseline = HFSerialBaseline(model, hf_llama_from_model(model), tok)
    return baseline, model, tok, "visionllm-v2-7b"


def run_baseline(baseline: HFSerialBaseline, requests: list[Request]) -> tuple[list[BaselineOutput], float]:
    outs = []
    t0 = time.perf_counter()
    for r in requests:
        outs.append(baseline.run(r))
    return outs, time.perf_counter() - t0


def baseline_summary(outs: list[BaselineOutput], wall_s: float) -> dict:
    def pct(xs, p):
        xs = [x for x in xs if x is not None]
        return float(np.percentile(xs, p)) if xs else None

    toks = sum(len(o.token_ids) for o in outs)
    ttft, tpot, e2e = ([getattr(o, k) for o in outs] for k in
                       ("time_to_first_token_s", "time_per_output_token_s", "e2e_time_s"))
    return {"requests": len(outs), "ok": len(outs), "failed": 0, "wall_s": wall_s, "req_per_s": len(outs) / wall_s,
            "output_tok_per_s": toks / wall_s, "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99), "e2e_p50_s": pct(e2e, 50),
            "e2e_p99_s": pct(e2e, 99)}


def compare(engine_out, base: BaselineOutput, atol: float) -> str | None:
    """None when the engine's output equals the baseline's; else what differs."""
    if engine_out.error is not None:
        return f"engine error: {engine_out.error}"
    if engine_out.token_ids != base.token_ids:
        return f"tokens differ: engine {engine_out.token_ids} vs baseline {base.token_ids}"
    if [(p.route, p.token_index) for p in engine_out.payloads] != [(p.route, p.token_index) for p in base.payloads]:
        return "routed payloads differ (route / token index)"
    for a, b in zip(engine_out.payloads, base.payloads):
        err = (a.payload.float() - b.payload.float().to(a.payload.device)).abs().max().item()
        if not err <= atol:
            return f"payload {a.route}@{a.token_index} differs by {err:.3g} > {atol}"
    if [t.route for t in engine_out.tasks] != [t.route for t in base.tasks]:
        return "decoder task routes differ"
    return None


def peak_memory_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if device == "cuda" else None


def run_engine(model, tok, requests: list[Request], concurrency: int, device: str) -> tuple[BenchResult, dict]:
    """A fresh engine per concurrency level (no prefix cache or stats carried over)."""
    cfg = EngineConfig(max_num_seqs=max(64, concurrency))
    peak_memory_reset(device)
    with Engine(model, tok, cfg) as engine:
        res = run_closed_loop(engine, [clone_request(r) for r in requests], concurrency)
        stats = engine.stats()
    stats["peak_memory_allocated"] = peak_memory(device)
    del engine
    gc.collect()  # the engine and its threads form a cycle: free its KV pool before the next level
    return res, stats


def warm_up(baseline, model, tok, requests: list[Request]) -> None:
    """First calls pay one-time costs (allocator, lazy init): run a few through both sides."""
    for r in requests:
        baseline.run(r)
    with Engine(model, tok) as engine:
        engine.generate_batch([clone_request(r) for r in requests])


def engine_entry(res: BenchResult, stats: dict, concurrency: int, check: list[str | None]) -> dict:
    return {"concurrency": concurrency, "summary": res.summary(), "e2e_s": [o.e2e_time_s for o in res.outputs],
            "decoder_mean_batch_size": stats["decoder_mean_batch_size"], "memory_bytes": stats["memory_bytes"],
            "peak_memory_allocated": stats["peak_memory_allocated"], "steps": stats["steps"],
            "iteration_latency_s": stats["iteration_latency_s"], "preemptions": stats["preemptions"],
            "check_failures": [c for c in check if c is not None]}


def param_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["commit"] = _git("rev-parse", "--short", "HEAD").strip()
        info["uncommitted_engine_files"] = _git("status", "--short", "--", "unimlm_engine").splitlines()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True, check=True).stdout


def table_rows(result: dict) -> list[dict]:
    def row(name, s, extra):
        return {"run": name, "req/s": s["req_per_s"], "out tok/s": s["output_tok_per_s"], "TTFT p50 ms":
                _ms(s["ttft_p50_s"]), "TPOT p50 ms": _ms(s["tpot_p50_s"]), "e2e p50 s": s["e2e_p50_s"],
                "e2e p99 s": s["e2e_p99_s"], **extra}

    base = result["baseline"]
    rows = [row("HF serial", base["summary"], {"speedup": 1.0, "det batch": 1.0 if base["has_det"] else None,
                                                "check": "-"})]
    for r in result["engine"]:
        speed = r["summary"]["req_per_s"] / base["summary"]["req_per_s"] if result["verdict"]["correct"] else None
        rows.append(row(f"engine c={r['concurrency']}", r["summary"],
                        {"speedup": speed, "det batch": r["decoder_mean_batch_size"].get("det"),
                         "check": "ok" if not r["check_failures"] else "FAIL"}))
    return rows


def _ms(s):
    return None if s is None else 1e3 * s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=WORKLOADS, default="mix")
    p.add_argument("--requests", type=int, default=64, help="requests per run (each side, each concurrency)")
    p.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request (ignore_eos)")
    p.add_argument("--concurrency", default="1,4,16,64", help="engine closed-loop client counts")
    p.add_argument("--check", type=int, default=3, help="first requests compared with the baseline in every run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds (baseline, then every concurrency); the median round by req/s is reported")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads, both sides (1: steadier on a shared CPU; 0: torch's default)")
    p.add_argument("--out", default=str(RESULTS_DIR / "bench_e2e.json"))
    return p.parse_args(argv)


def baseline_entry(baseline, reqs: list[Request], device: str) -> tuple[dict, list[BaselineOutput]]:
    peak_memory_reset(device)
    outs, wall = run_baseline(baseline, reqs)
    mem = peak_memory(device) if device == "cuda" else param_bytes(baseline.model, baseline.hf)
    entry = {"summary": baseline_summary(outs, wall), "e2e_s": [o.e2e_time_s for o in outs], "memory_bytes": mem,
             "has_det": any(o.tasks for o in outs)}
    print(f"HF serial: {entry['summary']['req_per_s']:.2f} req/s", flush=True)
    return entry, outs


def engine_round(model, tok, reqs: list[Request], c: int, base_outs: list[BaselineOutput], args, device: str) -> dict:
    """One engine run at concurrency c, its outputs checked against the baseline's."""
    res, stats = run_engine(model, tok, reqs, c, device)
    atol = PAYLOAD_ATOL.get(model.dtype, 1e-3)
    check = [compare(e, b, atol) for e, b in zip(res.outputs[:args.check], base_outs[:args.check])]
    entry = engine_entry(res, stats, c, check)
    entry["token_identical_requests"] = sum(e.token_ids == b.token_ids for e, b in zip(res.outputs, base_outs))
    print(f"engine c={c}: {entry['summary']['req_per_s']:.2f} req/s, check of the first {args.check} "
          f"{'ok' if not entry['check_failures'] else entry['check_failures']}; "
          f"{entry['token_identical_requests']}/{len(reqs)} requests token-identical", flush=True)
    return entry


def median_round(entries: list[dict]) -> dict:
    """The round with the median req/s (lower median for an even count); all rounds' req/s
    and every round's check failures kept."""
    ranked = sorted(entries, key=lambda e: e["summary"]["req_per_s"])
    pick = dict(ranked[(len(ranked) - 1) // 2])
    pick["req_per_s_rounds"] = [e["summary"]["req_per_s"] for e in entries]
    if "check_failures" in pick:
        pick["check_failures"] = [f for e in entries for f in e["check_failures"]]
    return pick


def run(args) -> dict:
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    started = machine()  # the commit the code was imported from: read before the long run
    tmp = tempfile.TemporaryDirectory(prefix="bench_e2e_")
    baseline, model, tok, preset = setup_cpu(Path(tmp.name)) if device == "cpu" else setup_cuda()
    size = model.cfg.vision.image_size
    reqs = make_workload(args.workload, args.requests, tok.special_ids, size, args.max_tokens, args.seed)
    warm_up(baseline, model, tok, make_workload(args.workload, 3, tok.special_ids, size, 4, args.seed + 1))
    levels = [int(x) for x in args.concurrency.split(",") if x]
    base_rounds, engine_rounds = [], {c: [] for c in levels}
    for _ in range(args.repeats):  # rounds interleave the two sides so load changes hit both
        entry, base_outs = baseline_entry(baseline, reqs, device)
        base_rounds.append(entry)
        for c in levels:
            engine_rounds[c].append(engine_round(model, tok, reqs, c, base_outs, args, device))
    result = {"setup": {"preset": preset, "device": device, "workload": args.workload, "requests": args.requests,
                        "max_tokens": args.max_tokens, "check": args.check, "seed": args.seed,
                        "repeats": args.repeats, "threads": args.threads,
                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), **started},
              "baseline": median_round(base_rounds), "engine": [median_round(engine_rounds[c]) for c in levels]}
    failures = [f for r in result["engine"] for f in r["check_failures"]]
    result["verdict"] = {"correct": not failures, "failures": failures}
    tmp.cleanup()
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = run(args)
    print_table(table_rows(result))
    if not result["verdict"]["correct"]:
        print("CORRECTNESS CHECK FAILED: the engine's outputs differ from the baseline's; no speedup is reported:")
        for f in result["verdict"]["failures"]:
            print("  ", f)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.stem, result) if out.parent == RESULTS_DIR else out.write_text(__import__("json").dumps(result))
    for path in (plot_throughput(result, out.with_name(out.stem + "_throughput.png")),
                 plot_latency_cdfs(result, out.with_name(out.stem + "_latency_cdf.png"))):
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
