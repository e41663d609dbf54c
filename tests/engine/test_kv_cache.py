"""The engine's KV cache: every K x V type pair, rotation and skip-WHT rules, K smoothing."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.api import EngineConfig
from engine.kv_cache import KVCache, resolve_k_smooth
from engine.session import Engine
from tests.engine.tiny_models import write_tiny_model

TYPES = ["f16", "bf16", "q8_0", "q4_0", "q4_1"]
PROMPT = list(range(40, 100))  # 60 tokens


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("kv") / "qwen2.gguf", "qwen2", seed=5, quantized=False)


@pytest.fixture(scope="module")
def reference_logits(tiny_path):
    return logits_with(tiny_path, "f32", "f32")


def logits_with(path, kv_k: str, kv_v: str, **kw) -> torch.Tensor:
    session = Engine.load(
        EngineConfig(model=str(path), context_length=96, kv_k="f16", kv_v="f16", cpu_weights="exact", **kw)
    )
    c = session.model.config
    session.cache = KVCache(
        c.n_layers,
        c.n_kv_heads,
        c.head_dim,
        96,
        kv_k,
        kv_v,
        rotate_k=not EngineConfig(model="", kv_k=kv_k, **kw).rotation_skipped(),
        k_smooth=resolve_k_smooth(kw.get("k_smooth", "auto"), kv_k),
    )
    return session.prefill(PROMPT, 0, logits_for="all")


# Relative logit error allowed per cache type. Measured on this model (head_dim 64): f16 4e-4, bf16 3e-3,
# q8_0 ~1e-2, 4-bit 0.09-0.15;
# the quantization step of the worse of K and V dominates.
TOLERANCE = {"f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2, "q4_0": 0.25, "q4_1": 0.25}


@pytest.mark.parametrize("kv_k,kv_v", list(itertools.product(TYPES, TYPES)))
def test_every_k_v_pair_runs_and_stays_close(tiny_path, reference_logits, kv_k, kv_v):
    logits = logits_with(tiny_path, kv_k, kv_v)
    assert torch.isfinite(logits).all()
    err = float((logits - reference_logits).norm() / reference_logits.norm())
    assert err < max(TOLERANCE[kv_k], TOLERANCE[kv_v]), f"K {kv_k} / V {kv_v}: relative logit error {err:.3f}"


def test_kv_bytes_q4_0_is_0_28_of_f16():
    f16 = KVCache(2, 2, 128, 256, "f16", "f16")
    q4 = KVCache(2, 2, 128, 256, "q4_0", "q4_0")
    assert q4.nbytes / f16.nbytes == pytest.approx(18 / 64)


def test_rotation_only_for_quantized_k_and_skip_only_for_q4_0(monkeypatch):
    monkeypatch.delenv("DFLASH_SKIP_WHT", raising=False)
    for k_type in TYPES:
        for skip in (False, True):
            config = EngineConfig(model="m", kv_k=k_type, skip_wht=skip)
            cache = KVCache(1, 1, 64, 8, k_type, "f16", rotate_k=not config.rotation_skipped())
            rotated = cache.rotation is not None
            expected = k_type in ("q8_0", "q4_0", "q4_1") and not (skip and k_type == "q4_0")
            assert rotated == expected, f"K {k_type}, skip_wht={skip}"


@pytest.mark.parametrize(
    "value,skipped", [("1", True), ("0", False), ("true", False), (" 1", False), ("", False)]
)
def test_skip_wht_environment_variable_needs_exactly_1(monkeypatch, value, skipped):
    monkeypatch.setenv("DFLASH_SKIP_WHT", value)
    assert EngineConfig(model="m", kv_k="q4_0").rotation_skipped() is skipped
    assert EngineConfig(model="m", kv_k="q8_0").rotation_skipped() is False


def test_k_smoothing_leaves_attention_unchanged_on_unquantized_cache():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(24, 2, 64, generator=gen) + 5 * torch.randn(
        1, 2, 64, generator=gen
    )  # (T, n_kv, D) with a bias
    v = torch.randn(24, 2, 64, generator=gen)
    q = torch.randn(24, 4, 64, generator=gen)  # (T, H, D)
    outs = []
    for smooth in (False, True):
        cache = KVCache(1, 2, 64, 32, "f32", "f32", k_smooth=smooth)
        cache.write(0, 0, k[:16], v[:16])  # first chunk: the mean is taken here
        cache.write(0, 16, k[16:], v[16:])
        outs.append(cache.attention(0, q[16:], 16, 0.125, None))
    assert cache.k_mean[0] is not None and cache.k_mean[0].shape == (2, 64)
    assert torch.allclose(cache.k_mean[0], k[:16].mean(0), atol=1e-6)
    assert torch.allclose(outs[0], outs[1], atol=1e-5), "smoothing changed attention"


def test_rotation_leaves_attention_unchanged_before_quantization():
    gen = torch.Generator().manual_seed(1)
    k, v, q = (torch.randn(10, 2, 64, generator=gen) for _ in range(3))
    plain = KVCache(1, 2, 64, 16, "f32", "f32")
    rotated = KVCache(1, 2, 64, 16, "f32", "f32")
    from engine.hadamard import make_rotation

    rotated.rotation = make_rotation(64)
    outs = []
    for cache in (plain, rotated):
        cache.write(0, 0, k, v)
        outs.append(cache.attention(0, q, 0, 0.125, None))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_auto_smoothing_is_on_for_quantized_k_only():
    assert [resolve_k_smooth("auto", t) for t in TYPES] == [False, False, True, True, True]
    assert resolve_k_smooth("on", "f16") and not resolve_k_smooth("off", "q4_0")
