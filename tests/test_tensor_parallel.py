"""Tensor parallelism of the LLM (issue 17): Megatron-style split layers over gloo on the CPU.

- The split math: the TP=2 decoder stack (ranks as threads of this process, one real gloo group) gives
  the unsplit LLM's hidden states; the row-parallel LoRA-MoE equals the per-expert LoRAMoE formula.
- The engine: TP=2 (worker processes, gloo) gives TP=1's greedy tokens and super-link payloads (1e-5) for
  mixed requests (text, ids, images, routed DET / SEG / POSE, LoRA-MoE in every FFN of `tiny`), and a
  killed worker fails the requests in flight with WorkerDiedError within a few seconds.
Spawned workers start slowly on a shared machine: one TP=2 engine serves the equivalence tests.
"""
import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch

import unimlm_engine as ue
from engine_helpers import IMAGES, tiny_model
from unimlm_engine.cli.parser import build_parser
from unimlm_engine.config import ConfigError, LLMConfig, LoRAMoEConfig
from unimlm_engine.distributed import WorkerDiedError, check_tp
from unimlm_engine.distributed.comm import TPGroup, make_store
from unimlm_engine.distributed.layers import RowParallelLoRAMoE, TPLlamaStack, shard_state
from unimlm_engine.engine.types import EngineClosedError
from unimlm_engine.model.attention import ContiguousKVCache
from unimlm_engine.model.llm import LLM
from unimlm_engine.ops.lora_moe import lora_moe_per_expert_loop


def _on_ranks(tp: int, fn):
    """fn(group) on tp threads joined by one gloo group -> [result of rank 0, ..., rank tp-1]."""
    store = make_store("127.0.0.1", 0, tp, True, 30.0)
    results, errors = [None] * tp, []

    def run(rank):
        try:
            group = TPGroup(rank, tp, "gloo", 30.0)
            group.connect(store if rank == 0 else make_store("127.0.0.1", store.port, tp, False, 30.0))
            results[rank] = fn(group)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("tp", [2, 4])
def test_split_stack_equals_unsplit_llm(tp):
    torch.manual_seed(0)
    cfg = LLMConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=4)
    lora = LoRAMoEConfig(num_experts=3, rank=2, alpha=4.0)
    llm = LLM(cfg, lora).eval()
    with torch.no_grad():  # LoRA-MoE terms as large as the base: a wrong split shows
        for p in llm.parameters():
            p.normal_(0, 0.2)
    prompt, step = torch.randn(7, 64), torch.randn(1, 64)
    with torch.inference_mode():
        cache = ContiguousKVCache(cfg.num_hidden_layers)
        ref = [llm.forward(prompt, torch.arange(7), cache), llm.forward(step, torch.tensor([7]), cache)]
    full = llm.model.state_dict()

    def rank_fn(group):
        stack = TPLlamaStack(cfg, lora, group)
        stack.load_state_dict(shard_state(full, group.rank, tp), strict=True)
        assert stack.layers[0].self_attn.k_proj.weight.shape[0] == cfg.num_key_value_heads // tp * cfg.head_dim
        kv = ContiguousKVCache(cfg.num_hidden_layers)  # this rank's KV heads only
        with torch.inference_mode():
            out = [stack(prompt, torch.arange(7), kv), stack(step, torch.tensor([7]), kv)]
        assert kv.k[0].shape[1] == cfg.num_key_value_heads // tp
        return out

    for outs in _on_ranks(tp, rank_fn):
        for got, want in zip(outs, ref):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_row_parallel_lora_moe_equals_per_expert_formula():
    torch.manual_seed(1)
    k, n, tp = 12, 5, 2
    lora = LoRAMoEConfig(num_experts=4, rank=3, alpha=6.0)
    w0, router = torch.randn(n, k), torch.randn(4, k)
    a, b = torch.randn(12, k), torch.randn(n, 12)
    x = torch.randn(6, k)
    want = lora_moe_per_expert_loop(x, w0, router, a, b, lora.scaling)

    def rank_fn(group):
        lin = RowParallelLoRAMoE(k // tp, n, lora, group)
        sl = slice(group.rank * k // tp, (group.rank + 1) * k // tp)
        lin.load_state_dict({"weight": w0[:, sl], "lora_router": router[:, sl], "lora_A": a[:, sl], "lora_B": b})
        return lin(x[:, sl])

    for got in _on_ranks(tp, rank_fn):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_tp_must_divide_kv_heads():
    cfg = LLMConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=8,
                    num_key_value_heads=2)
    check_tp(cfg, 2)
    with pytest.raises(ConfigError, match="num_key_value_heads=2"):
        check_tp(cfg, 4)
    model, tok = tiny_model()  # tiny: 2 KV heads; the check runs before any worker starts
    with pytest.raises(ConfigError, match="must divide num_key_value_heads"):
        ue.Engine(model, tok, ue.EngineConfig(tensor_parallel_size=3, num_kv_blocks=16))
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        ue.EngineConfig(tensor_parallel_size=0)


# ---- the engine with worker processes ----------------------------------------------------------------------

ENGINE_CFG = dict(num_kv_blocks=48, max_num_batched_tokens=64, max_num_seqs=8)  # chunked prefill, preemption


def _mixed_requests(tok):
    """8 requests: text, token ids, images; four of them routed (DET, SEG + DET, DET + 17 POSE, SEG)."""
    sid = tok.special_ids
    routed = {2: ("[DET]",), 3: ("[SEG]", "[DET]"), 6: ("[DET]",) + ("[POSE]",) * 17, 7: ("[SEG]",)}
    reqs = []
    for i in range(8):
        text = "Describe this " + "very " * (4 * i) + f"picture number {i}."
        forced = tuple(sid[r] for r in routed.get(i, ()))
        sp = ue.SamplingParams(max_tokens=len(forced) + 5 + i % 3, forced_prefix=forced)
        if i % 4 == 0:
            reqs.append(ue.Request(prompt=text, sampling=sp))
        elif i % 4 == 1:
            reqs.append(ue.Request(prompt_token_ids=tok.encode(text, add_bos=True), sampling=sp))
        else:
            reqs.append(ue.Request(prompt=text, images=[IMAGES[i % len(IMAGES)]], sampling=sp))
    return reqs


@pytest.fixture(scope="module")
def tp_engine():
    model, tok = tiny_model()
    engine = ue.Engine(model, tok, ue.EngineConfig(tensor_parallel_size=2, **ENGINE_CFG))
    yield engine
    engine.close()


def test_tp2_equals_tp1_on_mixed_requests(tp_engine):
    model, tok = tiny_model()
    reqs = _mixed_requests(tok)
    ref_engine = ue.Engine(model, tok, ue.EngineConfig(**ENGINE_CFG))
    try:
        want = ref_engine.generate_batch(reqs)
    finally:
        ref_engine.close()
    got = tp_engine.generate_batch(reqs)
    routes = set()
    for a, b in zip(got, want):
        assert a.error is None and b.error is None, (a.error, b.error)
        assert a.token_ids == b.token_ids
        assert [(p.route, p.token_index) for p in a.payloads] == [(p.route, p.token_index) for p in b.payloads]
        for pa, pb in zip(a.payloads, b.payloads):
            torch.testing.assert_close(pa.payload, pb.payload, atol=1e-5, rtol=1e-5)
        assert [t.route for t in a.tasks] == [t.route for t in b.tasks]
        for ta, tb in zip(a.tasks, b.tasks):
            assert repr(ta.error) == repr(tb.error)  # [POSE] after [DET] without class text: the same DecoderError
            if tb.route in ("[DET]", "[SEG]"):
                assert tb.error is None, tb.error
            if tb.boxes is not None:
                torch.testing.assert_close(torch.as_tensor(ta.boxes), torch.as_tensor(tb.boxes), atol=1e-3, rtol=1e-4)
        routes |= {p.route for p in a.payloads}
    assert routes == {"[DET]", "[SEG]", "[POSE]"}
    stats = tp_engine.stats()
    assert stats["kv_blocks_free"] == ENGINE_CFG["num_kv_blocks"]
    assert stats["preemptions"] > 0 or stats["kv_blocks_cached"] > 0


def test_tp2_streams_and_prefix_sharing(tp_engine):
    """A shared prompt prefix (cached blocks on every rank's share) and a stream give the same tokens."""
    model, tok = tiny_model()
    sp = ue.SamplingParams(max_tokens=8)
    first = tp_engine.generate("A shared system prompt, long enough to fill blocks. Question one?", sampling=sp)
    second = tp_engine.generate("A shared system prompt, long enough to fill blocks. Question one?", sampling=sp)
    assert second.num_cached_tokens > 0 and second.token_ids == first.token_ids
    ref_engine = ue.Engine(model, tok, ue.EngineConfig(**ENGINE_CFG))
    try:
        want = ref_engine.generate("A shared system prompt, long enough to fill blocks. Question one?", sampling=sp)
    finally:
        ref_engine.close()
    assert first.token_ids == want.token_ids


def test_killed_worker_fails_requests_and_closes_engine():
    model, tok = tiny_model()
    engine = ue.Engine(model, tok, ue.EngineConfig(tensor_parallel_size=2, num_kv_blocks=64))
    try:
        worker = engine.tp.procs[0]
        sp = ue.SamplingParams(max_tokens=1000, ignore_eos=True)
        handles = [engine.submit(ue.Request(prompt=f"Go on forever {i}", sampling=sp)) for i in range(3)]
        deadline = time.monotonic() + 60
        while engine.core.steps < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.core.steps >= 3
        t0 = time.monotonic()
        os.kill(worker.pid, signal.SIGKILL)
        outs = [h.future.result(timeout=10) for h in handles]
        elapsed = time.monotonic() - t0
        assert elapsed < 5.0, elapsed
        for o in outs:
            assert o.finish_reason == "error" and isinstance(o.error, WorkerDiedError), o.error
            assert "rank 1" in str(o.error)
        late = engine.submit(ue.Request(prompt="after", sampling=ue.SamplingParams(max_tokens=2)))
        assert isinstance(late.future.result(timeout=5).error, EngineClosedError)
        deadline = time.monotonic() + 5
        while engine.core._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.core._thread.is_alive()
    finally:
        engine.close()


def test_cli_tp_flag():
    p = build_parser()
    assert p.parse_args(["generate", "--prompt", "x", "--tp", "2"]).tp == 2
    assert p.parse_args(["serve-bench", "--tp", "2"]).tp == 2
    assert p.parse_args(["generate", "--prompt", "x"]).tp == 1
    with pytest.raises(SystemExit):
        p.parse_args(["generate", "--prompt", "x", "--tp", "0"])


@pytest.mark.slow
def test_hung_worker_times_out_and_closes_engine():
    """A stopped (not dead) worker: rank 0's collective times out (distributed_timeout_s) and the engine
    fails the requests and closes; nothing waits longer than the timeout plus a few seconds."""
    model, tok = tiny_model()
    engine = ue.Engine(model, tok, ue.EngineConfig(tensor_parallel_size=2, num_kv_blocks=64,
                                                   distributed_timeout_s=2.0))
    worker = engine.tp.procs[0]
    try:
        sp = ue.SamplingParams(max_tokens=1000, ignore_eos=True)
        handles = [engine.submit(ue.Request(prompt=f"Go on forever {i}", sampling=sp)) for i in range(2)]
        deadline = time.monotonic() + 60
        while engine.core.steps < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        os.kill(worker.pid, signal.SIGSTOP)
        outs = [h.future.result(timeout=20) for h in handles]
        assert time.monotonic() - t0 < 2.0 + 5.0
        for o in outs:
            assert isinstance(o.error, WorkerDiedError) and "timed out" in str(o.error), o.error
        # the stopped worker was killed. By its sentinel: `is_alive()` races with the engine's watchdog thread,
        # which joins the same process (the loser of the waitpid sees ECHILD and says "alive")
        assert _ended(worker, 5)
    finally:
        if not _ended(worker, 0):
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        engine.close()


@pytest.mark.slow
def test_rank0_failure_mid_step_closes_engine():
    """Rank 0 fails inside a step (after the workers got it): they would wait in a collective rank 0 never
    joins, so the requests end with TensorParallelError, the workers are stopped and the engine closes."""
    from unimlm_engine.distributed import TensorParallelError

    model, tok = tiny_model()
    engine = ue.Engine(model, tok, ue.EngineConfig(tensor_parallel_size=2, num_kv_blocks=64))
    try:
        ok = engine.generate("fine", sampling=ue.SamplingParams(max_tokens=3))
        assert ok.error is None
        mlp = engine.tp.stack.layers[1].mlp

        def broken(x):
            raise RuntimeError("injected")
        mlp.forward = broken
        t0 = time.monotonic()
        out = engine.submit(ue.Request(prompt="breaks", sampling=ue.SamplingParams(max_tokens=3))).future.result(10)
        assert isinstance(out.error, TensorParallelError) and "injected" in str(out.error), out.error
        for p in engine.tp.procs:
            assert _ended(p, 5)  # by the sentinel, see test_hung_worker_times_out_and_closes_engine
        assert time.monotonic() - t0 < 8
        assert isinstance(engine.submit(ue.Request(prompt="x")).future.result(5).error, EngineClosedError)
    finally:
        engine.close()


def test_worker_start_failure_is_a_typed_error(monkeypatch):
    """A worker that fails while building its shard (here: a shard missing a weight) reports its traceback:
    the engine raises WorkerStartError and leaves no process behind."""
    from unimlm_engine.distributed import WorkerStartError, driver

    real = driver.shard_state

    def missing_one(full, rank, tp):
        shard = real(full, rank, tp)
        if rank == 1:
            shard.pop("norm.weight")
        return shard
    monkeypatch.setattr(driver, "shard_state", missing_one)
    model, tok = tiny_model()
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(WorkerStartError, match="rank 1 failed to start(.|\n)*norm.weight"):
        ue.Engine(model, tok, ue.EngineConfig(tensor_parallel_size=2, num_kv_blocks=16))
    time.sleep(0.2)
    assert {p.pid for p in multiprocessing.active_children()} <= before


def _ended(p, timeout: float) -> bool:
    """Whether process `p` ended within `timeout` seconds (its sentinel; no waitpid, see above)."""
    from multiprocessing.connection import wait

    return bool(wait([p.sentinel], timeout=timeout))
