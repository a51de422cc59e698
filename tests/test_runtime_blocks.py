"""BlockManager / pool sizing through the bindings (unimlm_engine._C)."""
import numpy as np
import pytest

from unimlm_engine import _C


def test_prefix_sharing_and_last_token_rule():
    bm = _C.BlockManager(16, block_size=4)
    a = list(range(10))
    assert bm.match_prefix(1, a) == 0
    assert bm.allocate_slots(1, 0, 10) == []
    bm.commit(1, a, 10)
    assert bm.match_prefix(2, a[:9]) == 8
    assert bm.block_table(2)[:2] == bm.block_table(1)[:2]
    assert bm.match_prefix(3, a[:8]) == 4  # the block holding the last token is recomputed
    bm.check_invariants()
    for s in (1, 2, 3):
        bm.free(s)
    assert bm.num_used == 0 and bm.num_cached == 2 and bm.num_free == 16
    assert bm.prefix_hit_tokens == 12


def test_image_extra_keys_share_only_same_image():
    bm = _C.BlockManager(32, block_size=4)
    im_patch = 7
    prompt = [1, 2] + [im_patch] * 12 + [3, 4, 5]  # image tokens at [2, 14)
    keys_a = _C.block_extra_keys(len(prompt), 4, [(2, 14, 0xA)])
    keys_b = _C.block_extra_keys(len(prompt), 4, [(2, 14, 0xB)])
    assert len(keys_a) == 5 and keys_a[4] == 0 and keys_a[0] != keys_b[0]
    bm.match_prefix(1, prompt, keys_a)
    bm.allocate_slots(1, 0, len(prompt))
    bm.commit(1, prompt, len(prompt), keys_a)
    assert bm.match_prefix(2, prompt, keys_b) == 0  # same placeholder ids, other image
    assert bm.match_prefix(3, prompt, keys_a) == 16


def test_copy_on_write_pairs():
    bm = _C.BlockManager(8, block_size=4)
    bm.match_prefix(1, list(range(6)))
    bm.allocate_slots(1, 0, 6)
    bm.fork(1, 2)
    src = bm.block_table(1)[1]
    assert bm.refcount(src) == 2
    cow = bm.allocate_slots(2, 6, 7)
    assert cow == [(src, bm.block_table(2)[1])]
    assert bm.refcount(src) == 1
    assert bm.allocate_slots(1, 6, 7) == []
    small = _C.BlockManager(1, block_size=4)
    small.match_prefix(9, [1])
    assert small.allocate_slots(9, 0, 5) is None  # pool short: nothing changes
    assert small.block_table(9) == [] and small.num_free == 1
    bm.check_invariants()


@pytest.mark.parametrize(
    "layers,kv_heads,head_dim,block,dtype_bytes",
    [(32, 32, 128, 16, 2), (1, 1, 63, 1, 4), (28, 4, 111, 16, 1)],
    ids=["vicuna7b-bf16", "tiny-odd-fp32", "gqa-odd-fp8"],
)
def test_num_kv_blocks_formula(layers, kv_heads, head_dim, block, dtype_bytes):
    per = _C.kv_bytes_per_block(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim,
                                block_size=block, dtype_bytes=dtype_bytes)
    assert per == 2 * layers * block * kv_heads * head_dim * dtype_bytes
    total, w, act, dec = 80 * 2**30, 13 * 2**30, 3 * 2**30, 2**30
    n = _C.num_kv_blocks(total_memory=total, num_layers=layers, num_kv_heads=kv_heads,
                         head_dim=head_dim, block_size=block, dtype_bytes=dtype_bytes,
                         utilization=0.9, weights=w, activations=act, decoders=dec)
    assert n == int((total * 0.9 - w - act - dec) // per)
    assert _C.num_kv_blocks(total_memory=0, num_layers=layers, num_kv_heads=kv_heads,
                            head_dim=head_dim, num_kv_blocks=77) == 77


def test_num_kv_blocks_rejects_empty_budget():
    with pytest.raises(ValueError, match="leaves no KV block"):
        _C.num_kv_blocks(total_memory=2**30, num_layers=32, num_kv_heads=32, head_dim=128, weights=2**31)
    with pytest.raises(ValueError, match="utilization"):
        _C.num_kv_blocks(total_memory=2**30, num_layers=1, num_kv_heads=1, head_dim=1, utilization=1.5)


def test_randomized_fork_free_accounting():
    rng = np.random.default_rng(0)
    bm = _C.BlockManager(37, block_size=3)
    live, next_id = {}, 0
    for _ in range(400):
        op = rng.integers(0, 4)
        if op == 0 or not live:
            toks = [int(t) for t in rng.integers(0, 2, size=int(rng.integers(1, 12)))]
            done = bm.match_prefix(next_id, toks)
            if bm.allocate_slots(next_id, done, len(toks)) is None:
                bm.free(next_id)
            else:
                bm.commit(next_id, toks, len(toks))
                live[next_id] = toks
            next_id += 1
        elif op == 1:
            sid = int(rng.choice(list(live)))
            bm.fork(sid, next_id)
            live[next_id] = list(live[sid])
            next_id += 1
        elif op == 2:
            sid = int(rng.choice(list(live)))
            toks = live[sid] + [int(rng.integers(0, 2))]
            if bm.allocate_slots(sid, len(toks) - 1, len(toks)) is not None:
                live[sid] = toks
                bm.commit(sid, toks, len(toks))
        else:
            sid = int(rng.choice(list(live)))
            live.pop(sid)
            bm.free(sid)
        bm.check_invariants()
        assert bm.num_used + bm.num_free == bm.num_blocks
    for sid in list(live):
        bm.free(sid)
    assert bm.num_used == 0 and bm.num_free == 37


def test_cuda_kv_plan_counts_what_the_card_already_holds(monkeypatch):
    """On CUDA the pool is total * utilization minus what is on the card (cudaMemGetInfo's total - free),
    not minus this model's weights alone: with a second 7B copy loaded (the HF baseline of bench_e2e) the
    model-only plan overcommitted an H200 and the pool allocation ran out of memory."""
    import torch

    from unimlm_engine.config import EngineConfig
    from unimlm_engine.config.presets import get_preset
    from unimlm_engine.engine.memory import plan_kv_blocks

    class FakeModel(torch.nn.Module):  # 1 GiB of "weights" on a "cuda" device; no decoders
        def __init__(self):
            super().__init__()
            self.cfg, self.dtype, self.decoders = get_preset("visionllm-v2-7b"), torch.bfloat16, None
            self.w = torch.nn.Parameter(torch.empty(0))

        @property
        def device(self):
            return torch.device("cuda", 0)

    gib = 1 << 30
    model = FakeModel()
    monkeypatch.setattr("unimlm_engine.engine.memory._param_bytes",
                        lambda m: 0 if m is None else gib)
    cfg = EngineConfig()
    per_block = None
    blocks = {}
    for in_use in (1 * gib, 15 * gib):  # the model alone; the model and 14 GiB of something else
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, u=in_use: (80 * gib - u, 80 * gib))
        plan = plan_kv_blocks(model, cfg)
        per_block = plan["bytes_per_block"]
        blocks[in_use] = plan["num_kv_blocks"]
        assert plan["bytes"]["weights"] == in_use
        assert plan["num_kv_blocks"] * per_block + in_use + plan["bytes"]["activations_estimate"] \
            <= 80 * gib * cfg.gpu_memory_utilization
    assert blocks[1 * gib] - blocks[15 * gib] == pytest.approx(14 * gib / per_block, abs=1)
