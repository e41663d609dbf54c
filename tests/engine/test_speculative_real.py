"""Greedy speculative decoding on real models equals plain greedy decoding token for token."""

from __future__ import annotations

import pytest

from engine.api import DraftConfig, EngineConfig, SamplingParams
from engine.errors import TandemError
from tests.engine.events import collect_ids

EDIT_PROMPT = """Rewrite this function with type hints, keeping everything else identical:

def add_item(cart, name, price, quantity):
    if quantity <= 0:
        raise ValueError("quantity must be positive")
    cart[name] = {"price": price, "quantity": quantity}
    return cart"""

CODE_PROMPT = "Write a Python function that returns the n-th Fibonacci number iteratively."


def model_path(key: str) -> str:
    from engine import model_catalog

    try:
        path = model_catalog.locate(key)
    except TandemError as exc:
        pytest.skip(f"{key} is not installed: {exc}")
    return str(path)


def answer(session, prompt: str, max_tokens: int):
    messages = [{"role": "user", "content": prompt}]
    return collect_ids(session.chat(messages, SamplingParams(max_tokens=max_tokens)))


@pytest.mark.slow
def test_smollm2_ngram_greedy_equals_plain():
    from engine.session import Engine

    path = model_path("smollm2-135m")
    config = EngineConfig(model=path, device="cpu", context_length=512)
    plain = Engine.load(config)
    spec = Engine.load(EngineConfig(model=path, device="cpu", context_length=512,
                                    draft=DraftConfig(mode="ngram", max_draft=8)))
    drafted = {}
    for prompt in (EDIT_PROMPT, CODE_PROMPT):
        plain_ids, _, plain_final = answer(plain, prompt, 48)
        ids, flags, final = answer(spec, prompt, 48)
        assert ids == plain_ids and final.text == plain_final.text
        assert sum(flags) == final.stats.accepted
        drafted[prompt] = final.stats.draft_steps
    assert drafted[EDIT_PROMPT] > 0  # the edit copies its input: lookups happen (code may have none)


@pytest.mark.slow
def test_qwen_coder_with_draft_model_greedy_equals_plain():
    from engine.session import Engine

    target, draft = model_path("qwen2.5-coder-1.5b"), model_path("qwen2.5-coder-0.5b")
    session = Engine.load(EngineConfig(model=target, device="cpu", context_length=512,
                                       draft=DraftConfig(mode="draft-model", path=draft, max_draft=6)))
    ids, flags, final = answer(session, CODE_PROMPT, 64)
    assert final.stats.accepted > 0 and sum(flags) == final.stats.accepted
    drafter, session.drafter = session.drafter, None  # the same target weights, plain decoding
    drafter.close()
    plain_ids, _, plain_final = answer(session, CODE_PROMPT, 64)
    assert ids == plain_ids and final.text == plain_final.text
