"""kernels.rope_kv_write (RoPE + K write + V write in one launch) against the three launches it replaces
(rope_heads, k_write, v_write: bit for bit) and against its torch reference."""

import pytest
import torch

from engine import hadamard, kv_quant
from engine.models.transformer import rope_tables
from kernels.k_write import k_write
from kernels.layer_ops import rope_heads
from kernels.rope_kv_write import rope_kv_write, rope_kv_write_reference
from kernels.v_write import v_write
from tests.kernels._util import DEVICE, assert_close_rms, assert_stores_equal, gpu

N_SINK = 4


def _case(t, hq, hkv, dim, kv, positions, *, rope_dim=None, head_norm=False, rotate=False, smooth=False,
          equalize=False, sinks=False, capacity=None, seed=0):
    """Inputs of one launch: projections as column slices of a fused QKV output, tables, statistics."""
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(t, (hq + 2 * hkv) * dim, generator=gen) * 2).to(torch.float16).to(DEVICE)
    q = qkv[:, : hq * dim].view(t, hq, dim)  # (T, Hq, D)
    k = qkv[:, hq * dim : (hq + hkv) * dim].view(t, hkv, dim)  # (T, Hkv, D)
    v = qkv[:, (hq + hkv) * dim :].view(t, hkv, dim)
    capacity = capacity or max(positions) + 1
    cos, sin = rope_tables(torch.arange(0, capacity), rope_dim or dim, 10000.0, 1.0, None)
    opts = dict(neox=True, eps=1e-6)
    if head_norm:
        opts["q_norm"] = (1 + 0.1 * torch.randn(dim, generator=gen)).to(DEVICE)
        opts["k_norm"] = (1 + 0.1 * torch.randn(dim, generator=gen)).to(DEVICE)
    stats = dict(
        rotation=hadamard.make_rotation(dim).to(DEVICE) if rotate else None,
        mean=torch.randn(hkv, dim, generator=gen).to(DEVICE) if smooth else None,
        k_scale=torch.exp2(torch.randint(-3, 4, (hkv, dim), generator=gen).float()).to(DEVICE)
        if equalize else None,
    )
    return dict(
        q=q, k=k, v=v, positions=torch.tensor(positions, device=DEVICE), cos=cos.to(DEVICE),
        sin=sin.to(DEVICE), kv=kv, capacity=capacity, sinks=sinks, opts=opts, stats=stats,
    )


def _outputs(case):
    """Fresh stores (1, Hkv, P) and sinks (1, Hkv, S, D), sinks filled with a marker value."""
    hkv, dim = case["k"].shape[1:]
    stores = [kv_quant.allocate(kind, (1, hkv, case["capacity"]), dim, DEVICE) for kind in case["kv"]]
    sinks = [torch.full((1, hkv, N_SINK, dim), 7.0, dtype=torch.float16, device=DEVICE) if case["sinks"]
             else None for _ in range(2)]
    return stores, sinks


def _unfused(case):
    """Today's three launches: rope_heads, k_write, v_write."""
    stores, sinks = _outputs(case)
    s = case["stats"]
    q, k = rope_heads(case["q"], case["k"], case["positions"], case["cos"], case["sin"], **case["opts"],
                      rotation=s["rotation"], q_scale=s["k_scale"])
    k_write(k.permute(1, 0, 2)[None], stores[0], mean=s["mean"], scale=s["k_scale"], rotation=s["rotation"],
            positions=case["positions"], sink=sinks[0])
    v_write(case["v"].permute(1, 0, 2)[None], stores[1], positions=case["positions"], sink=sinks[1])
    return q, stores, sinks


def _fused(case, fn=rope_kv_write, rows=slice(None)):
    stores, sinks = _outputs(case)
    q = fn(case["q"][rows], case["k"][rows], case["v"][rows], case["positions"][rows], case["cos"],
           case["sin"], *stores, **case["opts"], **case["stats"], k_sink=sinks[0], v_sink=sinks[1])
    return q, stores, sinks


def _assert_same(got, want):
    assert torch.equal(got[0], want[0]), "q differs from rope_heads' (scaled, rotated)"
    for side, got_store, want_store in zip("KV", got[1], want[1], strict=True):
        assert got_store.kv_type == want_store.kv_type, side
        assert_stores_equal(got_store, want_store)
    for side, got_sink, want_sink in zip("KV", got[2], want[2], strict=True):
        assert (got_sink is None) == (want_sink is None)
        assert got_sink is None or torch.equal(got_sink, want_sink), f"{side} sink rows differ"


INTERPRETED_CASES = {
    "f16-plain": dict(kv=("f16", "f16")),
    "q4_0-all-options": dict(kv=("q4_0", "q4_0"), head_norm=True, rotate=True, smooth=True, equalize=True,
                             sinks=True),
    "q8_0-q4_1-partial-rope": dict(kv=("q8_0", "q4_1"), rope_dim=48, rotate=True, equalize=True, sinks=True),
    "bf16-q8_0-smooth": dict(kv=("bf16", "q8_0"), smooth=True, equalize=True),
    "q4_0-skip-wht-norm": dict(kv=("q4_0", "f16"), head_norm=True, smooth=True, sinks=True),
}


@pytest.mark.parametrize("name", list(INTERPRETED_CASES))
def test_fused_equals_three_launches(name):
    # rows at positions 2 and 3 are sinks (S = 4), row 2 is padding (-1: RoPE at 0, nothing written)
    case = _case(4, 4, 2, 64, positions=[2, 3, -1, 9], seed=len(name), **INTERPRETED_CASES[name])
    _assert_same(_fused(case), _unfused(case))


def test_fused_rows_do_not_depend_on_the_block():
    case = _case(3, 4, 2, 32, kv=("q4_0", "q8_0"), positions=[5, 6, 7], rotate=True, smooth=True,
                 equalize=True)
    whole = _fused(case)
    one = _fused(case, rows=slice(1, 2))
    assert torch.equal(one[0], whole[0][1:2])
    for got, want in zip(one[1], whole[1], strict=True):
        assert_stores_equal(got.narrow(2, 6, 1), want.narrow(2, 6, 1))


def test_fused_matches_reference():
    # the reference rounds RoPE's fp32 in another order: Q and the dequantized K agree closely, V exactly
    case = _case(3, 4, 2, 64, kv=("q8_0", "q8_0"), positions=[1, 2, 3], rotate=True, smooth=True,
                 equalize=True, sinks=True, head_norm=True)
    got, want = _fused(case), _fused(case, fn=rope_kv_write_reference)
    assert_close_rms("q", got[0], want[0], 2e-6)
    assert_close_rms("K store (dequantized)", kv_quant.dequantize(got[1][0]), kv_quant.dequantize(want[1][0]),
                     1e-3)
    assert_stores_equal(got[1][1], want[1][1])
    assert_close_rms("K sinks", got[2][0].float(), want[2][0].float(), 1e-3)
    assert torch.equal(got[2][1], want[2][1])


def test_fused_refuses_misfits():
    case = _case(2, 4, 2, 32, kv=("q4_0", "q4_0"), positions=[0, 1], sinks=True)
    stores, sinks = _outputs(case)
    args = (case["q"], case["k"], case["v"], case["positions"], case["cos"], case["sin"], *stores)
    with pytest.raises(ValueError, match="k_scale"):
        rope_kv_write(*args, neox=True, k_scale=torch.ones(1, 32, device=DEVICE))
    with pytest.raises(ValueError, match="sinks"):
        rope_kv_write(*args, neox=True, k_sink=sinks[0][:, :1])
    with pytest.raises(ValueError, match="v "):
        rope_kv_write(case["q"], case["k"], case["v"][:, :1], *args[3:], neox=True)


GPU_CASES = {  # Qwen2.5-1.5B (12 / 2 heads of 128), Qwen3-like head norms (16 / 8), Gemma-3-like D 256
    "qwen2.5-f16": dict(hq=12, hkv=2, dim=128, kv=("f16", "f16")),
    "qwen2.5-q4_0": dict(hq=12, hkv=2, dim=128, kv=("q4_0", "q4_0"), rotate=True, smooth=True, equalize=True,
                         sinks=True),
    "qwen2.5-q8_0-q4_1": dict(hq=12, hkv=2, dim=128, kv=("q8_0", "q4_1"), rotate=True, equalize=True,
                              sinks=True),
    "qwen3-norm-q4_0": dict(hq=16, hkv=8, dim=128, kv=("q4_0", "q4_0"), head_norm=True, rotate=True,
                            smooth=True, equalize=True, sinks=True),
    "gemma3-d256-bf16-q4_0": dict(hq=8, hkv=4, dim=256, kv=("bf16", "q4_0"), head_norm=True, rope_dim=256,
                                  sinks=True),
}


@gpu
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_fused_equals_three_launches_real_shapes_gpu(name, rows):
    spec = dict(GPU_CASES[name])
    hq, hkv, dim = spec.pop("hq"), spec.pop("hkv"), spec.pop("dim")
    for first in (0, 4000):  # the sink positions, and deep in a context
        positions = [first + i for i in range(rows)]
        if rows > 1:
            positions[-1] = -1  # a padding row of a verify bucket
        case = _case(rows, hq, hkv, dim, positions=positions, capacity=4096, seed=rows + first, **spec)
        _assert_same(_fused(case), _unfused(case))
