"""k_write (fused smooth + WHT rotate + quantize) against k_write_reference, byte for byte."""

import pytest
import torch

from engine import hadamard, kv_quant
from kernels.k_write import k_write, k_write_reference
from tests.kernels._util import DEVICE, KV_TYPES, QUANT_TYPES, assert_close_rms, assert_stores_equal, gpu


def _run_both(kv_type, b, h, t, dim, start, positions, smooth, rotate, seed=0, block_t=16):
    gen = torch.Generator().manual_seed(seed)
    k = (torch.randn(b, h, t, dim, generator=gen) * 2.0).to(DEVICE)  # (B, H, T, D)
    k[..., 5] += 20.0  # a bias-like outlier channel
    mean = (torch.randn(h, dim, generator=gen)).to(DEVICE) if smooth else None  # (H, D)
    rot = hadamard.make_rotation(dim) if rotate else None
    got = kv_quant.allocate(kv_type, (b, h, positions), dim, DEVICE)
    want = kv_quant.allocate(kv_type, (b, h, positions), dim, DEVICE)
    k_write(k, got, start, mean=mean, rotation=rot, block_t=block_t)
    k_write_reference(k, want, start, mean=mean, rotation=rot)
    return k, mean, rot, got, want


@pytest.mark.parametrize("kv_type", KV_TYPES)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("smooth", [False, True])
def test_k_write_matches_reference(kv_type, dim, smooth):
    rotate = kv_type in QUANT_TYPES
    _, _, _, got, want = _run_both(kv_type, 1, 2, 41, dim, start=7, positions=50, smooth=smooth,
                                   rotate=rotate)
    assert_stores_equal(got, want)


@pytest.mark.parametrize("kv_type", QUANT_TYPES)
def test_k_write_without_rotation_and_two_groups(kv_type):
    # skip-WHT path, and head_dim 256 = two rotation groups of 128
    _, _, _, got, want = _run_both(kv_type, 2, 1, 5, 64, start=0, positions=5, smooth=False, rotate=False)
    assert_stores_equal(got, want)
    _, _, _, got, want = _run_both(kv_type, 1, 1, 3, 256, start=1, positions=4, smooth=True, rotate=True)
    assert_stores_equal(got, want)


def test_k_write_leaves_other_positions_alone():
    _, _, _, got, _ = _run_both("q4_0", 1, 2, 5, 64, start=3, positions=12, smooth=False, rotate=True)
    assert int(got.qs[:, :, :3].abs().sum()) == 0 and int(got.qs[:, :, 8:].abs().sum()) == 0
    assert int((got.qs[:, :, 3:8] != 0).sum()) > 0


@pytest.mark.parametrize("kv_type", QUANT_TYPES)
def test_k_write_dequantizes_back_to_smoothed_rotated_k(kv_type):
    k, mean, rot, got, _ = _run_both(kv_type, 1, 2, 41, 64, start=0, positions=41, smooth=True, rotate=True)
    back = hadamard.unrotate(kv_quant.dequantize(got), rot) + mean[None, :, None, :]  # (B, H, T, D)
    tol = {"q8_0": 0.01, "q4_0": 0.15, "q4_1": 0.12}[kv_type]
    assert_close_rms("k (dequantized, unrotated, unsmoothed)", back, k, tol)


@pytest.mark.parametrize("kv_type", KV_TYPES)
@pytest.mark.parametrize("block_t", [16, 64])
@pytest.mark.parametrize("dim", [64, 128, 256])
@gpu
def test_k_write_real_shapes_gpu(kv_type, block_t, dim):
    rotate = kv_type in QUANT_TYPES
    _, _, _, got, want = _run_both(kv_type, 1, 8, 1000, dim, start=123, positions=2048, smooth=True,
                                   rotate=rotate, block_t=block_t)
    assert_stores_equal(got, want)


@pytest.mark.parametrize("kv_type", ["f16", "q8_0", "q4_0"])
def test_k_write_at_positions_from_a_tensor(kv_type):
    # the CUDA-graph form: each row's position read on the device, -1 rows (padding) skipped
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(1, 2, 4, 64, generator=gen).to(DEVICE)  # (B, H, T, D)
    mean = torch.randn(2, 64, generator=gen).to(DEVICE)
    rot = hadamard.make_rotation(64) if kv_type != "f16" else None
    positions = torch.tensor([9, 10, -1, 3], device=DEVICE)
    got = kv_quant.allocate(kv_type, (1, 2, 12), 64, DEVICE)
    want = kv_quant.allocate(kv_type, (1, 2, 12), 64, DEVICE)
    k_write(k, got, mean=mean, rotation=rot, positions=positions)
    k_write_reference(k, want, mean=mean, rotation=rot, positions=positions)
    assert_stores_equal(got, want)
    assert int((got.qs[:, :, [0, 1, 2, 4, 5, 6, 7, 8, 11]] != 0).sum()) == 0  # padding wrote nothing
    contiguous = kv_quant.allocate(kv_type, (1, 2, 12), 64, DEVICE)
    k_write(k[:, :, :2], contiguous, 9, mean=mean, rotation=rot)  # same rows through start_pos
    assert_stores_equal(got.narrow(2, 9, 2), contiguous.narrow(2, 9, 2))


def test_k_write_needs_one_kind_of_position():
    k = torch.zeros(1, 1, 2, 32, device=DEVICE)
    store = kv_quant.allocate("f16", (1, 1, 4), 32, DEVICE)
    with pytest.raises(ValueError, match="exactly one"):
        k_write(k, store, 0, positions=torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(ValueError, match="do not fit"):
        k_write(k, store, 3)


def _pow2_scales(h, dim, gen):
    """(H, D) K-equalization scales: powers of two from 1/8 to 8."""
    return torch.exp2(torch.randint(-3, 4, (h, dim), generator=gen).float()).to(DEVICE)


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("tensor_positions", [False, True])
def test_k_write_equalization_and_sinks_match_reference(kv_type, tensor_positions):
    # K divided by per-channel power-of-two scales after smoothing; rows at positions < 4 also kept in f16
    gen = torch.Generator().manual_seed(11)
    k = (torch.randn(1, 2, 6, 64, generator=gen) * 2.0).to(DEVICE)  # (B, H, T, D) at positions 2..7
    mean = torch.randn(2, 64, generator=gen).to(DEVICE)
    scale = _pow2_scales(2, 64, gen)
    rot = hadamard.make_rotation(64)
    where = dict(positions=torch.tensor([2, 3, -1, 5, 6, 7], device=DEVICE)) if tensor_positions else {}
    start = None if tensor_positions else 2
    stores, sinks = [], []
    for write in (k_write, k_write_reference):
        stores.append(kv_quant.allocate(kv_type, (1, 2, 10), 64, DEVICE))
        sinks.append(torch.full((1, 2, 4, 64), 7.0, dtype=torch.float16, device=DEVICE))
        write(k, stores[-1], start, mean=mean, rotation=rot, scale=scale, sink=sinks[-1], **where)
    assert_stores_equal(*stores)
    assert torch.equal(sinks[0], sinks[1]), "sink rows differ from the reference"
    x = hadamard.rotate((k - mean[None, :, None, :]) / scale[None, :, None, :], rot)  # what was quantized
    assert torch.equal(sinks[0][:, :, 2:4], x[:, :, :2].to(torch.float16)), "positions 2, 3 in f16"
    assert bool((sinks[0][:, :, :2] == 7.0).all()), "positions not written keep their sink rows"
    plain = kv_quant.allocate(kv_type, (1, 2, 10), 64, DEVICE)  # (k / s) written without a scale: the same
    k_write(k / scale[None, :, None, :], plain, start, mean=mean / scale, rotation=rot, **where)
    assert_stores_equal(stores[0], plain)
