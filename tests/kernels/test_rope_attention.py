"""kernels.rope_attention (RoPE + K/V write + one-split decode attention of one row in one launch) against
the two launches it replaces (rope_kv_write, then decode_attention's direct path): bit for bit."""

import pytest
import torch

from engine import kv_quant
from engine.models.transformer import rope_tables
from kernels.decode_attention import decode_attention
from kernels.qmatmul import QuantizedWeight, qmatmul
from kernels.rope_attention import applies, rope_write_attend, rope_write_attend_reference
from kernels.rope_kv_write import rope_kv_write
from tests.kernels._util import DEVICE, assert_close_rms, assert_stores_equal

SPLIT, BLOCK_N = 128, 64  # the engine's cache on an H200: one split of 128 positions, tiles of 64


def _stores(kind, hkv, dim, capacity, seed):
    """Stores whose first rows hold earlier tokens (random), the rest empty."""
    gen = torch.Generator().manual_seed(seed)
    stores = [kv_quant.allocate(kind, (1, hkv, capacity), dim, DEVICE) for _ in range(2)]
    for store in stores:
        store.qs.copy_(torch.randn(store.qs.shape, generator=gen).to(store.qs.dtype))
    return stores


def _projections(hq, hkv, dim, seed, split):
    """(q, k, v) as the engine hands them: column slices of a fused QKV output, or SplitOutputs of it."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 256, generator=gen).to(DEVICE, torch.float16)
    if split:
        import numpy as np
        from gguf import GGMLQuantizationType as QT

        from tests.engine.gguf_builders import random_blocks

        n = (hq + 2 * hkv) * dim
        blocks = random_blocks(QT.Q8_0, (n, 256), np.random.default_rng(seed), max_abs=0.05)
        w = QuantizedWeight.from_bytes(blocks, QT.Q8_0, (n, 256), DEVICE)
        y = qmatmul(x, w, split_output=True)
        return y.columns(0, hq * dim), y.columns(hq * dim, (hq + hkv) * dim), y.columns((hq + hkv) * dim, n)
    qkv = (torch.randn(1, (hq + 2 * hkv) * dim, generator=gen) * 2).to(torch.float16).to(DEVICE)
    return (qkv[:, : hq * dim].view(1, hq, dim), qkv[:, hq * dim : (hq + hkv) * dim].view(1, hkv, dim),
            qkv[:, (hq + hkv) * dim :].view(1, hkv, dim))


@pytest.mark.parametrize("kind,neox,window,pos,split", [
    ("f16", True, None, 37, False), ("bf16", False, None, 100, True), ("f16", True, 20, 70, True),
    ("f16", False, None, 127, False), ("f16", True, None, 0, True),
], ids=["f16-neox", "bf16-split-inputs", "window", "last-of-the-split", "first-position"])
def test_one_launch_equals_rope_kv_write_then_decode_attention(kind, neox, window, pos, split):
    hq, hkv, dim, capacity = 6, 2, 64, 2 * SPLIT
    q, k, v = _projections(hq, hkv, dim, pos, split)
    cos, sin = (t.to(DEVICE) for t in rope_tables(torch.arange(capacity), dim, 10000.0, 1.0, None))
    positions = torch.tensor([pos], device=DEVICE)
    scale = dim**-0.5
    fused_stores = _stores(kind, hkv, dim, capacity, 1)
    out = torch.full((1, hq, dim), float("nan"), dtype=torch.float16, device=DEVICE)
    rope_write_attend(q, k, v, positions, cos, sin, *fused_stores, neox=neox, scale=scale, window=window,
                      split_size=SPLIT, block_n=BLOCK_N, out=out)
    stores = _stores(kind, hkv, dim, capacity, 1)
    q_out = rope_kv_write(q, k, v, positions, cos, sin, *stores, neox=neox)
    want = torch.empty_like(out)
    decode_attention(q_out, *stores, torch.tensor([pos + 1], dtype=torch.int32, device=DEVICE), scale=scale,
                     window=window, max_length=SPLIT, split_size=SPLIT, block_n=BLOCK_N, out=want)
    for got_store, want_store in zip(fused_stores, stores, strict=True):
        assert_stores_equal(got_store, want_store)  # the new row written, the others untouched
    assert torch.equal(out, want)
    if window is None and not split:
        fresh = _stores(kind, hkv, dim, capacity, 1)
        _, ref = rope_write_attend_reference(q, k, v, positions, cos, sin, *fresh, neox=neox, scale=scale)
        assert_close_rms("attention", out.float(), ref, 3e-3)


def test_a_padding_row_writes_nothing_and_attends_to_nothing():
    hq, hkv, dim = 6, 2, 64
    q, k, v = _projections(hq, hkv, dim, 3, False)
    cos, sin = (t.to(DEVICE) for t in rope_tables(torch.arange(2 * SPLIT), dim, 10000.0, 1.0, None))
    stores = _stores("f16", hkv, dim, 2 * SPLIT, 2)
    before = [s.qs.clone() for s in stores]
    out = torch.full((1, hq, dim), float("nan"), dtype=torch.float16, device=DEVICE)
    rope_write_attend(q, k, v, torch.tensor([-1], device=DEVICE), cos, sin, *stores, neox=True, scale=0.1,
                      window=None, split_size=SPLIT, block_n=BLOCK_N, out=out)
    assert all(torch.equal(s.qs, b) for s, b in zip(stores, before, strict=True))
    assert torch.equal(out, torch.zeros_like(out))


def test_applies_only_where_the_two_launches_have_nothing_more_to_do():
    f16 = kv_quant.allocate("f16", (1, 2, 256), 64, DEVICE)
    q4 = kv_quant.allocate("q4_0", (1, 2, 256), 64, DEVICE)
    plain = dict(head_norm=False, rotated=False, smoothed=False, equalized=False, sinks=False)
    assert applies(f16, f16, 1, 128, 128, **plain)
    assert not applies(f16, f16, 2, 128, 128, **plain)  # verify rows
    assert not applies(f16, f16, 1, 256, 128, **plain)  # two splits
    assert not applies(q4, f16, 1, 128, 128, **plain) and not applies(f16, q4, 1, 128, 128, **plain)
    for flag in plain:
        assert not applies(f16, f16, 1, 128, 128, **(plain | {flag: True}))
