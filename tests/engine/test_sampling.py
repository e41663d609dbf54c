import math

import pytest
import torch

from engine.api import SamplingParams
from engine.sampling import Sampler, apply_repeat_penalty, probabilities

LOGITS = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))


def test_greedy_picks_argmax():
    assert Sampler(SamplingParams(temperature=0)).pick(LOGITS, []) == 0


def test_top_k_keeps_exactly_k_tokens_renormalised():
    p = probabilities(LOGITS, SamplingParams(temperature=1.0, top_k=2), [])
    assert torch.allclose(p, torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7)


def test_top_p_keeps_smallest_prefix_reaching_p():
    p = probabilities(LOGITS, SamplingParams(temperature=1.0, top_p=0.8), [])
    # 0.5 + 0.2 = 0.7 < 0.8, so the 0.15 token crossing 0.8 is kept, 0.1 and 0.05 are dropped
    assert torch.allclose(p, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)


def test_min_p_drops_tokens_below_fraction_of_best():
    p = probabilities(LOGITS, SamplingParams(temperature=1.0, min_p=0.25), [])
    assert torch.allclose(p, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)


def test_temperature_sharpens():
    p = probabilities(LOGITS, SamplingParams(temperature=0.5), [])
    expected = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    assert torch.allclose(p, expected / expected.sum(), atol=1e-6)


def test_repeat_penalty_follows_llama_cpp_rule():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repeat_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_seeded_sampling_is_reproducible_and_follows_distribution():
    params = SamplingParams(temperature=1.0, seed=123)
    a = [Sampler(params).pick(LOGITS, []) for _ in range(3)]
    b = [Sampler(params).pick(LOGITS, []) for _ in range(3)]
    assert a == b
    sampler = Sampler(SamplingParams(temperature=1.0, seed=7))
    counts = torch.bincount(
        torch.tensor([sampler.pick(LOGITS, []) for _ in range(4000)]), minlength=5
    ).float()
    expected = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]) * 4000
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.5, f"chi-square {chi2:.1f} (4 dof, p=0.001 critical value 18.5)"
    assert not math.isnan(chi2)


def test_draw_takes_weights_and_never_draws_a_zero_probability_token():
    sampler = Sampler(SamplingParams(temperature=1.0, seed=11))
    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.0])  # not normalised
    counts = torch.bincount(torch.tensor([sampler.draw(weights) for _ in range(4000)]), minlength=5)
    assert counts[[0, 2, 4]].sum() == 0
    chi2 = float((counts[1] - 3000) ** 2 / 3000 + (counts[3] - 1000) ** 2 / 1000)
    assert chi2 < 10.8, f"chi-square {chi2:.1f} (1 dof, p=0.001 critical value 10.8)"


def test_draw_at_the_ends_of_the_uniform_range(monkeypatch):
    """u = 0 draws the first token with weight, the largest u below 1 the last one (not a zero-weight token
    after it)."""
    import engine.sampling as sampling

    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.0])
    for u, want in ((0.0, 1), (1.0 - 2.0**-53, 3)):
        monkeypatch.setattr(sampling.torch, "rand", lambda *a, u=u, **k: torch.tensor(u, dtype=torch.float64))
        assert Sampler(SamplingParams(temperature=1.0, seed=1)).draw(weights) == want


def filters_over_whole_vocabulary(logits, params):
    """The chain on the whole vocabulary, top-k as a threshold (this module before top-k kept k exactly)."""
    logits = logits.float()
    if params.top_k > 0:
        logits = logits.masked_fill(logits < torch.topk(logits, params.top_k).values[-1], float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        p = torch.softmax(sorted_logits, -1)
        drop = (p.cumsum(-1) - p) >= params.top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if params.min_p > 0.0:
        p = torch.softmax(logits, -1)
        logits = logits.masked_fill(p < params.min_p * p.max(), float("-inf"))
    return torch.softmax(logits / params.temperature, -1)


def test_filters_after_top_k_run_on_the_k_kept_tokens_same_distribution():
    gen = torch.Generator().manual_seed(0)
    for top_k, top_p, min_p in ((40, 0.95, 0.05), (40, 0.5, 0.0), (7, 1.0, 0.2), (1000, 0.9, 0.0)):
        params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p)
        logits = torch.randn(5000, generator=gen) * 3  # no ties
        got, want = probabilities(logits, params, []), filters_over_whole_vocabulary(logits, params)
        assert torch.equal(got > 0, want > 0), (top_k, top_p, min_p)
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
        assert float(got.sum()) == pytest.approx(1.0, abs=1e-5)


def test_top_k_keeps_k_tokens_when_the_kth_logit_is_tied():
    logits = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0])
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=2), [])
    assert int((p > 0).sum()) == 2 and p[0] > p.max() * 0.99 and p[[1, 2, 3]].sum() > 0
