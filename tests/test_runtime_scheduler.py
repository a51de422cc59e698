"""Scheduler through the bindings: a toy engine loop writes a fake KV cache through
slot_mapping and reads it back through the step's block tables."""
import threading

import numpy as np
import pytest

from unimlm_engine import _C


def make(num_blocks=64, block_size=4, budget=32, max_seqs=8, policy=_C.SchedulingPolicy.FCFS, **kw):
    cfg = _C.SchedulerConfig(num_blocks=num_blocks, block_size=block_size, max_num_batched_tokens=budget,
                             max_num_seqs=max_seqs, policy=policy, **kw)
    return _C.Scheduler(cfg)


class ToyEngine:
    """Drives a Scheduler like the Python engine will: KV writes, reads, sampling."""

    def __init__(self, sched, rng):
        self.s, self.rng = sched, rng
        cfg = sched.config
        self.bs = cfg.block_size
        self.kv = np.full(cfg.num_blocks * cfg.block_size, -1, dtype=np.int64)
        self.tokens = {}

    def add(self, sid, prompt, priority=0):
        self.s.add_request(sid, prompt, priority)
        self.tokens[sid] = list(prompt)

    def step(self, finish_after=None):
        out = self.s.step()
        for src, dst in out.cow:
            self.kv[dst * self.bs:(dst + 1) * self.bs] = self.kv[src * self.bs:(src + 1) * self.bs]
        tables, qsl = out.block_tables(pad=-1), out.query_start_loc
        assert tables.dtype == np.int32 and tables.shape[0] == len(out)
        assert out.slot_mapping.dtype == np.int64 and out.slot_mapping.shape == (qsl[-1],)
        for i, sid in enumerate(out.seq_ids.tolist()):
            toks, start, n = self.tokens[sid], int(out.num_computed[i]), int(out.num_new_tokens[i])
            self.kv[out.slot_mapping[qsl[i]:qsl[i + 1]]] = toks[start:start + n]
            pos = np.arange(start + n)
            read = self.kv[tables[i][pos // self.bs] * self.bs + pos % self.bs]
            np.testing.assert_array_equal(read, toks[:start + n])
        for i, sid in enumerate(out.seq_ids.tolist()):
            if not out.do_sample[i]:
                self.s.update(sid, [])
            elif finish_after is not None and len(self.tokens[sid]) >= finish_after:
                self.s.finish(sid)
                del self.tokens[sid]
            else:
                new = [int(self.rng.integers(0, 5))]
                self.tokens[sid] += new
                self.s.update(sid, new)
        for sid in out.rejected:
            del self.tokens[sid]
        self.s.check_invariants()
        return out


def test_chunked_prefill_then_decode_then_superlink():
    s = make(budget=10)
    s.add_request(1, list(range(23)))
    out = s.step()
    assert out.num_new_tokens.tolist() == [10] and out.is_prefill.tolist() == [True]
    assert out.do_sample.tolist() == [False]
    s.update(1, [])
    s.step()
    s.update(1, [])
    out = s.step()
    assert out.num_new_tokens.tolist() == [3] and out.num_computed.tolist() == [20]
    assert out.do_sample.tolist() == [True]
    s.update(1, [5])
    out = s.step()
    assert out.num_new_tokens.tolist() == [1] and out.is_prefill.tolist() == [False]
    k_queries = [900, 901, 902, 903]
    s.update(1, [42] + k_queries)  # routing token + K super-link query positions
    out = s.step()
    assert out.num_new_tokens.tolist() == [5] and out.num_computed.tolist() == [24]
    table = out.block_table(0)
    assert out.slot_mapping.tolist() == [table[p // 4] * 4 + p % 4 for p in range(24, 29)]


@pytest.mark.parametrize("policy", [_C.SchedulingPolicy.FCFS, _C.SchedulingPolicy.PRIORITY], ids=["fcfs", "priority"])
@pytest.mark.parametrize("num_blocks", [13, 61], ids=["tight-pool-13", "roomy-pool-61"])
def test_toy_engine_loop_kv_consistent(policy, num_blocks):
    rng = np.random.default_rng(num_blocks)
    eng = ToyEngine(make(num_blocks=num_blocks, budget=17, max_seqs=5, policy=policy), rng)
    shared = [1, 2, 3, 4, 1, 2, 3, 4]
    preempted = 0
    for sid in range(20):
        eng.add(sid, shared + [int(t) for t in rng.integers(0, 5, size=int(rng.integers(1, 15)))],
                priority=int(rng.integers(0, 3)))
    for _ in range(400):
        preempted += len(eng.step(finish_after=30).preempted)
        if not eng.tokens:
            break
    assert not eng.tokens, "every sequence finishes"
    assert eng.s.num_free_blocks == num_blocks and eng.s.num_running == 0
    if num_blocks == 13:
        assert preempted > 0 and eng.s.num_preemptions == preempted


def test_priority_and_preemption_victim():
    s = make(num_blocks=4, block_size=4, budget=64, policy=_C.SchedulingPolicy.PRIORITY)
    s.add_request(1, list(range(7)), priority=9)
    s.add_request(2, list(range(10, 17)), priority=0)
    out = s.step()
    assert out.seq_ids.tolist() == [2, 1]
    s.update(1, [1, 2])
    s.update(2, [1, 2])
    out = s.step()
    assert out.preempted == [1] and out.seq_ids.tolist() == [2]
    assert s.state(1) == _C.SeqState.WAITING and s.num_computed_tokens(1) == 0


def test_urgent_arrival_preempts_less_urgent_running():
    s = make(num_blocks=4, block_size=4, budget=64, policy=_C.SchedulingPolicy.PRIORITY)
    s.add_request(1, list(range(15)), priority=5)
    s.step()
    s.update(1, [])
    s.add_request(2, [1, 2, 3], priority=0)
    out = s.step()
    assert out.preempted == [1] and out.seq_ids.tolist() == [2]
    s.check_invariants()


def test_queue_full_never_fits_and_abort():
    s = make(num_blocks=4, block_size=4, max_queue_size=2)
    s.add_request(1, [1, 2, 3])
    s.add_request(2, [1, 2, 3])
    with pytest.raises(_C.QueueFullError, match="queue full"):
        s.add_request(3, [1])
    assert issubclass(_C.QueueFullError, RuntimeError)
    with pytest.raises(ValueError, match="can never fit"):
        s.add_request(4, list(range(17)))
    with pytest.raises(ValueError, match="already exists"):
        s.add_request(1, [1])
    s.step()
    assert s.abort(1) and not s.abort(1) and 1 not in s
    assert not s.update(1, [3])
    with pytest.raises(IndexError):
        s.finish(1)
    s.abort(2)
    assert s.num_free_blocks == 4
    with pytest.raises(ValueError, match="max_num_seqs"):
        _C.SchedulerConfig(max_num_seqs=0)


def test_multithreaded_submit_while_stepping():
    s = make(num_blocks=200, block_size=4, budget=64, max_seqs=16, max_queue_size=10_000)
    n_threads, per = 4, 50
    errors = []

    def submitter(t):
        try:
            for i in range(per):
                s.add_request(t * per + i, [t, i % 7, 1, 2, 3], priority=i % 3)
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    finished = set()
    lengths = {}
    for _ in range(100_000):  # bounded: a scheduling bug fails below instead of hanging
        if len(finished) == n_threads * per:
            break
        out = s.step()
        for i, sid in enumerate(out.seq_ids.tolist()):
            if not out.do_sample[i]:
                continue
            lengths[sid] = lengths.get(sid, 0) + 1
            if lengths[sid] == 3:
                s.finish(sid)
                finished.add(sid)
            else:
                s.update(sid, [7])
        if not len(out) and not any(th.is_alive() for th in threads) and s.num_waiting == 0 and s.num_running == 0:
            break
    for th in threads:
        th.join()
    assert not errors
    assert finished == set(range(n_threads * per))
    s.check_invariants()
    assert s.num_free_blocks == 200
