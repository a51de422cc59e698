"""Greedy generation of the tiny model through PagedAttention (Triton paged ops and the
Triton LoRA-MoE op forced, TRITON_INTERPRET=1) equals the contiguous-cache reference
generation token for token (and super-link payloads), for several prompts batched together,
with chunked prefill and a mixed step carrying 1 + K super-link positions."""
import random

import pytest
import torch

from unimlm_engine.engine.paged_attention import PagedAttention, PagedAttentionMetadata, PagedKVCache
from unimlm_engine.model import build_model, reference_generate
from unimlm_engine.ops._dispatch import backend_override
from unimlm_engine.config.presets import get_preset
from unimlm_engine.sampling import SamplingParams, sample_token


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny-random"), seed=0, with_decoders=False)


ROUTE_TOK = 7  # a byte token standing in for [DET] (the tiny model built in code has no special ids)
ROUTES = {ROUTE_TOK: "[DET]"}


def force_route_at(step_to_force):
    """logits_processor that makes ROUTE_TOK the greedy choice at one generation step."""
    def proc(step, logits):
        if step == step_to_force:
            logits = logits.clone()
            logits[ROUTE_TOK] = logits.max() + 10.0
        return logits
    return proc


class _Seq:
    def __init__(self, prompt: list[int], processor):
        self.prompt, self.fed, self.out, self.table, self.payloads = prompt, 0, [], [], []
        self.processor = processor

    def next_embeds(self, model, chunk: int) -> torch.Tensor:
        """The prompt's next chunk, or the last token (plus its K query embeddings after a routing token)."""
        if self.fed < len(self.prompt):
            return model.llm.embed(torch.tensor(self.prompt[self.fed:self.fed + chunk]))
        step = model.llm.embed(torch.tensor(self.out[-1:]))
        if self.out[-1] in ROUTES:
            step = torch.cat([step, model.query_embeddings(ROUTES[self.out[-1]]).to(step.dtype)])
        return step


@torch.inference_mode()
def paged_generate(model, prompts, processors, max_new: int, block_size: int, chunk: int, num_blocks: int = 64):
    """Batched greedy loop: every step feeds each unfinished sequence its next prompt chunk or
    its last token (1 + K positions after a routing token); blocks come from a shuffled free
    list (non-contiguous tables)."""
    llm = model.cfg.llm
    cache = PagedKVCache(llm.num_hidden_layers, num_blocks, block_size, llm.num_key_value_heads,
                         llm.hidden_size // llm.num_attention_heads, torch.float32)
    attn, free = PagedAttention(cache), random.Random(0).sample(range(num_blocks), num_blocks)
    seqs, params = [_Seq(p, f) for p, f in zip(prompts, processors)], SamplingParams(max_tokens=max_new,
                                                                                      ignore_eos=True)
    while running := [s for s in seqs if len(s.out) < max_new]:
        embeds = [s.next_embeds(model, chunk) for s in running]
        ctx = []
        for s, e in zip(running, embeds):
            s.fed += e.shape[0]
            while len(s.table) * block_size < s.fed:
                s.table.append(free.pop())
            ctx.append(s.fed)
        q_lens = [e.shape[0] for e in embeds]
        attn.set_metadata(PagedAttentionMetadata.build(q_lens, ctx, [s.table for s in running], block_size))
        pos = torch.cat([torch.arange(n - q, n) for q, n in zip(q_lens, ctx)])
        hidden = model.llm.forward(torch.cat(embeds), pos, attn)
        ends = torch.tensor(q_lens).cumsum(0)
        for s, q, end in zip(running, q_lens, ends.tolist()):
            if s.out and s.out[-1] in ROUTES and q > 1:
                s.payloads.append(hidden[end - q + 1:end])
            if s.fed >= len(s.prompt):
                logits = s.processor(len(s.out), model.llm.logits(hidden[end - 1]))
                s.out.append(sample_token(logits, params, 0))
    return seqs


@pytest.mark.triton_cpu
@pytest.mark.parametrize("block_size,chunk", [(16, 64), (32, 7)], ids=["bs16-whole-prompt", "bs32-chunked-prefill"])
def test_paged_triton_generation_matches_reference(model, block_size, chunk):
    """Three prompts batched; sequence 1 emits a routing token at step 1, so the next step mixes
    its 1 + K super-link positions with the others' single decode tokens."""
    gen = torch.Generator().manual_seed(1)
    vocab = model.cfg.llm.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 19, 33)]
    processors = [force_route_at(-1), force_route_at(1), force_route_at(-1)]
    max_new = 5
    want = [reference_generate(model, p, params=SamplingParams(max_tokens=max_new, ignore_eos=True),
                               route_ids=ROUTES, logits_processor=f) for p, f in zip(prompts, processors)]
    with backend_override("triton"):
        got = paged_generate(model, prompts, processors, max_new, block_size, chunk)
    assert [s.out for s in got] == [w.token_ids for w in want]
    assert ROUTE_TOK in got[1].out and len(got[1].payloads) == len(want[1].payloads) == 1
    torch.testing.assert_close(got[1].payloads[0], want[1].payloads[0].payload, atol=1e-4, rtol=1e-4)


def test_metadata_slots_and_flags():
    meta = PagedAttentionMetadata.build([1, 3], [17, 3], [[4, 9], [2]], 16)
    assert meta.slot_mapping.tolist() == [9 * 16 + 0, 32, 33, 34]
    assert meta.cu_seqlens_q.tolist() == [0, 1, 4] and not meta.is_all_decode
    assert meta.block_tables.tolist() == [[4, 9], [2, -1]]
    assert (meta.max_query_len, meta.max_context_len) == (3, 17)  # host ints: the launchers never sync for them
    assert PagedAttentionMetadata.build([1, 1], [5, 2], [[0], [1]], 16).is_all_decode


@pytest.mark.parametrize("q_lens,ctx,tables", [([0], [3], [[0]]), ([4], [3], [[0]]), ([1], [40], [[0, 1]])],
                         ids=["empty-q", "q-past-context", "too-few-blocks"])
def test_metadata_rejects_bad_layout(q_lens, ctx, tables):
    with pytest.raises(ValueError):
        PagedAttentionMetadata.build(q_lens, ctx, tables, 16)
