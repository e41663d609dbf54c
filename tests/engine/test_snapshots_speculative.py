"""Snapshots and the RAM prefix in speculative decoding (draft-model, ngram): a follow-up turn prefills only
its new tokens in the target, also after a restart, and greedy output stays exactly the cold plain run's."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from engine.api import DraftConfig, EngineConfig, SamplingParams
from engine.session import Engine
from engine.snapshots import SUFFIX, SnapshotStore, fingerprint
from tests.engine.events import collect_ids
from tests.engine.tiny_models import write_tiny_model

PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 10, 72, 101, 108, 108]
FOLLOW_UP = [258, 10, 87, 104, 121, 63, 259, 10]  # a user turn appended after the answer
TURN = SamplingParams(max_tokens=12)
GREEDY = SamplingParams(max_tokens=16)
MODES = ["draft-model", "ngram"]
KV = [("f16", "f16"), ("q4_0", "q8_0")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("snap_spec")
    return {
        "target": write_tiny_model(d / "target.gguf", "qwen2", seed=3),
        "draft": write_tiny_model(d / "draft.gguf", "qwen2", seed=3, quantized=True),  # mixed accepts
    }


def load(tiny, mode="none", snapshots=None, kv=("f16", "f16"), draft="draft", **kw):
    path = str(tiny[draft]) if mode == "draft-model" else None
    config = EngineConfig(model=str(tiny["target"]), draft=DraftConfig(mode=mode, path=path, max_draft=4),
                          kv_k=kv[0], kv_v=kv[1], device="cpu", context_length=128, prefill_chunk=8,
                          snapshot_dir=str(snapshots) if snapshots else None, **kw)
    return Engine.load(config)


def run(session, ids, params=GREEDY):
    return collect_ids(session.generate(ids, params))


def spy_draft_runs(session) -> list[tuple[int, int]]:
    """Record (start position, token count) of every forward the draft model's cache gets."""
    drafter = session.drafter
    calls: list[tuple[int, int]] = []
    original = drafter._run

    def recording(ids, pos):
        calls.append((pos, len(ids)))
        return original(ids, pos)

    drafter._run = recording
    return calls


@pytest.mark.parametrize("mode", MODES)
def test_follow_up_in_memory_prefills_only_the_new_tokens(tiny, mode):
    session = load(tiny, mode)
    run(session, PROMPT, TURN)
    n_cached = len(session.cached_ids)
    assert n_cached >= len(PROMPT) + 6, "the first answer should be several tokens long"
    follow = session.cached_ids + FOLLOW_UP
    runs = spy_draft_runs(session) if mode == "draft-model" else []
    draft_had = len(session.drafter.cached_ids) if mode == "draft-model" else 0
    tokens, _, final = run(session, follow)
    assert final.stats.cached_tokens == n_cached  # the target ran only FOLLOW_UP
    if mode == "draft-model":
        start, count = runs[0]  # the draft catches up on the prompt from its own in-memory prefix
        assert start >= min(draft_had, len(PROMPT)) and start + count == len(follow)
    assert tokens == run(load(tiny), follow)[0], "greedy speculative output differs from a cold plain run"


@pytest.mark.slow
@pytest.mark.parametrize("kv", KV, ids="-".join)
@pytest.mark.parametrize("mode", MODES)
def test_restored_speculative_run_equals_cold_plain_run(tiny, tmp_path, mode, kv):
    first = load(tiny, mode, tmp_path, kv)
    run(first, PROMPT, TURN)
    n_saved = len(first.cached_ids)
    follow = first.cached_ids + FOLLOW_UP
    files = list(tmp_path.glob(f"*{SUFFIX}"))
    assert len(files) == (2 if mode == "draft-model" else 1), "a snapshot per model cache"

    restarted = load(tiny, mode, tmp_path, kv)  # the app restarted: empty caches, the same snapshot dir
    runs = spy_draft_runs(restarted) if mode == "draft-model" else []
    tokens, _, final = run(restarted, follow)
    assert final.stats.cached_tokens == n_saved, "the target restored its snapshot and prefilled the rest"
    if mode == "draft-model":
        start, count = runs[0]  # the draft restored its own snapshot: it prefills only the rest
        assert start >= len(PROMPT) and start + count == len(follow)
    cold, _, cold_final = run(load(tiny, kv=kv), follow)
    assert cold_final.stats.cached_tokens == 0
    assert tokens == cold, f"restored speculative {tokens} != cold plain {cold}"


def test_draft_snapshot_has_its_own_fingerprint(tiny, tmp_path, caplog):
    """Draft = the target's own file, same cache types: only the cache role tells the snapshots apart."""
    spec = load(tiny, "draft-model", draft="target")
    drafter = spec.drafter.snapshot_owner
    assert drafter is spec.drafter
    run(spec, PROMPT, TURN)
    target_fp, draft_fp = fingerprint(spec), fingerprint(drafter)
    assert (target_fp["cache_role"], draft_fp["cache_role"]) == ("target", "draft")
    assert {k for k in target_fp if target_fp[k] != draft_fp[k]} == {"cache_role"}
    store = SnapshotStore(tmp_path)
    assert store.save(drafter) is not None
    plain = load(tiny)
    follow = drafter.cached_ids[: len(PROMPT) + 4] + FOLLOW_UP
    with caplog.at_level(logging.INFO, logger="engine.snapshots"):
        assert store.restore(plain, follow) == 0
    assert "cache_role 'draft' (session: 'target')" in caplog.text
    assert plain.cached_ids == []


def test_cpu_weight_mode_is_in_the_fingerprint(tiny, tmp_path):
    fast = load(tiny, cpu_weights="fast")
    run(fast, PROMPT, TURN)
    store = SnapshotStore(tmp_path)
    store.save(fast)
    exact = load(tiny, cpu_weights="exact")
    assert (fingerprint(fast)["compute"], fingerprint(exact)["compute"]) == ("cpu/fast", "cpu/exact")
    follow = fast.cached_ids + FOLLOW_UP
    assert store.restore(exact, follow) == 0
    assert store.restore(load(tiny, cpu_weights="fast"), follow) == len(fast.cached_ids)


def test_cancelled_speculative_turn_saves_no_snapshot(tiny, tmp_path):
    session = load(tiny, "draft-model", tmp_path)
    cancel = threading.Event()
    events = session.generate(PROMPT, GREEDY, cancel)
    next(events)  # the first token is out
    cancel.set()
    final = collect_ids(events)[2]
    assert final.stop_reason == "cancelled"
    assert list(tmp_path.glob(f"*{SUFFIX}")) == []


@pytest.mark.parametrize("mode", ["none", "ngram"])
def test_time_to_first_token_counts_the_snapshot_restore(tiny, tmp_path, monkeypatch, mode):
    first = load(tiny, mode, tmp_path)
    run(first, PROMPT, TURN)
    follow = first.cached_ids + FOLLOW_UP
    original = SnapshotStore.restore
    delay = 0.3

    def slow_restore(self, owner, ids):
        time.sleep(delay)
        return original(self, owner, ids)

    monkeypatch.setattr(SnapshotStore, "restore", slow_restore)
    final = run(load(tiny, mode, tmp_path), follow)[2]
    assert final.stats.cached_tokens == len(first.cached_ids)
    assert final.stats.ttft_seconds >= delay
    assert final.stats.prefill_seconds < final.stats.ttft_seconds - delay + 1e-3


def test_mismatch_log_names_a_field_one_side_lacks():
    """A snapshot from another engine version may lack a newer field: the log must still name it."""
    from engine.snapshots import _differences

    assert _differences({"k_type": "f16"}, {"k_type": "f16", "k_equalize": None}) == \
        "k_equalize '<absent>' (session: None)"
    assert _differences({"k_type": "q8_0"}, {"k_type": "f16"}) == "k_type 'q8_0' (session: 'f16')"


@pytest.mark.parametrize("kv", [("q4_0", "q8_0"), ("f16", "f16")])
@pytest.mark.parametrize("skip_wht", [False, True])
def test_draft_cache_follows_the_target_k_recipe(tiny, kv, skip_wht):
    # The draft model's cache once ignored rotation / smoothing settings: a q4_0 K draft cache without
    # smoothing drafts garbage on Qwen2.5 (and drafting for itself stopped being fully accepted).
    session = load(tiny, "draft-model", kv=kv, skip_wht=skip_wht)
    target, draft = session.cache, session.drafter.cache
    assert (draft.rotation is None) == (target.rotation is None)
    assert draft.k_smooth == target.k_smooth
    assert getattr(draft, "k_equalize", None) == getattr(target, "k_equalize", None)
    if kv[0] == "q4_0":
        assert target.k_smooth and (target.rotation is None) == skip_wht
