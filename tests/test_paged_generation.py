"""Greedy generation of the tiny model through PagedAttention (Triton paged ops and the
Triton LoRA-MoE op forced, TRITON_INTERPRET=1) equals the contiguous-cache reference
generation token for token, for several prompts batched together with chunked prefill."""
import random

import pytest
import torch

from unimlm_engine.engine.paged_attention import PagedAttention, PagedAttentionMetadata, PagedKVCache
from unimlm_engine.model import build_model, reference_generate
from unimlm_engine.ops._dispatch import backend_override
from unimlm_engine.presets import get_preset
from unimlm_engine.sampling import SamplingParams, sample_token


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny"), seed=0, with_decoders=False)


class _Seq:
    def __init__(self, prompt: list[int]):
        self.prompt, self.fed, self.out, self.table = prompt, 0, [], []

    def next_inputs(self, chunk: int) -> list[int]:
        if self.fed < len(self.prompt):
            return self.prompt[self.fed:self.fed + chunk]
        return self.out[-1:]


@torch.inference_mode()
def paged_generate(model, prompts, max_new: int, block_size: int, chunk: int, num_blocks: int = 64):
    """Batched greedy loop: every step feeds each unfinished sequence its next prompt chunk or
    its last token; blocks come from a shuffled free list (non-contiguous tables)."""
    llm = model.cfg.llm
    cache = PagedKVCache(llm.num_hidden_layers, num_blocks, block_size, llm.num_key_value_heads,
                         llm.hidden_size // llm.num_attention_heads, torch.float32)
    attn, free = PagedAttention(cache), random.Random(0).sample(range(num_blocks), num_blocks)
    seqs, params = [_Seq(p) for p in prompts], SamplingParams(max_tokens=max_new, ignore_eos=True)
    while running := [s for s in seqs if len(s.out) < max_new]:
        inputs = [s.next_inputs(chunk) for s in running]
        ctx = []
        for s, ids in zip(running, inputs):
            s.fed += len(ids)
            while len(s.table) * block_size < s.fed:
                s.table.append(free.pop())
            ctx.append(s.fed)
        attn.set_metadata(PagedAttentionMetadata.build([len(i) for i in inputs], ctx, [s.table for s in running],
                                                       block_size))
        pos = torch.cat([torch.arange(n - len(i), n) for i, n in zip(inputs, ctx)])
        hidden = model.llm.forward(model.llm.embed(torch.tensor(sum(inputs, []))), pos, attn)
        last = torch.tensor([len(i) for i in inputs]).cumsum(0) - 1
        logits = model.llm.logits(hidden[last])
        for s, row in zip(running, logits):
            if s.fed >= len(s.prompt):
                s.out.append(sample_token(row, params, None))
    return [s.out for s in seqs]


@pytest.mark.parametrize("block_size,chunk", [(16, 64), (32, 7)], ids=["bs16-whole-prompt", "bs32-chunked-prefill"])
def test_paged_triton_generation_matches_reference(model, block_size, chunk):
    gen = torch.Generator().manual_seed(1)
    vocab = model.cfg.llm.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 19, 33)]
    max_new = 6
    want = [reference_generate(model, p, params=SamplingParams(max_tokens=max_new, ignore_eos=True),
                               route_ids={}).token_ids for p in prompts]
    with backend_override("triton"):
        got = paged_generate(model, prompts, max_new, block_size, chunk)
    assert got == want


def test_metadata_slots_and_flags():
    meta = PagedAttentionMetadata.build([1, 3], [17, 3], [[4, 9], [2]], 16)
    assert meta.slot_mapping.tolist() == [9 * 16 + 0, 32, 33, 34]
    assert meta.cu_seqlens_q.tolist() == [0, 1, 4] and not meta.is_all_decode
    assert meta.block_tables.tolist() == [[4, 9], [2, -1]]
    assert PagedAttentionMetadata.build([1, 1], [5, 2], [[0], [1]], 16).is_all_decode


@pytest.mark.parametrize("q_lens,ctx,tables", [([0], [3], [[0]]), ([4], [3], [[0]]), ([1], [40], [[0, 1]])],
                         ids=["empty-q", "q-past-context", "too-few-blocks"])
def test_metadata_rejects_bad_layout(q_lens, ctx, tables):
    with pytest.raises(ValueError):
        PagedAttentionMetadata.build(q_lens, ctx, tables, 16)
