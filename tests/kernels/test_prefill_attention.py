"""prefill_attention (chunk vs cached prefix + itself) against prefill_attention_reference."""

import itertools

import pytest
import torch

from kernels.prefill_attention import prefill_attention, prefill_attention_reference
from tests.kernels._util import DEVICE, KV_TYPES, assert_close_rms, gpu, random_sinks, random_store

TOL = 3e-3  # both sides read the same dequantized values; the kernel rounds its dot operands to fp16


def _case(k_type, v_type, bsz, hkv, gqa, dim, start, t, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_store = random_store(k_type, (bsz, hkv, start + t), dim, gen)
    v_store = random_store(v_type, (bsz, hkv, start + t), dim, gen)
    q = torch.randn(bsz, hkv * gqa, t, dim, generator=gen).to(DEVICE)  # (B, Hq, T, D)
    return q, k_store, v_store


@pytest.mark.parametrize("k_type,v_type", list(itertools.product(KV_TYPES, KV_TYPES)))
def test_prefill_all_type_pairs(k_type, v_type):
    # a 41-token chunk after an 82-token prefix, GQA 2
    q, ks, vs = _case(k_type, v_type, 1, 1, 2, 64, 82, 41)
    got = prefill_attention(q, ks, vs, 82, block_m=16)
    want = prefill_attention_reference(q, ks, vs, 82)
    assert_close_rms(f"prefill output ({k_type} K, {v_type} V)", got, want, TOL)


@pytest.mark.parametrize(
    "bsz,dim,gqa,start,t,window",
    [(1, 128, 1, 0, 41, None), (2, 64, 4, 5, 18, 7), (1, 64, 4, 100, 23, 30), (1, 64, 1, 122, 1, None)],
    ids=["D128-first-chunk", "B2-window7", "window30", "one-token"],
)
@pytest.mark.parametrize("k_type,v_type", [("q4_0", "q8_0"), ("q4_1", "bf16")])
def test_prefill_shapes_and_windows(bsz, dim, gqa, start, t, window, k_type, v_type):
    q, ks, vs = _case(k_type, v_type, bsz, 2, gqa, dim, start, t)
    got = prefill_attention(q, ks, vs, start, window=window, block_m=16)
    want = prefill_attention_reference(q, ks, vs, start, window=window)
    assert_close_rms(f"prefill output (T={t} at {start}, D={dim}, window={window})", got, want, TOL)


def test_prefill_chunked_equals_one_pass():
    # two chunks over one cache give the rows a single pass gives (the cache already holds all K/V)
    q, ks, vs = _case("q4_0", "q4_0", 1, 2, 2, 64, 0, 40)
    whole = prefill_attention(q, ks, vs, 0, block_m=16)
    first = prefill_attention(q[:, :, :23], ks, vs, 0, block_m=16)
    second = prefill_attention(q[:, :, 23:], ks, vs, 23, block_m=16)
    assert_close_rms("chunked prefill output", torch.cat([first, second], dim=2), whole, 1e-5)


@gpu
@pytest.mark.parametrize("k_type,v_type", list(itertools.product(KV_TYPES, KV_TYPES)))
@pytest.mark.parametrize("dim,gqa,start,t,window", [(128, 6, 1500, 512, None), (256, 4, 700, 300, 512)])
def test_prefill_real_shapes_gpu(k_type, v_type, dim, gqa, start, t, window):
    q, ks, vs = _case(k_type, v_type, 1, 2, gqa, dim, start, t)
    got = prefill_attention(q, ks, vs, start, window=window)
    want = prefill_attention_reference(q, ks, vs, start, window=window)
    assert_close_rms(f"prefill output ({k_type} K, {v_type} V, D={dim})", got, want, TOL)


def test_prefill_writes_into_a_given_buffer():
    gen = torch.Generator().manual_seed(3)
    ks = random_store("q8_0", (1, 2, 40), 64, gen)
    vs = random_store("f16", (1, 2, 40), 64, gen)
    q_rows = torch.randn(9, 4, 64, generator=gen).to(DEVICE)  # (T, Hq, D) as the engine holds it
    out_rows = torch.full((9, 4, 64), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    view = lambda t: t.permute(1, 0, 2)[None]  # (1, Hq, T, D)
    prefill_attention(view(q_rows), ks, vs, 31, block_n=32, out=view(out_rows))
    want = prefill_attention_reference(view(q_rows), ks, vs, 31)
    assert_close_rms("prefill output in a (T, Hq, D) bf16 buffer", view(out_rows).float(), want, 5e-3)


# ---- attention sinks: positions < S of a side read from its f16 copies --------------------------------


@pytest.mark.parametrize(
    "sides,start,t,window",
    [("kv", 0, 41, None), ("k", 2, 7, None), ("v", 30, 11, None), ("kv", 0, 20, 3), ("kv", 3, 5, 2),
     ("kv", 60, 5, 8)],
    ids=["first-chunk", "k-only-inside-sinks", "v-only-later-chunk", "window3", "window-from-inside-sinks",
         "sinks-out-of-window"],
)
@pytest.mark.parametrize("k_type,v_type", [("q4_0", "q8_0"), ("q8_0", "q4_1")])
def test_prefill_reads_sinks_from_their_f16_copies(sides, start, t, window, k_type, v_type):
    q, ks, vs = _case(k_type, v_type, 2, 2, 2, 64, start, t, seed=3)
    gen = torch.Generator().manual_seed(4)
    k_sink = random_sinks(2, 2, 64, gen) if "k" in sides else None
    v_sink = random_sinks(2, 2, 64, gen) if "v" in sides else None
    got = prefill_attention(q, ks, vs, start, window=window, block_m=16, block_n=32, k_sink=k_sink,
                            v_sink=v_sink)
    want = prefill_attention_reference(q, ks, vs, start, window=window, k_sink=k_sink, v_sink=v_sink)
    assert_close_rms(f"prefill output with {sides} sinks", got, want, TOL)
    plain = prefill_attention_reference(q, ks, vs, start, window=window)
    if window is None or start - window < 3:
        assert (got - plain).abs().max() > 1e-2, "the sinks should change the result"
    else:
        assert_close_rms("prefill output, sinks out of the window", got, plain, TOL)


@gpu
@pytest.mark.parametrize("k_type,v_type", [("q4_0", "q4_0"), ("q8_0", "q8_0"), ("bf16", "q4_0")])
@pytest.mark.parametrize("start,window", [(0, None), (1500, None), (300, 512)])
def test_prefill_sinks_real_shapes_gpu(k_type, v_type, start, window):
    q, ks, vs = _case(k_type, v_type, 1, 2, 6, 128, start, 512)
    gen = torch.Generator().manual_seed(5)
    k_sink = random_sinks(1, 2, 128, gen) if k_type != "bf16" else None
    v_sink = random_sinks(1, 2, 128, gen)
    got = prefill_attention(q, ks, vs, start, window=window, k_sink=k_sink, v_sink=v_sink)
    want = prefill_attention_reference(q, ks, vs, start, window=window, k_sink=k_sink, v_sink=v_sink)
    assert_close_rms(f"prefill output with sinks ({k_type} K, {v_type} V, at {start})", got, want, TOL)
