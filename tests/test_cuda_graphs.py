"""Bucketed decode through static buffers (engine/cuda_graphs.py): the padded forward without
capture equals the unpadded eager forward on the tiny model, padding never writes the KV cache,
ModelRunner takes the path only for qualifying steps; the CUDA capture (GPU only); and the
Triton interpreter lock (two threads launching different Triton ops at once)."""
from __future__ import annotations

import contextlib
import random
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from unimlm_engine.engine.cuda_graphs import DecodeGraphRunner
from unimlm_engine.engine.paged_attention import PagedAttention, PagedAttentionMetadata, PagedKVCache
from unimlm_engine.engine.runner import ModelRunner
from unimlm_engine.engine.superlink import SuperLinks
from unimlm_engine.model import build_model
from unimlm_engine.ops._dispatch import backend_override, interpreter_lock, triton_launch_guard
from unimlm_engine.config.presets import get_preset

HAS_CUDA = torch.cuda.is_available()
BS = 16
# padding rows read the NaN-poisoned block 0 on purpose; numpy (the interpreter) warns about it
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny-random"), seed=0, with_decoders=False)


def _cache(model, num_blocks: int, device="cpu") -> PagedKVCache:
    """A cache whose every entry is NaN: a read of an unwritten or padding-only slot poisons its row."""
    c = model.cfg.llm
    cache = PagedKVCache(c.num_hidden_layers, num_blocks, BS, c.num_key_value_heads, c.head_dim, torch.float32, device)
    for t in cache.k + cache.v:
        t.fill_(float("nan"))
    return cache


def _clone(cache: PagedKVCache) -> PagedKVCache:
    new = PagedKVCache.__new__(PagedKVCache)
    for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim", "dtype"):
        setattr(new, name, getattr(cache, name))
    new.k, new.v = [t.clone() for t in cache.k], [t.clone() for t in cache.v]
    return new


def _decode_batch(model, cache: PagedKVCache, ctx_lens: list[int], seed: int):
    """Random history: fill each sequence's first ctx-1 positions with random K/V through shuffled
    block tables that never use block 0 (padding rows read it). -> ids, positions, slots [N], tables."""
    rng = random.Random(seed)
    free = rng.sample(range(1, cache.num_blocks), cache.num_blocks - 1)
    tables = [[free.pop() for _ in range(-(-n // BS))] for n in ctx_lens]
    for table, n in zip(tables, ctx_lens):
        for p in range(n - 1):
            blk, off = table[p // BS], p % BS
            for t in cache.k + cache.v:
                t[blk, off] = torch.randn(t.shape[2:])
    ids = np.array([rng.randrange(model.cfg.llm.vocab_size) for _ in ctx_lens], dtype=np.int64)
    pos = np.array([n - 1 for n in ctx_lens], dtype=np.int64)
    slots = np.array([t[(n - 1) // BS] * BS + (n - 1) % BS for t, n in zip(tables, ctx_lens)], dtype=np.int64)
    return ids, pos, slots, tables


def _eager(model, cache, ids, pos, tables) -> torch.Tensor:
    """The unpadded eager decode forward (the runner's eager path) -> [N, hidden]."""
    attn = PagedAttention(cache)
    ctx = [int(p) + 1 for p in pos]
    attn.set_metadata(PagedAttentionMetadata.build([1] * len(ids), ctx, tables, BS, cache.device))
    dev = cache.device
    return model.llm.forward(model.llm.embed(torch.from_numpy(ids).to(dev)), torch.from_numpy(pos).to(dev), attn)


def _padded_table(tables) -> np.ndarray:
    out = np.full((len(tables), max(len(t) for t in tables)), -1, dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, :len(t)] = t
    return out


def _assert_cache(got: PagedKVCache, expected: PagedKVCache, slots: np.ndarray, written: bool = True,
                  tol: float = 1e-5) -> None:
    """Every slot outside `slots` is bit-identical (padding wrote nothing); with `written`, the
    real slots also match the eager write."""
    for g, e in zip(got.k + got.v, expected.k + expected.v):
        g2, e2 = g.reshape(-1, *g.shape[2:]), e.reshape(-1, *e.shape[2:])
        keep = torch.ones(g2.shape[0], dtype=torch.bool, device=g.device)
        keep[torch.from_numpy(slots).to(g.device)] = False
        torch.testing.assert_close(g2[keep], e2[keep], atol=0, rtol=0, equal_nan=True)
        if written:
            torch.testing.assert_close(g2[~keep], e2[~keep], atol=tol, rtol=tol)


CASES = {  # name: (context lengths, buckets); the step runs on the smallest bucket >= N
    "n1-bucket1": ([37], (1, 2, 4)),
    "n3-bucket4": ([1, 17, 50], (1, 2, 4, 8)),
    "n5-bucket8": ([16, 2, 33, 64, 9], (8,)),
    "n7-bucket8-of-16": ([5, 31, 32, 47, 1, 70, 12], (1, 8, 16)),
}


@pytest.mark.parametrize("case, backend", [(c, "reference") for c in CASES] +
                         [pytest.param(c, "triton", marks=pytest.mark.triton_cpu)
                          for c in ("n3-bucket4", "n7-bucket8-of-16")])
@torch.inference_mode()
def test_padded_decode_equals_eager(model, case, backend):
    ctx_lens, sizes = CASES[case]
    base = _cache(model, 40)
    ids, pos, slots, tables = _decode_batch(model, base, ctx_lens, seed=len(ctx_lens))
    eager_cache, graph_cache = _clone(base), _clone(base)
    runner = DecodeGraphRunner(model.llm, PagedAttention(graph_cache), sizes, max_context=96, capture=False)
    with backend_override(backend):
        expected = _eager(model, eager_cache, ids, pos, tables)
        got = runner.run(ids, pos, slots, _padded_table(tables))
    assert runner.bucket_for(len(ids)) == min(s for s in sizes if s >= len(ids))
    assert got.shape == expected.shape and not got.isnan().any()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    _assert_cache(graph_cache, eager_cache, slots)
    assert runner._buckets[runner.bucket_for(len(ids))].meta.max_context_len == max(ctx_lens)  # uncaptured: live


@torch.inference_mode()
def test_one_staging_buffer_and_one_copy_per_step(model, monkeypatch):
    """The five static inputs are views of one device buffer, filled from one host staging buffer
    (pinned only for a CUDA device) by exactly one copy per step."""
    runner = DecodeGraphRunner(model.llm, PagedAttention(_cache(model, 40)), (2, 4), max_context=64, capture=False)
    storage = runner._dev.untyped_storage().data_ptr()
    for t in (runner.ids, runner.positions, runner.slot_mapping, runner.context_lens, runner.block_tables):
        assert t.untyped_storage().data_ptr() == storage
    assert not runner._host.is_pinned() and runner._host.shape == runner._dev.shape  # a CPU cache: nothing to pin
    copies = []
    copy = torch.Tensor.copy_

    def counting(dst, src, non_blocking=False):
        if dst.untyped_storage().data_ptr() == storage:
            copies.append((src.untyped_storage().data_ptr() == runner._host.untyped_storage().data_ptr(),
                           non_blocking))
        return copy(dst, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", counting)
    ids, pos, slots, tables = _decode_batch(model, _cache(model, 40), [3, 40, 17], seed=4)
    with backend_override("reference"):
        runner.run(ids, pos, slots, _padded_table(tables))
        runner.run(ids[:1], pos[:1], slots[:1], _padded_table(tables[:1]))
    assert copies == [(True, True), (True, True)]
    assert runner.context_lens[:2].tolist() == [int(pos[0]) + 1, 1] and runner.slot_mapping[1] == -1


@torch.inference_mode()
def test_fewer_rows_in_a_used_bucket_reset_the_stale_rows(model):
    """7 sequences, then 4 in the same bucket of 8: rows 4..6 must be padding again (the first
    step's slots must not be rewritten, its contexts not re-read)."""
    base = _cache(model, 40)
    first = _decode_batch(model, base, [5, 31, 33, 47, 1, 70, 12], seed=1)  # the first 4 stay in their blocks
    eager_cache, graph_cache = _clone(base), _clone(base)
    runner = DecodeGraphRunner(model.llm, PagedAttention(graph_cache), (8,), max_context=80, capture=False)
    ids, pos, slots, tables = first
    with backend_override("reference"):  # the reset is host-side buffer logic, the same for every backend
        _eager(model, eager_cache, ids, pos, tables)
        runner.run(ids, pos, slots, _padded_table(tables))
        nxt = (ids[:4] + 1, pos[:4] + 1, np.array([t[p // BS] * BS + p % BS for t, p in zip(tables, pos[:4] + 1)]),
               tables[:4])
        expected = _eager(model, eager_cache, nxt[0], nxt[1], nxt[3])
        snapshot = _clone(graph_cache)
        got = runner.run(nxt[0], nxt[1], nxt[2], _padded_table(nxt[3]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    _assert_cache(graph_cache, eager_cache, np.concatenate([slots, nxt[2]]))
    _assert_cache(graph_cache, snapshot, nxt[2], written=False)


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: replay does nothing but count."""

    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


class _FakeStream:
    def wait_stream(self, other):
        assert isinstance(other, _FakeStream)


@torch.inference_mode()
def test_capture_control_flow_with_fake_cuda(model, monkeypatch):
    """The capture path's Python on the CPU with torch.cuda faked (same signatures): two warm-ups on
    the side stream, then one capture on that stream into the shared pool, all on padding (the KV
    cache is untouched); later steps only replay; the step's inputs land in the static buffers."""
    events: list[str] = []
    side: list[_FakeStream] = []

    @contextlib.contextmanager
    def stream_ctx(stream):
        assert stream is side[0]
        events.append("side-stream")
        yield

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        assert isinstance(cuda_graph, _FakeGraph) and pool == "pool" and stream is side[0]
        assert capture_error_mode == "thread_local"
        events.append("capture")
        yield

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: side.append(_FakeStream()) or side[-1])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", stream_ctx)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    base = _cache(model, 12)
    ids, pos, slots, tables = _decode_batch(model, base, [3, 20, 17], seed=3)
    cache = _clone(base)
    runner = DecodeGraphRunner(model.llm, PagedAttention(cache), (2, 4), max_context=40, capture=False)
    runner.capture = True
    forward = runner._forward
    runner._forward = lambda bucket: events.append(f"forward{bucket.size}") or forward(bucket)
    got = runner.run(ids, pos, slots, _padded_table(tables))
    assert events == ["side-stream", "forward4", "forward4", "capture", "forward4"]
    assert runner.captured == (4,) and len(side) == 1
    bucket = runner._buckets[4]
    assert bucket.meta.max_context_len == runner.max_blocks * BS  # a graph's split count: the context bound
    assert bucket.graph.replays == 1 and got.data_ptr() != bucket.hidden.data_ptr()
    torch.testing.assert_close(got, bucket.hidden[:3], atol=0, rtol=0, equal_nan=True)
    _assert_cache(cache, base, np.zeros(0, np.int64))  # warm-ups and capture wrote nothing
    assert runner.ids[:4].tolist() == [*ids, 0] and runner.positions[:4].tolist() == [*pos, 0]
    assert runner.slot_mapping[:4].tolist() == [*slots, -1] and runner.context_lens[:4].tolist() == [*(pos + 1), 1]
    assert runner.block_tables[3, 0] == 0 and runner.block_tables[1, :2].tolist() == tables[1]
    runner.run(ids[:2], pos[:2], slots[:2], _padded_table(tables[:2]))
    runner.run(ids[1:], pos[1:], slots[1:], _padded_table(tables[1:]))
    assert runner.captured == (2, 4) and len(side) == 1 and bucket.graph.replays == 1
    assert runner._buckets[2].graph.replays == 2 and events.count("capture") == 2


def test_fits_and_bad_arguments(model):
    cache = _cache(model, 4)
    runner = DecodeGraphRunner(model.llm, PagedAttention(cache), (4, 1, 2), max_context=40, capture=False)
    assert runner.sizes == (1, 2, 4) and runner.max_blocks == 3
    assert runner.fits(4, 48) and not runner.fits(5, 1) and not runner.fits(1, 49) and not runner.fits(0, 1)
    assert [runner.bucket_for(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    with pytest.raises(ValueError, match="do not fit"):
        runner.run(np.zeros(5, np.int64), np.zeros(5, np.int64), np.zeros(5, np.int64), np.zeros((5, 1), np.int32))
    with pytest.raises(ValueError, match="positive"):
        DecodeGraphRunner(model.llm, PagedAttention(cache), (), max_context=40, capture=False)
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphRunner(model.llm, PagedAttention(cache), (1,), max_context=40, capture=True)


class _Seq:
    """The fields of engine.sequence.Sequence that ModelRunner.execute reads."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.prompt_len, self.patch_index = tokens, len(tokens), None

    def needs_images(self, start: int, end: int) -> bool:
        return False


def _step(seqs, tables, starts, counts, block_size=BS):
    """A StepOutput stand-in (the fields execute reads) for sequences fed tokens [start, start + count)."""
    qsl = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    slots = [tables[i][p // block_size] * block_size + p % block_size
             for i, (a, n) in enumerate(zip(starts, counts)) for p in range(a, a + n)]
    width = max(len(t) for t in tables)

    def block_tables(pad=-1):
        return np.array([t + [pad] * (width - len(t)) for t in tables], dtype=np.int32)
    return SimpleNamespace(num_new_tokens=np.array(counts), num_computed=np.array(starts), query_start_loc=qsl,
                           slot_mapping=np.array(slots, dtype=np.int64), block_tables=block_tables,
                           is_prefill=np.array([a < s.prompt_len for s, a in zip(seqs, starts)]))


def _generate(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Prefill every prompt, then greedy decode; sequence 0 stops one step early. -> hidden per step."""
    seqs = [_Seq(list(p)) for p in prompts]
    free = random.Random(0).sample(range(runner.cache.num_blocks), runner.cache.num_blocks)
    tables: list[list[int]] = [[] for _ in seqs]
    starts, counts, hiddens = [0] * len(seqs), [len(p) for p in prompts], []
    for step in range(steps):
        live = [i for i in range(len(seqs)) if not (i == 0 and step == steps - 1)]
        for i in live:
            while len(tables[i]) * BS < starts[i] + counts[i]:
                tables[i].append(free.pop())
        out = _step([seqs[i] for i in live], [tables[i] for i in live], [starts[i] for i in live],
                    [counts[i] for i in live])
        hidden, last = runner.execute(out, [seqs[i] for i in live])
        hiddens.append(hidden)
        nxt = runner.logits(hidden[last]).argmax(-1).tolist()
        for i, tok in zip(live, nxt):
            seqs[i].tokens.append(tok)
            starts[i], counts[i] = starts[i] + counts[i], 1
    return hiddens


@torch.inference_mode()
def test_model_runner_decode_path_equals_eager(model):
    eager = ModelRunner(model, 24, BS, cuda_graphs=False)
    padded = ModelRunner(model, 24, BS, cuda_graph_batch_sizes=(1, 2, 4), cuda_graph_max_context=64,
                         graph_capture=False)
    assert eager.graphs is None and padded.graphs is not None
    calls = []
    run = padded.graphs.run
    padded.graphs.run = lambda *a: calls.append(len(a[0])) or run(*a)
    prompts = [[5, 9, 200, 3, 7], list(range(20, 38)), [1, 2]]
    for got, expected in zip(_generate(padded, prompts, 5), _generate(eager, prompts, 5)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert calls == [3, 3, 3, 2]  # the prefill step is eager; the last step has 2 sequences (bucket 2)


@torch.inference_mode()
def test_model_runner_falls_back_to_eager(model):
    runner = ModelRunner(model, 24, BS, cuda_graph_batch_sizes=(1, 2), cuda_graph_max_context=32,
                         graph_capture=False)
    runner.graphs.run = lambda *a: pytest.fail("the graph path must not run for this step")
    marker = _Seq([5, 6, SuperLinks(model).markers("[DET]")[0]])
    long_seq = _Seq(list(range(40)))
    cases = [([marker], [[3]], [2]),  # a super-link query marker
             ([long_seq], [[4, 5, 6]], [39]),  # context 40 > cuda_graph_max_context
             ([_Seq([1, 2]), _Seq([3, 4]), _Seq([5, 6])], [[7], [8], [9]], [1, 1, 1])]  # 3 > largest bucket
    for seqs, tables, starts in cases:
        hidden, _ = runner.execute(_step(seqs, tables, starts, [1] * len(seqs)), seqs)
        assert hidden.shape[0] == len(seqs)


@torch.inference_mode()
def test_a_failing_capture_switches_the_runner_to_eager(model):
    runner = ModelRunner(model, 8, BS, cuda_graph_batch_sizes=(2,), graph_capture=False)
    seqs = [_Seq([1, 2]), _Seq([3, 4])]
    out = _step(seqs, [[1], [2]], [1, 1], [1, 1])

    def broken(*args):
        raise RuntimeError("operation not permitted when stream is capturing")
    runner.graphs.run = broken
    with pytest.raises(RuntimeError, match="capturing"):  # without capture an error is a bug: raised
        runner.execute(out, seqs)
    runner.graphs.capture = True
    with pytest.warns(RuntimeWarning, match="CUDA graph decode disabled"):
        hidden, _ = runner.execute(out, seqs)
    assert runner.graphs is None and hidden.shape[0] == 2 and not hidden.isnan().any()


def test_no_graph_path_on_cpu_by_default(model):
    assert ModelRunner(model, 4, BS).graphs is None


def test_launch_guard_holds_the_lock_only_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with triton_launch_guard():
        assert interpreter_lock.locked()
    assert not interpreter_lock.locked()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with triton_launch_guard():
        assert not interpreter_lock.locked()


def _msda_job():
    from unimlm_engine.ops.msda import ms_deform_attn, ms_deform_attn_reference
    levels = torch.tensor([[7, 9], [4, 5]])
    starts = torch.tensor([0, 63])
    value = torch.randn(2, 83, 3, 13)
    loc, attn = torch.rand(2, 11, 3, 2, 3, 2), torch.rand(2, 11, 3, 2, 3).softmax(-1)
    expected = ms_deform_attn_reference(value, levels, starts, loc, attn)
    return lambda: ms_deform_attn(value, levels, starts, loc, attn), expected


def _paged_job():
    from unimlm_engine.ops.paged_attention import paged_decode_attention, paged_decode_reference
    kc, vc = torch.randn(6, BS, 2, 24), torch.randn(6, BS, 2, 24)
    q, tables = torch.randn(3, 4, 24), torch.tensor([[5, 0], [2, 3], [1, 4]], dtype=torch.int32)
    ctx = torch.tensor([3, 31, 17], dtype=torch.int32)
    expected = paged_decode_reference(q, kc, vc, tables, ctx, 0.2)
    return lambda: paged_decode_attention(q, kc, vc, tables, ctx, 0.2), expected


def _lora_job():
    from unimlm_engine.ops.lora_moe import lora_moe_linear, lora_moe_reference
    x, w0, wr = torch.randn(5, 32), torch.randn(24, 32), torch.randn(4, 32)
    a, b = torch.randn(8, 32), torch.randn(24, 8)
    expected = lora_moe_reference(x, w0, wr, a, b, 2.0)
    return lambda: lora_moe_linear(x, w0, wr, a, b, 2.0), expected


@pytest.mark.triton_cpu
def test_two_threads_launch_different_triton_ops():
    msda, paged, lora = _msda_job(), _paged_job(), _lora_job()
    results: dict[str, list] = {"msda": [], "paged+lora": []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(name):
        try:
            with backend_override("triton"):
                barrier.wait()
                for _ in range(3):
                    if name == "msda":
                        results[name].append((msda[0](), msda[1]))
                    else:
                        results[name].append((paged[0](), paged[1]))
                        results[name].append((lora[0](), lora[1]))
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results["msda"]) == 3 and len(results["paged+lora"]) == 6
    for got, expected in results["msda"] + results["paged+lora"]:
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graph capture needs a GPU")
@pytest.mark.parametrize("bucket", [1, 8, 64], ids=lambda b: f"bucket{b}")
@torch.inference_mode()
def test_capture_and_replay_equal_eager_on_cuda(bucket):
    model = build_model(get_preset("tiny-random"), seed=0, with_decoders=False, device="cuda")
    base = _cache(model, 600, device="cuda")
    runner_cache = _clone(base)
    runner = DecodeGraphRunner(model.llm, PagedAttention(runner_cache), (1, 8, 64), max_context=128, capture=True)
    assert runner._host.is_pinned()  # the staging buffer of a CUDA runner
    eager_cache = _clone(base)
    for step, n in enumerate([bucket, max(1, bucket - 3)]):  # a full bucket, then one with padding rows
        host = _cache(model, 600, device="cpu")
        ctx = [1 + (7 * i + 5 * step) % 100 for i in range(n)]
        ids, pos, slots, tables = _decode_batch(model, host, ctx, seed=step)
        for dst in (runner_cache, eager_cache):
            for t, h in zip(dst.k + dst.v, host.k + host.v):
                written = ~h.isnan()
                t[written.to(t.device)] = h[written].to(t.device)
        expected = _eager(model, eager_cache, ids, pos, tables)
        got = runner.run(ids, pos, slots, _padded_table(tables))
        assert runner.captured == (bucket,)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        _assert_cache(runner_cache, eager_cache, slots, tol=1e-4)
