"""Batched sampling (issue 12): greedy is argmax, random draws follow the filtered distribution, and a
row's token depends only on its logits, parameters, seed and step, never on its batch mates."""
import numpy as np
import pytest
import torch

import unimlm_engine as ue
from unimlm_engine.engine.handle import RequestHandle
from unimlm_engine.engine.sampler import BatchSampler, argmax_rows
from unimlm_engine.engine.sequence import Sequence
from unimlm_engine.sampling import SamplingParams, sample_rows, sample_token, uniforms


def expected_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Independent float64 reference of temperature -> top-k -> top-p (on the renormalised top-k)."""
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.zeros_like(x, dtype=bool)
    k = top_k if top_k > 0 else len(x)
    top = order[:k]
    p = np.exp(x[top] - x[top].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    keep[top[before < top_p]] = True
    q = np.where(keep, np.exp(x - x.max()), 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (0.9, 12, 0.9)],
                         ids=["plain", "top-k", "top-p", "top-k-top-p"])
def test_draws_match_distribution(temperature, top_k, top_p):
    v, n = 40, 20000
    logits = torch.randn(v, generator=torch.Generator().manual_seed(1)) * 2
    want = expected_probs(logits.numpy(), temperature, top_k, top_p)
    filtered = top_k > 0 or top_p < 1.0
    toks = sample_rows(logits.expand(n, v), torch.full((n,), temperature), torch.full((n,), top_k),
                       torch.full((n,), top_p), torch.arange(n) * 7919 + 3, torch.arange(n) % 5, filtered=filtered)
    counts = np.bincount(toks.numpy(), minlength=v)
    assert counts[want == 0].sum() == 0  # nothing outside top-k / the nucleus
    live = want > 0
    chi2 = ((counts[live] - n * want[live]) ** 2 / (n * want[live])).sum()
    dof = live.sum() - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)  # ~4-sigma bound; the draws are deterministic


def test_uniforms_are_a_pure_function():
    seeds, steps = torch.tensor([0, 1, 2**40 + 5, 0]), torch.tensor([0, 0, 3, 1])
    u = uniforms(seeds, steps, 1000)
    assert u.dtype == torch.float64 and bool(((u > 0) & (u < 1)).all())
    assert torch.equal(u, uniforms(seeds, steps, 1000))
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[3])  # seed and step both matter
    assert abs(float(uniforms(torch.arange(64), torch.zeros(64, dtype=torch.long), 4096).mean()) - 0.5) < 0.01
    assert torch.equal(uniforms(seeds[2:3], steps[2:3], 1000)[0], u[2])  # a row alone == in a batch


def _seq(i, params, seed):
    s = Sequence(i, ue.Request(prompt="x", sampling=params), RequestHandle(f"r{i}"), [1], 1, seed=seed)
    return s


def test_batch_composition_never_changes_a_row():
    rng = np.random.default_rng(0)
    v = 300
    kinds = [SamplingParams(), SamplingParams(temperature=0.8), SamplingParams(temperature=1.1, top_k=7),
             SamplingParams(temperature=0.6, top_p=0.7), SamplingParams(logit_bias={5: 30.0}),
             SamplingParams(forced_prefix=(9, 8), max_tokens=4), SamplingParams(temperature=1.0, logit_bias={1: 2.0})]
    logits = torch.randn(len(kinds), v, generator=torch.Generator().manual_seed(2))
    sampler = BatchSampler("cpu")
    alone = []
    for i, p in enumerate(kinds):
        ids, forced = sampler.sample(logits[i:i + 1], [_seq(i, p, seed=100 + i)])
        alone.append(int(ids[0]))
        assert bool(forced[0]) == bool(p.forced_prefix)
    for trial in range(5):
        order = rng.permutation(len(kinds))[:rng.integers(2, len(kinds) + 1)]
        ids, _ = sampler.sample(logits[order], [_seq(i, kinds[i], seed=100 + i) for i in order])
        assert ids.tolist() == [alone[i] for i in order]
    # and the reference's per-request call agrees
    for i, p in enumerate(kinds):
        assert sample_token(logits[i], p, seed=100 + i, step=0) == alone[i]


def test_greedy_is_argmax_with_bias():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_token(logits, SamplingParams(), seed=0) == 1
    assert sample_token(logits, SamplingParams(logit_bias={2: 0.2}), seed=0) == 2
    ids, _ = BatchSampler("cpu").sample(logits[None].repeat(2, 1), [_seq(0, SamplingParams(), 0),
                                                                  _seq(1, SamplingParams(logit_bias={3: 9.0}), 0)])
    assert ids.tolist() == [1, 3]


def test_steps_advance_and_forced_prefix_comes_first():
    p = SamplingParams(temperature=1.0, forced_prefix=(4, 4), max_tokens=6)
    s = _seq(0, p, seed=7)
    sampler = BatchSampler("cpu")
    logits = torch.zeros(1, 50)
    got = [int(sampler.sample(logits, [s])[0][0]) for _ in range(5)]
    assert got[:2] == [4, 4] and s.num_sampled == 5
    assert got[2:] == [sample_token(logits[0], p, seed=7, step=k) for k in (2, 3, 4)]


def test_argmax_rows_is_torch_argmax():
    """The CPU greedy path's numpy argmax picks what torch.argmax picks: the first maximum, ties, NaN (the
    maximum), -inf rows, strided rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (257, 300), generator=g).float()  # many ties
    x[5, 17] = float("nan")
    x[6, 3] = x[6, 200] = float("nan")
    x[7] = float("-inf")
    x[8, -1] = float("inf")
    for t in (x, x[:, ::2], x.t().contiguous().t(), x[::3]):
        got = argmax_rows(t)
        assert got.dtype == torch.int64
        assert torch.equal(got, t.argmax(-1))

