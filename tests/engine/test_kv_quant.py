"""engine.kv_quant: bit-exact against gguf-py, byte accounting, stores, attention over stores."""

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from engine import kv_quant
from engine.errors import SettingsError, TandemError

GGML = {
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
}


def _hard_rows(gen: torch.Generator, dim: int) -> torch.Tensor:
    """Rows that hit the corner cases: all-zero blocks, ties on the quant grid, +-max pairs, tiny values."""
    rows = [
        torch.zeros(dim),
        torch.randint(-8, 9, (dim,), generator=gen).float() * 0.25,  # exact multiples: .5 ties in q8/q4
        torch.randint(-127, 128, (dim,), generator=gen).float() / 127 * 3.0,
        torch.linspace(-1, 1, dim),
        torch.full((dim,), 2.5),  # a constant block (q4_1: d = 0)
        torch.randn(dim, generator=gen) * 1e-6,
        torch.randn(dim, generator=gen) * 1e4,
    ]
    x = torch.randn(dim, generator=gen)
    x[0], x[1] = 5.0, -5.0  # equal |max| with opposite signs: the first one decides q4_0's sign
    rows.append(x)
    return torch.stack(rows)  # (8, D)


@pytest.mark.parametrize("kv_type", list(GGML))
@pytest.mark.parametrize("seed", range(4))
def test_quantize_matches_gguf_bytes(kv_type, seed):
    gen = torch.Generator().manual_seed(seed)
    dim = 128
    scale = 10.0 ** torch.randint(-3, 4, (64, 1), generator=gen).float()  # (64, 1)
    x = torch.cat([torch.randn(64, dim, generator=gen) * scale, _hard_rows(gen, dim)])  # (72, D)
    want = gguf_quantize(x.numpy(), GGML[kv_type])  # (72, NB * block_bytes) uint8
    got = kv_quant.to_ggml_blocks(kv_quant.quantize(x.reshape(4, 18, dim), kv_type))
    np.testing.assert_array_equal(got.reshape(want.shape), want)


@pytest.mark.parametrize("kv_type", list(GGML))
def test_dequantize_matches_gguf(kv_type):
    gen = torch.Generator().manual_seed(7)
    x = torch.cat([torch.randn(30, 64, generator=gen) * 3, _hard_rows(gen, 64)])  # (38, 64)
    store = kv_quant.quantize(x, kv_type)
    want = gguf_dequantize(gguf_quantize(x.numpy(), GGML[kv_type]), GGML[kv_type])  # (38, 64) float32
    got = kv_quant.dequantize(store)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("kv_type,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_float_types_round_once(kv_type, dtype):
    x = torch.randn(3, 5, 64)
    store = kv_quant.quantize(x, kv_type)
    assert store.qs.dtype == dtype
    assert torch.equal(kv_quant.dequantize(store), x.to(dtype).float())


@pytest.mark.parametrize(
    "kv_type,bytes_128", [("f16", 256), ("bf16", 256), ("q8_0", 136), ("q4_0", 72), ("q4_1", 80)]
)
def test_kv_bytes_per_token(kv_type, bytes_128):
    assert kv_quant.kv_bytes_per_token(kv_type, 128) == bytes_128
    assert kv_quant.kv_bytes_per_token(kv_type, 64) == bytes_128 // 2
    # the table agrees with what a store really takes
    store = kv_quant.allocate(kv_type, (2, 3, 10), 128)
    assert store.nbytes() == 2 * 3 * 10 * bytes_128
    assert kv_quant.quantize(torch.randn(4, 128), kv_type).nbytes() == 4 * bytes_128


@pytest.mark.parametrize("kv_type", list(GGML))
def test_unsupported_head_dim_is_a_user_error(kv_type):
    with pytest.raises(TandemError, match="head_dim divisible by 32"):
        kv_quant.kv_bytes_per_token(kv_type, 80)
    with pytest.raises(SettingsError):
        kv_quant.quantize(torch.randn(2, 48), kv_type)
    assert kv_quant.kv_bytes_per_token("f16", 80) == 160  # float types take any head_dim


def test_unknown_type_is_a_user_error():
    with pytest.raises(SettingsError, match="q4_0"):
        kv_quant.kv_type("q3_k")


def test_store_narrow_and_copy_write_positions():
    store = kv_quant.allocate("q4_1", (1, 2, 10), 64)
    rows = torch.randn(1, 2, 3, 64)  # (B, H, T, D)
    store.narrow(2, 4, 3).copy_(kv_quant.quantize(rows, "q4_1"))
    full = kv_quant.dequantize(store)  # (1, 2, 10, 64)
    assert torch.equal(full[:, :, 4:7], kv_quant.dequantize(kv_quant.quantize(rows, "q4_1")))
    assert int(full[:, :, :4].abs().sum()) == 0 and int(full[:, :, 7:].abs().sum()) == 0
    with pytest.raises(ValueError):
        store.narrow(-1, 0, 2)


def _naive_attention(q, k, v, start, window, scale):
    """Loop-by-loop softmax attention with GQA, as an independent oracle."""
    b, hq, t, dim = q.shape
    hkv = k.shape[1]
    out = torch.zeros(b, hq, t, dim, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(t):
                pos = start + i
                keys = [j for j in range(pos + 1) if not window or j > pos - window]
                s = torch.stack([(q[bi, h, i].double() * k[bi, kh, j].double()).sum() * scale for j in keys])
                p = torch.softmax(s, dim=0)
                out[bi, h, i] = sum(p[n] * v[bi, kh, j].double() for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("k_type,v_type", [("f16", "bf16"), ("q4_0", "q8_0"), ("q4_1", "f16")])
def test_attend_quantized_matches_naive_attention(window, k_type, v_type):
    gen = torch.Generator().manual_seed(0)
    b, hkv, gqa, dim, start, t = 1, 2, 2, 32, 6, 4
    k = torch.randn(b, hkv, start + t, dim, generator=gen)  # (B, Hkv, L, D)
    v = torch.randn(b, hkv, start + t, dim, generator=gen)  # (B, Hkv, L, D)
    q = torch.randn(b, hkv * gqa, t, dim, generator=gen)  # (B, Hq, T, D)
    ks = kv_quant.allocate(k_type, (b, hkv, 16), dim)
    vs = kv_quant.allocate(v_type, (b, hkv, 16), dim)
    ks.narrow(2, 0, start + t).copy_(kv_quant.quantize(k, k_type))
    vs.narrow(2, 0, start + t).copy_(kv_quant.quantize(v, v_type))
    got = kv_quant.attend_quantized(q, ks, vs, start, window=window)
    kd, vd = kv_quant.dequantize(ks), kv_quant.dequantize(vs)  # what the cache really holds
    want = _naive_attention(q, kd, vd, start, window, dim**-0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert got.dtype == q.dtype


def test_attend_quantized_first_query_sees_only_itself():
    ks = kv_quant.quantize(torch.randn(1, 1, 3, 32), "q8_0")
    vs = kv_quant.quantize(torch.randn(1, 1, 3, 32), "q8_0")
    out = kv_quant.attend_quantized(torch.randn(1, 1, 1, 32), ks, vs, 0)  # (1, 1, 1, 32)
    assert torch.equal(out[0, 0, 0], kv_quant.dequantize(vs)[0, 0, 0])
