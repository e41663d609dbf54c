"""Speculative decoding: greedy output equals plain decoding, sampling keeps the target's distribution."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from engine.api import KV_TYPES, DraftConfig, EngineConfig, SamplingParams
from engine.errors import ModelFileError, SettingsError
from engine.gguf_file import GGUFModelFile
from engine.sampling import Sampler
from engine.speculative import Draft, verify
from tests.engine.events import collect_ids
from tests.engine.tiny_models import write_tiny_model

PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 10, 72, 101, 108, 108]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """target: random qwen2; same: an identical copy (every draft accepted); other: another seed
    (mostly rejected); quant: the target's weights quantized (mixed accepts and rejects)."""
    d = tmp_path_factory.mktemp("spec")
    return {
        "target": write_tiny_model(d / "target.gguf", "qwen2", seed=3),
        "same": write_tiny_model(d / "same.gguf", "qwen2", seed=3),
        "other": write_tiny_model(d / "other.gguf", "qwen2", seed=4),
        "quant": write_tiny_model(d / "quant.gguf", "qwen2", seed=3, quantized=True),
        "llama": write_tiny_model(d / "llama.gguf", "llama", seed=5),
    }


def load(model, mode="none", draft=None, max_draft=4, kv=("f16", "f16")):
    from engine.session import Engine

    config = EngineConfig(model=str(model), draft=DraftConfig(mode=mode, path=str(draft) if draft else None,
                                                              max_draft=max_draft),
                          kv_k=kv[0], kv_v=kv[1], device="cpu", context_length=128, prefill_chunk=8)
    return Engine.load(config)


def run(session, prompt, params):
    return collect_ids(session.generate(prompt, params))


GREEDY = SamplingParams(temperature=0.0, max_tokens=40)


@pytest.mark.parametrize("draft_name", ["same", "other", "quant"])
def test_draft_model_greedy_equals_plain(tiny, draft_name):
    plain_ids, _, plain = run(load(tiny["target"]), PROMPT, GREEDY)
    assert len(plain_ids) >= 20, "the tiny model should not stop at once"
    ids, flags, final = run(load(tiny["target"], "draft-model", tiny[draft_name]), PROMPT, GREEDY)
    assert ids == plain_ids
    assert final.text == plain.text and final.stop_reason == plain.stop_reason
    stats = final.stats
    assert sum(flags) == stats.accepted <= stats.drafted
    if draft_name == "same":  # the target drafting for itself: every draft is accepted
        assert stats.accepted == stats.drafted > 0
        assert stats.per_position_acceptance and all(a == 1.0 for a in stats.per_position_acceptance)
        assert stats.acceptance_length > 3.0


def test_ngram_greedy_equals_plain_and_accepts_copies(tiny):
    # a repetitive prompt: the tiny llama model's greedy output falls into loops that prompt lookup catches
    prompt = PROMPT * 3
    params = SamplingParams(temperature=0.0, max_tokens=60)
    plain_ids, _, _ = run(load(tiny["llama"]), prompt, params)
    ids, flags, final = run(load(tiny["llama"], "ngram", max_draft=6), prompt, params)
    assert ids == plain_ids
    assert final.stats.draft_steps > 0 and sum(flags) == final.stats.accepted


@pytest.mark.parametrize("kv", list(itertools.product(KV_TYPES, KV_TYPES)), ids="-".join)
@pytest.mark.parametrize("mode", ["ngram", "draft-model"])
def test_greedy_lossless_for_every_kv_pair(tiny, kv, mode):
    params = SamplingParams(temperature=0.0, max_tokens=24)
    try:
        plain_ids, _, _ = run(load(tiny["target"], kv=kv), PROMPT * 2, params)
    except SettingsError as exc:
        pytest.skip(f"KV pair {kv} not available yet: {exc}")
    ids, _, _ = run(load(tiny["target"], mode, tiny["quant"], kv=kv), PROMPT * 2, params)
    assert ids == plain_ids


def test_stops_match_plain_with_max_tokens_and_stop_strings(tiny):
    session_plain = load(tiny["target"])
    session_spec = load(tiny["target"], "draft-model", tiny["same"], max_draft=8)
    for max_tokens in (1, 2, 5, 9):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        plain_ids, _, plain = run(session_plain, PROMPT, params)
        ids, _, final = run(session_spec, PROMPT, params)
        assert ids == plain_ids and len(ids) == final.stats.new_tokens == plain.stats.new_tokens
    full_text = run(session_plain, PROMPT, SamplingParams(max_tokens=30))[2].text
    stop = full_text[10:13]
    params = SamplingParams(temperature=0.0, max_tokens=30, stop=[stop])
    plain = run(session_plain, PROMPT, params)[2]
    final = run(session_spec, PROMPT, params)[2]
    assert final.stop_reason == plain.stop_reason == "stop_string"
    assert final.text == plain.text


def test_draft_vocabulary_must_match(tiny, tmp_path):
    bare = write_tiny_model(tmp_path / "bare.gguf", "qwen2", seed=3, with_tokenizer=False)
    with pytest.raises(ModelFileError, match="vocabulary"):
        load(tiny["target"], "draft-model", bare)
    from engine.drafters import check_same_vocabulary

    target, draft = GGUFModelFile.open(tiny["target"]), GGUFModelFile.open(tiny["other"])
    check_same_vocabulary(target, draft)
    tokens = list(draft.metadata["tokenizer.ggml.tokens"])
    tokens[300] = "<|something_else|>"
    draft.metadata["tokenizer.ggml.tokens"] = tokens
    with pytest.raises(ModelFileError, match="first difference at id 300"):
        check_same_vocabulary(target, draft)


def test_ngram_drafter_proposes_what_followed_the_latest_match():
    from engine.drafters import NgramDrafter

    sampler = Sampler(SamplingParams())
    drafter = NgramDrafter(max_ngram=3, min_ngram=1)
    context = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 1, 2, 3]
    # "1 2 3" occurs at 0 (followed by 4 5 9) — the 3-gram wins over the later "2 3" (followed by 7 8)
    assert drafter.propose(context, 3, sampler).tokens == [4, 5, 9]
    assert drafter.propose([5, 2, 3, 7, 0, 2, 3], 2, sampler).tokens == [7, 0]
    assert drafter.propose([1, 2, 3], 4, sampler).tokens == []
    # the default needs 3 matching tokens: "2 3" alone proposes nothing, "6 2 3" does
    assert NgramDrafter().propose([5, 2, 3, 7, 0, 2, 3], 2, sampler).tokens == []
    assert NgramDrafter().propose([6, 2, 3, 7, 0, 6, 2, 3], 2, sampler).tokens == [7, 0]


# -- rejection sampling --------------------------------------------------------------------------------

CHI2_999 = {4: 18.47, 5: 20.52}  # chi-square quantile at 0.999 by degrees of freedom


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token with zero probability was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def rows(*dists) -> torch.Tensor:
    return torch.log(torch.tensor(dists, dtype=torch.float32))  # (k + 1, vocab) logits


P = [[0.4, 0.25, 0.15, 0.1, 0.06, 0.04], [0.05, 0.5, 0.2, 0.1, 0.1, 0.05], [0.3, 0.1, 0.1, 0.1, 0.2, 0.2]]
Q = torch.tensor([[0.1, 0.1, 0.6, 0.1, 0.05, 0.05], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]])


def draw_many(verifier, draft_fn, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Counts of the first committed token, and of the second given the first was d1."""
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1234))
    logits = rows(*P)
    first, second = torch.zeros(6), torch.zeros(6)
    for _ in range(n):
        draft = draft_fn(sampler)
        committed, _ = verifier(sampler, logits, draft, [])
        first[committed[0]] += 1
        if committed[0] == draft.tokens[0] and len(committed) > 1:
            second[committed[1]] += 1
    return first, second, n


def sampled_draft(sampler: Sampler) -> Draft:
    return Draft([sampler.draw(Q[0]), sampler.draw(Q[1])], Q.clone())


def fixed_draft(sampler: Sampler) -> Draft:
    return Draft([2, 4])  # deterministic (one-hot q), as n-gram and greedy DFlash drafts are


@pytest.mark.parametrize("draft_fn", [sampled_draft, fixed_draft], ids=["sampled-q", "one-hot"])
def test_rejection_sampling_keeps_target_distribution(draft_fn):
    first, second, _ = draw_many(verify, draft_fn, 6000)
    p = torch.tensor(P)
    assert chi_square(first, p[0]) < CHI2_999[5]
    assert second.sum() > 500
    assert chi_square(second, p[1]) < CHI2_999[5]


def test_chi_square_check_catches_a_biased_verifier():
    """The statistical test has power: always accepting the draft (no rejection) is caught."""

    def accept_all(sampler, logits, draft, context):
        return draft.tokens + [sampler.draw(torch.softmax(logits[-1], -1))], len(draft.tokens)

    first, _, _ = draw_many(accept_all, sampled_draft, 6000)
    assert chi_square(first, torch.tensor(P)[0]) > CHI2_999[5]


def test_greedy_verify_accepts_longest_agreeing_prefix():
    logits = rows(*P)  # argmax per row: 0, 1, 0
    sampler = Sampler(SamplingParams(temperature=0.0))
    assert verify(sampler, logits, Draft([0, 1]), []) == ([0, 1, 0], 2)
    assert verify(sampler, logits, Draft([0, 3]), []) == ([0, 1], 1)
    assert verify(sampler, logits, Draft([5, 1]), []) == ([0], 0)


@pytest.mark.slow
def test_end_to_end_sampling_matches_target_distribution(tiny):
    """Spec sampling with a mismatched draft model: the first two tokens follow the target's exact
    distribution, computed directly from the target's logits."""
    params = dict(temperature=1.0, top_k=2, max_tokens=2)
    spec = load(tiny["target"], "draft-model", tiny["quant"], max_draft=3)
    # exact joint distribution of (t1, t2) under plain sampling
    plain = load(tiny["target"])
    base = SamplingParams(**params)
    with torch.inference_mode():
        p1 = Sampler(base).probabilities(plain.prefill(PROMPT, 0)[0], PROMPT)  # (vocab,)
        joint = {}
        for t1 in torch.nonzero(p1).flatten().tolist():
            p2 = Sampler(base).probabilities(plain.prefill(PROMPT + [t1], 0)[0], PROMPT + [t1])
            for t2 in torch.nonzero(p2).flatten().tolist():
                joint[(t1, t2)] = float(p1[t1] * p2[t2])
    cells = sorted(joint)
    counts = torch.zeros(len(cells))
    n = 400
    for seed in range(n):
        ids, _, _ = run(spec, PROMPT, SamplingParams(**params, seed=seed))
        counts[cells.index(tuple(ids))] += 1
    probs = torch.tensor([joint[c] for c in cells])
    dof = len(cells) - 1
    # 0.999 quantile of chi-square (Wilson–Hilferty approximation)
    z = 3.09
    limit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi_square(counts, probs) < limit


def test_greedy_draft_on_a_gpu_model_takes_the_queued_path():
    """With a model that has pick_next (the GPU model), greedy drafting asks it for each token, one step
    queued ahead except after the last, and keeps cached_ids as feeding the tokens one by one does."""
    from engine.drafters import DraftModelDrafter

    class StepModel:
        def __init__(self):
            self.asked = []

        def pick_next(self, token, pos, cache, ahead=False, sampler=None):
            self.asked.append((token, pos, ahead))
            return (token * 7 + pos) % 50

        def __call__(self, piece, pos, cache, logits_for="last"):  # the prompt sync: logits favour 3
            return torch.nn.functional.one_hot(torch.tensor([3]), 50).float(), []

    model = StepModel()
    drafter = DraftModelDrafter(model, None, "cpu", prefill_chunk=8, max_draft=4)
    draft = drafter.propose([1, 2], 4, Sampler(SamplingParams(temperature=0.0)))
    t0 = 3
    t1 = (t0 * 7 + 2) % 50
    t2 = (t1 * 7 + 3) % 50
    t3 = (t2 * 7 + 4) % 50
    assert draft.tokens == [t0, t1, t2, t3] and draft.probs is None
    assert model.asked == [(t0, 2, True), (t1, 3, True), (t2, 4, False)]
    assert drafter.cached_ids == [1, 2, t0, t1, t2]
