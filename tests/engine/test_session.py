"""Prefill, decode and the event stream on tiny random models (fast) and SmolLM2 (golden)."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.api import EngineConfig, Finished, SamplingParams, TextDelta, auto_prefill_chunk
from engine.errors import SettingsError
from engine.session import Engine
from tests.engine.tiny_models import write_tiny_model

PROMPT = [
    72,
    101,
    108,
    108,
    111,
    44,
    32,
    119,
    111,
    114,
    108,
    100,
    33,
    32,
    84,
    104,
    105,
    115,
    32,
    105,
    115,
]  # 21


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "llama.gguf", "llama", seed=3, quantized=True)


def load(path, **kw):
    kw.setdefault("cpu_weights", "exact")  # float32 weights: logits comparable across chunk sizes to 1e-5
    kw.setdefault("device", "cpu")  # the CPU engine's behaviour, also on a machine with a GPU
    return Engine.load(EngineConfig(model=str(path), context_length=kw.pop("ctx", 128), **kw))


def test_prefill_returns_last_row_of_final_chunk_not_first(tiny_path):
    whole = load(tiny_path, prefill_chunk=512).prefill(PROMPT, 0, logits_for="all")  # (21, vocab)
    session = load(tiny_path, prefill_chunk=8)  # chunks of 8, 8, 5: a multi-token final chunk
    last = session.prefill(PROMPT, 0)  # (1, vocab)
    assert torch.allclose(last[0], whole[-1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(last[0], whole[-5], rtol=1e-2, atol=1e-2), (
        "returned the final chunk's first row"
    )
    assert session.cached_ids == PROMPT


@pytest.mark.parametrize("chunk", [1, 7, 512])
def test_chunk_size_does_not_change_logits(tiny_path, chunk):
    reference = load(tiny_path, prefill_chunk=512).prefill(PROMPT, 0, logits_for="all")
    chunked = load(tiny_path, prefill_chunk=chunk).prefill(PROMPT, 0, logits_for="all")
    err = float((chunked - reference).norm() / reference.norm())
    assert err < 1e-4, f"chunk {chunk}: relative error {err:.2e}"


def test_prefill_chunk_auto_resolves_per_device(tiny_path):
    """prefill_chunk 0 (the default) means 512 on the CPU and 2048 on CUDA; negative values are refused."""
    assert EngineConfig(model="m").prefill_chunk == 0
    assert [auto_prefill_chunk(d) for d in ("cpu", "cuda", "cuda:1")] == [512, 2048, 2048]
    session = load(tiny_path)
    assert session.device == "cpu" and session.config.prefill_chunk == 512
    assert load(tiny_path, prefill_chunk=96).config.prefill_chunk == 96
    with pytest.raises(SettingsError, match="Prefill chunk"):
        EngineConfig(model="m", prefill_chunk=-1).validate()


def collect(events):
    deltas, final = [], None
    for event in events:
        if isinstance(event, TextDelta):
            deltas.append(event)
        elif isinstance(event, Finished):
            final = event
    return deltas, final


def test_generation_respects_max_tokens_and_reports_stats(tiny_path):
    deltas, final = collect(load(tiny_path).generate(PROMPT, SamplingParams(max_tokens=6)))
    assert final.stop_reason == "max_tokens"
    assert final.stats.new_tokens == 6
    assert sum(len(d.token_ids) for d in deltas) == 6
    assert final.text == "".join(d.text for d in deltas)
    assert final.stats.prompt_tokens == len(PROMPT) and final.stats.decode_tok_per_s > 0
    assert final.stats.kv_bytes > 0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize(
    "max_tokens,ctx,stop", [(5, 128, "max_tokens"), (50, len(PROMPT) + 4, "context_full")]
)
def test_a_step_goes_ahead_only_when_the_answer_goes_on(
    tiny_path, monkeypatch, temperature, max_tokens, ctx, stop
):
    """generate asks for the next step to be queued ahead (GPU) except where the answer ends with the pick
    anyway: the last token allowed, or the context's last position."""
    session = load(tiny_path, ctx=ctx)
    asked = []

    def step(token, *args):  # decode_greedy(token, ahead) / decode_sampled(token, sampler, ahead)
        asked.append((len(session.cached_ids), args[-1]))
        session.cached_ids.append(token)
        return 72  # "H": never the end of the answer

    monkeypatch.setattr(session, "decode_greedy", step)
    monkeypatch.setattr(session, "decode_sampled", step)
    params = SamplingParams(temperature=temperature, seed=1, max_tokens=max_tokens)
    final = collect(session.generate(PROMPT, params))[-1]
    assert final.stop_reason == stop
    positions = [pos for pos, _ in asked]
    assert [ahead for _, ahead in asked] == [True] * (len(asked) - 1) + [False]
    if stop == "context_full":
        assert positions[-1] == ctx - 2  # the step queued ahead of it would have been at ctx - 1: it had room
    else:
        assert len(asked) == max_tokens - 1


def test_reused_prefix_gives_the_same_greedy_tokens(tiny_path):
    params = SamplingParams(max_tokens=8)
    fresh = [t for d in collect(load(tiny_path).generate(PROMPT + [10, 65], params))[0] for t in d.token_ids]
    session = load(tiny_path)
    collect(session.generate(PROMPT, params))
    deltas, final = collect(session.generate(PROMPT + [10, 65], params))
    assert final.stats.cached_tokens == len(PROMPT)
    assert [t for d in deltas for t in d.token_ids] == fresh


def test_cancel_stops_between_steps(tiny_path):
    cancel = threading.Event()
    events = load(tiny_path).generate(PROMPT, SamplingParams(max_tokens=50), cancel)
    seen = 0
    for event in events:
        if isinstance(event, TextDelta):
            seen += len(event.token_ids)
            cancel.set()
        if isinstance(event, Finished):
            assert event.stop_reason == "cancelled"
            assert 1 <= event.stats.new_tokens == seen < 50
            break
    else:
        pytest.fail("no Finished event")


def test_prompt_longer_than_context_is_a_readable_error(tiny_path):
    with pytest.raises(SettingsError, match="raise the context length"):
        list(load(tiny_path, ctx=16).generate(PROMPT))


def test_bad_setting_is_rejected_before_loading(tiny_path):
    with pytest.raises(SettingsError, match="K cache type 'q3_0'"):
        load(tiny_path, kv_k="q3_0")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: sliding window of 5 < the block's reach
@pytest.mark.parametrize("kv", ["f16", "q4_0"])
def test_verify_block_logits_equal_step_by_step_decode_bit_for_bit(tmp_path, arch, kv):
    """Greedy speculative decoding is lossless only if a verify block reproduces decode exactly."""
    path = write_tiny_model(tmp_path / f"{arch}.gguf", arch, seed=3, quantized=True)
    steps = load(path, cpu_weights="fast", kv_k=kv, kv_v=kv)
    steps.prefill(PROMPT, 0)
    follow = [66, 67, 68, 69, 70, 71]
    one_by_one = torch.cat([steps.decode_one(t) for t in follow])  # (6, vocab)
    block = load(path, cpu_weights="fast", kv_k=kv, kv_v=kv)
    block.prefill(PROMPT, 0)
    with torch.inference_mode():
        logits, _ = block.model(torch.tensor(follow), len(PROMPT), block.cache, logits_for="all")
    assert torch.equal(logits, one_by_one)
