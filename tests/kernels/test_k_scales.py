"""k_scales (K-equalization scales of a first chunk, two launches) against k_scales_reference
(engine.k_equalize.channel_scales)."""

import pytest
import torch

from engine import k_equalize
from kernels.k_scales import k_scales, k_scales_reference
from tests.kernels._util import DEVICE, gpu


def _chunk(t, hkv, gqa, dim, seed):
    """k (T, Hkv, D) with a bias and channels of very different widths, q (T, Hq, D) uneven too, mean."""
    gen = torch.Generator().manual_seed(seed)
    widths = torch.exp2(torch.randint(-3, 6, (1, hkv, dim), generator=gen).float())  # 1/8 .. 32
    k = torch.randn(t, hkv, dim, generator=gen) * widths + 5 * torch.randn(1, hkv, dim, generator=gen)
    q_widths = torch.exp2(torch.randint(-3, 4, (1, hkv * gqa, dim), generator=gen).float())
    q = torch.randn(t, hkv * gqa, dim, generator=gen) * q_widths
    k[:, :, 1] = 0.25  # a constant channel: floored at RMS_FLOOR of its head
    return k.to(DEVICE), q.to(DEVICE), k.mean(dim=0).to(DEVICE)  # mean (Hkv, D)


@pytest.mark.parametrize(
    "t,hkv,gqa,dim", [(41, 2, 2, 64), (1, 1, 3, 32), (130, 2, 1, 128), (7, 4, 6, 64)],
    ids=["T41-gqa2", "one-row-gqa3", "T130-three-blocks", "T7-gqa6"],
)
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("with_q", [True, False], ids=["k-and-q", "k-only"])
def test_k_scales_match_reference(t, hkv, gqa, dim, smooth, with_q):
    k, q, mean = _chunk(t, hkv, gqa, dim, seed=t + dim)
    q = q if with_q else None
    mean = mean if smooth else None
    got = k_scales(k, q, mean)
    want = k_scales_reference(k, q, mean)
    assert torch.equal(got.cpu(), want.cpu()), f"{(got != want).sum().item()} of {got.numel()} scales differ"
    assert torch.equal(torch.exp2(torch.log2(got).round()), got), "powers of two"
    if t > 1 or not smooth:
        assert len(set(got.flatten().tolist())) > 2, "the test chunk should need several scales"


def test_k_scales_of_an_all_zero_head_are_one_and_write_into_a_given_buffer():
    # one token with smoothing: K minus its own mean is all zero (engine/k_equalize.py gives s = 1)
    k, q, mean = _chunk(1, 2, 2, 64, seed=3)
    out = torch.full((2, 64), float("nan"), device=DEVICE)
    assert k_scales(k, q, mean, out=out) is out
    assert torch.equal(out.cpu(), torch.ones(2, 64))
    assert torch.equal(k_scales(k, torch.zeros_like(q)).cpu(), torch.ones(2, 64)), "all-zero queries"


def test_k_scales_round_half_to_even_like_the_reference():
    # K channel 0 twice as wide as the rest, Q channel 1: both heads have the same RMS, so the width ratios
    # are exactly 2 and 1/2, ALPHA * log2 = +-0.5, ties that torch.round sends to 0 (s = 1), not to 1
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0], device=DEVICE)[:, None, None]  # (T, 1, 1)
    k = torch.ones(4, 1, 32, device=DEVICE) * signs
    q = torch.ones(4, 1, 32, device=DEVICE) * signs
    k[:, :, 0] *= 2.0
    q[:, :, 1] *= 2.0
    got, want = k_scales(k, q), k_scales_reference(k, q)
    assert torch.equal(got.cpu(), want.cpu())
    assert torch.equal(got.cpu(), torch.ones(1, 32)), "ties to even: 2^0"


def test_k_scales_check_their_inputs():
    k, q, _ = _chunk(5, 2, 2, 64, seed=1)
    with pytest.raises(ValueError, match="multiple"):
        k_scales(k, q[:, :3])
    with pytest.raises(ValueError, match="out"):
        k_scales(k, q, out=torch.empty(2, 32, device=DEVICE))
    assert k_equalize.ALPHA == 0.5, "the tie test above assumes ALPHA 1/2"


@gpu
@pytest.mark.parametrize("t,gqa,dim", [(512, 6, 128), (2048, 7, 64), (300, 4, 256)])
def test_k_scales_real_shapes_gpu(t, gqa, dim):
    k, q, mean = _chunk(t, 2, gqa, dim, seed=t)
    got, want = k_scales(k, q, mean), k_scales_reference(k, q, mean)
    # another summation order: a width within rounding of a boundary may take the other power of two
    assert (got != want).sum().item() <= 1, f"{(got != want).sum().item()} scales differ"
