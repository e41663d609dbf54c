"""v_write (quantize on V write) against v_write_reference, byte for byte."""

import pytest
import torch

from engine import kv_quant
from kernels.v_write import v_write, v_write_reference
from tests.kernels._util import DEVICE, KV_TYPES, assert_stores_equal, gpu


def _run_both(kv_type, b, h, t, dim, start, positions, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = (torch.randn(b, h, t, dim, generator=gen) * 3.0).to(DEVICE)  # (B, H, T, D)
    v[0, 0, 0, :32] = 0.0  # an all-zero block
    v[0, 0, 1, :] = torch.randint(-8, 8, (dim,), generator=gen).float() / 4  # ties on the grid
    got = kv_quant.allocate(kv_type, (b, h, positions), dim, DEVICE)
    want = kv_quant.allocate(kv_type, (b, h, positions), dim, DEVICE)
    v_write(v, got, start)
    v_write_reference(v, want, start)
    return got, want


@pytest.mark.parametrize("kv_type", KV_TYPES)
@pytest.mark.parametrize("shape", [(1, 2, 41, 64), (2, 1, 5, 128)], ids=["T41-D64", "B2-T5-D128"])
def test_v_write_matches_reference(kv_type, shape):
    got, want = _run_both(kv_type, *shape, start=3, positions=shape[2] + 4)
    assert_stores_equal(got, want)


def test_v_write_from_strided_input():
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(1, 9, 3, 64, generator=gen).to(DEVICE)  # (B, T, 3, D): a fused projection's output
    v = qkv[:, :, 2:3, :].transpose(1, 2)  # (B, 1, T, D), non-contiguous
    got = kv_quant.allocate("q8_0", (1, 1, 9), 64, DEVICE)
    want = kv_quant.allocate("q8_0", (1, 1, 9), 64, DEVICE)
    v_write(v, got, 0)
    v_write_reference(v, want, 0)
    assert_stores_equal(got, want)


@pytest.mark.parametrize("kv_type", KV_TYPES)
@gpu
def test_v_write_real_shapes_gpu(kv_type):
    got, want = _run_both(kv_type, 1, 8, 1000, 128, start=123, positions=2048)
    assert_stores_equal(got, want)


@pytest.mark.parametrize("kv_type", ["bf16", "q4_1"])
def test_v_write_at_positions_from_a_tensor(kv_type):
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(1, 1, 3, 64, generator=gen).to(DEVICE)  # (B, H, T, D)
    positions = torch.tensor([-1, 6, 2], device=DEVICE)
    got = kv_quant.allocate(kv_type, (1, 1, 8), 64, DEVICE)
    want = kv_quant.allocate(kv_type, (1, 1, 8), 64, DEVICE)
    v_write(v, got, positions=positions)
    v_write_reference(v, want, positions=positions)
    assert_stores_equal(got, want)
    assert int((got.qs[:, :, [0, 1, 3, 4, 5, 7]] != 0).sum()) == 0


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
@pytest.mark.parametrize("tensor_positions", [False, True])
def test_v_write_sinks_match_reference(kv_type, tensor_positions):
    # rows at positions < 4 also kept in f16 (attention sinks), from start positions or a position tensor
    gen = torch.Generator().manual_seed(12)
    v = (torch.randn(1, 2, 6, 64, generator=gen) * 2.0).to(DEVICE)  # (B, H, T, D) at positions 2..7
    where = dict(positions=torch.tensor([2, 3, -1, 5, 6, 7], device=DEVICE)) if tensor_positions else {}
    start = None if tensor_positions else 2
    stores, sinks = [], []
    for write in (v_write, v_write_reference):
        stores.append(kv_quant.allocate(kv_type, (1, 2, 10), 64, DEVICE))
        sinks.append(torch.full((1, 2, 4, 64), 7.0, dtype=torch.float16, device=DEVICE))
        write(v, stores[-1], start, sink=sinks[-1], **where)
    assert_stores_equal(*stores)
    assert torch.equal(sinks[0], sinks[1]), "sink rows differ from the reference"
    assert torch.equal(sinks[0][:, :, 2:4], v[:, :, :2].to(torch.float16)), "positions 2, 3 in f16"
    assert bool((sinks[0][:, :, :2] == 7.0).all()), "positions not written keep their sink rows"


def test_k_and_v_write_refuse_sinks_that_do_not_fit_the_store():
    from kernels.k_write import k_write

    x = torch.zeros(1, 2, 3, 64, device=DEVICE)
    for write, wrong in ((v_write, torch.zeros(1, 2, 4, 32, dtype=torch.float16, device=DEVICE)),
                         (k_write, torch.zeros(1, 2, 4, 64, dtype=torch.float32, device=DEVICE))):
        store = kv_quant.allocate("q4_0", (1, 2, 8), 64, DEVICE)
        with pytest.raises(ValueError, match="sinks"):
            write(x, store, 0, sink=wrong)
