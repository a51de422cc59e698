"""Microbenchmarks of the C++ runtime core through its bindings (unimlm_engine._C).

  scheduler step     256 running decode sequences (prompt 500 tokens, block 16):
                     step() alone, step() + the arrays a model runner reads, and a
                     full loop iteration (step + update_batch of 256 sampled tokens)
  block manager      appends (allocate_slots + commit) per second through the bindings
  decoder batcher    submit -> batch latency to a worker thread blocked in next_batch
  request queue      push -> pop latency to a consumer thread blocked in pop

Every figure includes the pybind11 call (GIL release/acquire) the Python engine pays.
Prints a table and writes benchmarks/results/bench_runtime.json.
Usage: python benchmarks/bench_runtime.py [--seqs 256] [--steps 2000]
"""
import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from unimlm_engine import _C


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def summary(name, xs_us, unit="us"):
    return {"name": name, "unit": unit, "median": statistics.median(xs_us), "p99": pct(xs_us, 99),
            "mean": statistics.fmean(xs_us), "n": len(xs_us)}


def bench_scheduler(num_seqs, steps, prompt_len=500, block_size=16):
    blocks = num_seqs * ((prompt_len + steps + 64) // block_size + 2)
    cfg = _C.SchedulerConfig(num_blocks=blocks, block_size=block_size, max_num_seqs=num_seqs,
                             max_num_batched_tokens=8192, max_queue_size=num_seqs)
    s = _C.Scheduler(cfg)
    rng = np.random.default_rng(0)
    for i in range(num_seqs):
        s.add_request(i, rng.integers(0, 32000, size=prompt_len).tolist())
    while True:  # prefill everything
        out = s.step()
        ids = out.seq_ids[out.do_sample].tolist()
        for sid in out.seq_ids.tolist():
            if sid not in ids:
                s.update(sid, [])
        s.update_batch(ids, [1] * len(ids))
        if len(out) == num_seqs and not out.is_prefill.any():
            break
    assert s.num_running == num_seqs
    ids = list(range(num_seqs))
    toks = [7] * num_seqs
    step_us, step_arrays_us, loop_us = [], [], []
    for k in range(steps):
        t0 = time.perf_counter_ns()
        out = s.step()
        t1 = time.perf_counter_ns()
        if k % 2:
            _ = (out.slot_mapping, out.block_tables(), out.query_start_loc, out.num_computed)
            step_arrays_us.append((time.perf_counter_ns() - t0) / 1e3)
        s.update_batch(ids, toks)
        t2 = time.perf_counter_ns()
        assert len(out) == num_seqs and out.num_batched_tokens == num_seqs
        step_us.append((t1 - t0) / 1e3)
        loop_us.append((t2 - t0) / 1e3)
    s.check_invariants()
    return [summary(f"scheduler.step() [{num_seqs} decode seqs]", step_us),
            summary(f"step() + read arrays (slots, padded tables) [{num_seqs}]", step_arrays_us),
            summary(f"step() + update_batch() loop [{num_seqs}]", loop_us)]


def bench_block_manager(n_appends=100_000, block_size=16, seqs=256):
    bm = _C.BlockManager(seqs * (n_appends // seqs // block_size + 2), block_size)
    toks = {i: [i] for i in range(seqs)}
    for i in range(seqs):
        bm.match_prefix(i, toks[i])
        bm.allocate_slots(i, 0, 1)
    t0 = time.perf_counter()
    for k in range(n_appends):
        sid = k % seqs
        t = toks[sid]
        t.append(k & 1023)
        bm.allocate_slots(sid, len(t) - 1, len(t))
        bm.commit(sid, t, len(t))
    dt = time.perf_counter() - t0
    bm.check_invariants()
    return [{"name": "block manager append (allocate_slots + commit, Python calls)", "unit": "appends/s",
             "median": n_appends / dt, "p99": None, "mean": n_appends / dt, "n": n_appends}]


def bench_batcher(n=2000):
    b = _C.DecoderBatcher()
    b.add_decoder("det", _C.DecoderPolicy(max_batch_size=1, max_queue_delay_us=1_000_000))
    lat = []

    def worker():
        while True:
            got = b.next_batch("det")
            if got.closed:
                return
            now = _C.DecoderBatcher.now_us()
            lat.extend(now - x.enqueue_us for x in got.items)

    th = threading.Thread(target=worker)
    th.start()
    for i in range(n):
        b.submit("det", _C.BatchItem(i, i, payload=i))
        while len(lat) <= i:
            time.sleep(0)
    b.close()
    th.join()
    return [summary("batcher submit -> batch in a blocked worker thread", lat)]


def bench_queue(n=2000):
    q = _C.RequestQueue(1024)
    lat, stamps = [], {}

    def consumer():
        while (x := q.pop()) is not None:
            lat.append((time.perf_counter_ns() - stamps[x]) / 1e3)

    th = threading.Thread(target=consumer)
    th.start()
    for i in range(n):
        stamps[i] = time.perf_counter_ns()
        q.push(i)
        while len(lat) <= i:
            time.sleep(0)
    q.close()
    th.join()
    return [summary("request queue push -> pop in a blocked consumer thread", lat)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_runtime.json"))
    args = ap.parse_args()
    rows = bench_scheduler(args.seqs, args.steps) + bench_block_manager() + bench_batcher() + bench_queue()
    print(f"{'benchmark':<62} {'median':>12} {'p99':>10} {'unit':>10}")
    for r in rows:
        p99 = f"{r['p99']:.1f}" if r["p99"] is not None else "-"
        print(f"{r['name']:<62} {r['median']:>12.1f} {p99:>10} {r['unit']:>10}")
    target = rows[0]["median"] < 100.0
    print(f"target: scheduler step for {args.seqs} seqs well under 100 us -> {'met' if target else 'NOT met'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "processor": platform.processor(),
                               "python": platform.python_version(), "seqs": args.seqs,
                               "steps": args.steps, "results": rows, "step_target_met": target}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
