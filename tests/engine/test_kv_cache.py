"""The engine's KV cache: every K x V type pair, rotation and skip-WHT rules, K smoothing and equalization."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from engine import k_equalize
from engine.api import EngineConfig
from engine.errors import SettingsError
from engine.hadamard import make_rotation, rotate
from engine.k_equalize import resolve_k_equalize
from engine.kv_cache import SINK_TOKENS, KVCache, resolve_k_smooth
from engine.kv_quant import dequantize, quantize
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
        k_equalize=resolve_k_equalize(kw.get("k_equalize", "auto"), kv_k),
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


def test_kv_bytes_q4_0_is_0_28_of_f16_plus_the_sinks():
    f16 = KVCache(2, 2, 128, 256, "f16", "f16")
    q4 = KVCache(2, 2, 128, 256, "q4_0", "q4_0", sink_tokens=0)
    assert q4.nbytes / f16.nbytes == pytest.approx(18 / 64)
    with_sinks = KVCache(2, 2, 128, 256, "q4_0", "q4_0")  # f16 copies of the first SINK_TOKENS K and V
    assert with_sinks.nbytes == q4.nbytes + 2 * 2 * (2 * SINK_TOKENS * 128) * 2  # layers, K+V, n_kv*S*D, f16


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
    rotated.rotation = make_rotation(64)
    outs = []
    for cache in (plain, rotated):
        cache.write(0, 0, k, v)
        outs.append(cache.attention(0, q, 0, 0.125, None))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_auto_smoothing_is_on_for_quantized_k_only():
    assert [resolve_k_smooth("auto", t) for t in TYPES] == [False, False, True, True, True]
    assert resolve_k_smooth("on", "f16") and not resolve_k_smooth("off", "q4_0")


# ---- K equalization (engine/k_equalize.py) ----------------------------------------------------------


def biased_keys(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k, v (24, 2, 64) and q (24, 4, 64): K with a bias and channels of very different widths, Q too."""
    gen = torch.Generator().manual_seed(seed)
    widths = torch.exp2(torch.randint(-3, 6, (1, 2, 64), generator=gen).float())  # 1/8 .. 32
    k = torch.randn(24, 2, 64, generator=gen) * widths + 5 * torch.randn(1, 2, 64, generator=gen)
    q_widths = torch.exp2(torch.randint(-3, 4, (1, 4, 64), generator=gen).float())  # 1/8 .. 8
    return k, torch.randn(24, 2, 64, generator=gen), torch.randn(24, 4, 64, generator=gen) * q_widths


def two_chunks(cache: KVCache, k, v, q, split: int = 16) -> list[torch.Tensor]:
    """Run k, v, q (T, heads, D) through layer 0 as the model does: write, then attend, per chunk."""
    outs = []
    for start, stop in ((0, split), (split, k.shape[0])):
        cache.write(0, start, k[start:stop], v[start:stop])
        outs.append(cache.attention(0, q[start:stop], start, 0.125, None))
    return outs


@pytest.mark.parametrize("kind", ["f32", "f16"])
@pytest.mark.parametrize("smooth", [False, True])
def test_k_equalization_leaves_attention_unchanged_on_unquantized_cache(kind, smooth):
    # the scales are powers of two, so q * s and k / s are exact: the very same scores, bit for bit
    k, v, q = biased_keys(2)
    outs = []
    for equalize in (False, True):
        cache = KVCache(1, 2, 64, 32, kind, kind, k_smooth=smooth, k_equalize=equalize)
        outs.append(two_chunks(cache, k, v, q))  # the first chunk sets the scales
    scales = cache.k_scale[0]
    assert scales.shape == (2, 64) and bool((scales != 1).any()), "the test K should need scaling"
    for plain, equalized in zip(*outs, strict=True):
        assert torch.equal(plain, equalized), "equalization changed attention"


def test_k_equalization_scales_come_from_the_first_chunk_and_its_queries_and_stay():
    k, v, q = biased_keys(3)
    cache = KVCache(1, 2, 64, 32, "q4_0", "f16", k_smooth=True, k_equalize=True, sink_tokens=0)
    cache.write(0, 0, k[:16], v[:16])
    assert cache.k_scale[0] is None, "the first chunk waits for its queries"
    cache.attention(0, q[:16], 0, 0.125, None)
    centred = (k[:16] - k[:16].mean(0)).transpose(0, 1)  # (n_kv, T, D) as the cache smooths it
    first = cache.k_scale[0].clone()
    assert torch.equal(first, k_equalize.channel_scales(centred, q[:16].transpose(0, 1)))
    assert not torch.equal(first, k_equalize.channel_scales(centred)), "the queries should matter here"
    cache.write(0, 16, k[16:].flip(-1), v[16:])  # later chunks do not move them
    cache.attention(0, q[16:].flip(-1), 16, 0.125, None)
    assert torch.equal(cache.k_scale[0], first)
    assert cache.nbytes == KVCache(1, 2, 64, 32, "q4_0", "f16", sink_tokens=0).nbytes + 2 * 2 * 64 * 4
    cache.reset()
    assert cache.k_scale == [None]
    cache.write(0, 0, k[:16].flip(-1), v[:16])  # a new conversation takes new ones
    cache.attention(0, q[:16].flip(-1), 0, 0.125, None)
    assert torch.equal(cache.k_scale[0], first.flip(-1))


def test_first_chunk_stored_without_queries_takes_k_only_scales():
    k, v, _ = biased_keys(5)
    cache = KVCache(1, 2, 64, 32, "q4_0", "f16", k_smooth=True, k_equalize=True)
    cache.write(0, 0, k[:16], v[:16])
    cache.write(0, 16, k[16:], v[16:])  # no attention() between: the first chunk is stored first
    centred = (k[:16] - k[:16].mean(0)).transpose(0, 1)  # (n_kv, T, D)
    assert torch.equal(cache.k_scale[0], k_equalize.channel_scales(centred))
    assert bool(cache.k[0].d[:, :16].any()), "the first chunk was stored"


def test_channel_scales_follow_the_recipe():
    gen = torch.Generator().manual_seed(4)
    widths = torch.tensor([8.0, 1.0, 0.001, 3.0, 0.3])  # channel 2 is far below the head's RMS
    q_widths = torch.tensor([[1.0, 4.0, 1.0, 0.0001, 1.0], [1.0, 2.0, 1.0, 0.0001, 3.0]])  # 2 query heads
    k = torch.randn(1, 4000, 5, generator=gen) * widths  # (n_kv, T, D)
    q = torch.randn(2, 4000, 5, generator=gen) * q_widths[:, None]  # (H, T, D), one GQA group

    def relative(rms: list[float]) -> list[float]:
        head = math.sqrt(sum(r * r for r in rms) / len(rms))
        return [max(r, head * k_equalize.RMS_FLOOR) / head for r in rms]

    k_rel = relative(k[0].pow(2).mean(0).sqrt().tolist())
    q_rel = relative(q.pow(2).mean((0, 1)).sqrt().tolist())
    for got, expected_widths in (
        (k_equalize.channel_scales(k), k_rel),
        (k_equalize.channel_scales(k, q), [a / b for a, b in zip(k_rel, q_rel, strict=True)]),
    ):
        expected = [2.0 ** round(k_equalize.ALPHA * math.log2(w)) for w in expected_widths]
        assert got[0].tolist() == expected
        assert torch.equal(torch.exp2(torch.log2(got).round()), got), "powers of two"
        assert len(set(expected)) > 1, "the test channels should get different scales"
    assert k_equalize.channel_scales(k, q)[0, 3] > k_equalize.channel_scales(k)[0, 3], "a narrow Q widens s"
    assert torch.equal(k_equalize.channel_scales(16 * k, q / 4), k_equalize.channel_scales(k, q)), (
        "only the channels' relative widths count"
    )
    assert torch.equal(k_equalize.channel_scales(torch.zeros(2, 1, 4)), torch.ones(2, 4)), "all-zero head"
    assert torch.equal(k_equalize.channel_scales(torch.zeros(2, 1, 4), torch.ones(4, 1, 4)), torch.ones(2, 4))


def test_auto_equalization_is_on_for_quantized_k_on_either_cache():
    assert [resolve_k_equalize("auto", t) for t in TYPES] == [False, False, True, True, True]
    assert resolve_k_equalize("on", "f16") and not resolve_k_equalize("off", "q4_0")
    # the GPU cache equalizes too (tests/engine/test_cuda_kv_cache.py)
    assert [resolve_k_equalize("auto", t, "cuda") for t in TYPES] == [False, False, True, True, True]
    assert resolve_k_equalize("on", "f16", "cuda") and not resolve_k_equalize("off", "q4_0", "cuda")
    with pytest.raises(SettingsError, match="K equalization"):
        EngineConfig(model="m", k_equalize="yes").validate()


def test_session_resolves_equalization(tiny_path):
    on = Engine.load(EngineConfig(model=str(tiny_path), context_length=64, kv_k="q4_0", kv_v="q8_0"))
    off = Engine.load(EngineConfig(model=str(tiny_path), context_length=64, kv_k="q4_0", k_equalize="off"))
    f16 = Engine.load(EngineConfig(model=str(tiny_path), context_length=64, kv_k="f16"))
    assert (on.cache.k_equalize, off.cache.k_equalize, f16.cache.k_equalize) == (True, False, False)
    assert on.info["k_equalize"] is True


# ---- attention sinks: the first positions of a quantized K/V also kept in f16 -----------------------------


def sink_oracle(k, v, q, kv_k: str, kv_v: str, n_sink: int, pos: int, window: int | None) -> torch.Tensor:
    """Attention of q (T, H, D) at [pos, pos + T) over k, v (L, n_kv, D), K rotated (no smoothing or
    equalization): every key and value quantized and dequantized, except the first n_sink in float16."""

    def stored(x, kind):  # (L, n_kv, D) -> (n_kv, L, D) float32
        x = x.transpose(0, 1).to(torch.float32)
        out = dequantize(quantize(x, kind))
        out[:, :n_sink] = x[:, :n_sink].to(torch.float16).to(torch.float32)
        return out

    rot = make_rotation(k.shape[-1])
    keys, values = stored(rotate(k, rot), kv_k), stored(v, kv_v)  # (n_kv, L, D)
    qr = rotate(q.transpose(0, 1).to(torch.float32), rot)  # (H, T, D)
    n_keys, t = k.shape[0], q.shape[0]
    qpos = torch.arange(pos, pos + t)[:, None]
    kpos = torch.arange(n_keys)[None, :]
    mask = (kpos <= qpos) & ((qpos - kpos < window) if window else True)  # (T, L)
    out = torch.nn.functional.scaled_dot_product_attention(
        qr[None], keys[None], values[None], attn_mask=mask, scale=0.125, enable_gqa=True
    )  # (1, H, T, D)
    return out[0].transpose(0, 1)  # (T, H, D)


@pytest.mark.parametrize("kv_k,kv_v", [("q4_0", "q4_0"), ("q4_0", "q8_0"), ("q8_0", "q4_1")])
@pytest.mark.parametrize("chunk", [1, 3, 12])
def test_sinks_are_read_from_their_f16_copies(kv_k, kv_v, chunk):
    k, v, q = biased_keys(6)
    k, v, q = k[:12], v[:12], q[:12]
    cache = KVCache(1, 2, 64, 16, kv_k, kv_v, rotate_k=True)
    assert cache.sink_tokens == SINK_TOKENS == 4
    for start in range(0, 12, chunk):  # chunks smaller and larger than the sinks
        cache.write(0, start, k[start : start + chunk], v[start : start + chunk])
        got = cache.attention(0, q[start : start + chunk], start, 0.125, None)
    want = sink_oracle(k, v, q[-chunk:], kv_k, kv_v, SINK_TOKENS, 12 - chunk, None)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)  # summation order only (row-by-row blocks)
    without = sink_oracle(k, v, q[-chunk:], kv_k, kv_v, 0, 12 - chunk, None)
    assert not torch.allclose(got, without, atol=1e-3), "the sinks should change the result"


@pytest.mark.parametrize("window", [3, 9])  # the sinks out of the window, then partly inside it
def test_sinks_follow_the_sliding_window(window):
    k, v, q = biased_keys(7)
    k, v, q = k[:12], v[:12], q[:12]
    cache = KVCache(1, 2, 64, 16, "q4_0", "q4_0", rotate_k=True)
    cache.write(0, 0, k[:11], v[:11])
    cache.attention(0, q[:11], 0, 0.125, window)
    cache.write(0, 11, k[11:], v[11:])  # decode one token at position 11: keys from 11 - window + 1 on
    got = cache.attention(0, q[11:], 11, 0.125, window)
    assert torch.allclose(got, sink_oracle(k, v, q[11:], "q4_0", "q4_0", 4, 11, window), atol=1e-4)


def test_no_sinks_for_unquantized_caches_and_none_when_turned_off():
    assert KVCache(1, 2, 64, 16, "f16", "bf16").sink_tokens == 0
    assert KVCache(1, 2, 64, 16, "f16", "bf16").k_sink is None
    half = KVCache(1, 2, 64, 16, "f16", "q4_0")  # only the quantized side keeps copies
    assert half.sink_tokens == 4 and half.k_sink is None and half.v_sink[0].shape == (2, 4, 64)
    off = KVCache(1, 2, 64, 16, "q4_0", "q4_0", sink_tokens=0)
    assert off.k_sink is None and off.v_sink is None
    assert KVCache(1, 2, 64, 2, "q4_0", "q4_0").k_sink[0].shape == (2, 2, 64), "never more than max_len"
