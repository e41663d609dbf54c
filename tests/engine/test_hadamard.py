"""engine.hadamard: the FWHT is the Sylvester Hadamard matrix; the rotation is orthonormal and fixed."""

import math

import pytest
import torch

from engine import hadamard, kv_quant
from engine.errors import SettingsError


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h  # (n, n), H[i, j] = (-1)^popcount(i & j)


@pytest.mark.parametrize("g", [2, 8, 32, 128])
def test_fwht_is_sylvester_hadamard(g):
    x = torch.randn(5, g, dtype=torch.float64)
    torch.testing.assert_close(hadamard.fwht(x), x @ _sylvester(g), rtol=0, atol=1e-12)
    h = _sylvester(g)
    assert all(h[i, j] == (-1) ** bin(i & j).count("1") for i in range(g) for j in range(g))


@pytest.mark.parametrize("head_dim,group", [(32, 32), (64, 64), (128, 128), (256, 128)])
def test_group_size(head_dim, group):
    rot = hadamard.make_rotation(head_dim)
    assert rot.group == group == hadamard.rotation_group(head_dim)
    assert rot.seed == hadamard.ROTATION_SEED
    assert set(rot.s1.tolist()) <= {-1.0, 1.0} and set(rot.s2.tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("head_dim", [80, 96, 192])
def test_unrotatable_head_dim_is_a_settings_error(head_dim):
    with pytest.raises(SettingsError, match="f16/bf16"):
        hadamard.make_rotation(head_dim)


def test_signs_are_fixed_by_the_seed():
    a, b = hadamard.make_rotation(128), hadamard.make_rotation(128)
    assert torch.equal(a.s1, b.s1) and torch.equal(a.s2, b.s2)
    assert not torch.equal(a.s1, a.s2)
    c = hadamard.make_rotation(128, seed=1)
    assert not (torch.equal(a.s1, c.s1) and torch.equal(a.s2, c.s2))


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_rotation_is_orthonormal(head_dim):
    rot = hadamard.make_rotation(head_dim)
    eye = torch.eye(head_dim)
    r = hadamard.rotate(eye, rot)  # (D, D): row i = R e_i, i.e. R^T
    torch.testing.assert_close(r @ r.T, eye, rtol=0, atol=1e-5)
    x = torch.randn(3, 7, head_dim)
    y = hadamard.rotate(x, rot)
    torch.testing.assert_close(hadamard.unrotate(y, rot), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)


def test_rotation_matches_its_definition():
    rot = hadamard.make_rotation(64)
    x = torch.randn(4, 64, dtype=torch.float64)
    want = rot.s2.double() * ((x * rot.s1.double()) @ _sylvester(64)) / math.sqrt(64)
    torch.testing.assert_close(hadamard.rotate(x, rot).double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 256])
def test_query_key_dot_products_are_preserved(head_dim):
    rot = hadamard.make_rotation(head_dim)
    q = torch.randn(2, 5, head_dim)
    k = torch.randn(2, 9, head_dim)
    k[..., 7] += 40.0  # an outlier channel
    want = q @ k.transpose(-1, -2)  # (2, 5, 9)
    got = hadamard.rotate(q, rot) @ hadamard.rotate(k, rot).transpose(-1, -2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_rotation_spreads_an_outlier_and_helps_q4_0():
    rot = hadamard.make_rotation(128)
    spike = torch.zeros(128)
    spike[5] = 100.0
    assert torch.allclose(hadamard.rotate(spike, rot).abs(), torch.full((128,), 100.0 / math.sqrt(128)))
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(256, 128, generator=gen)
    k[:, 5] += 30.0  # a bias-like outlier, as Qwen2.5's K has
    plain = kv_quant.dequantize(kv_quant.quantize(k, "q4_0"))
    rotated = hadamard.unrotate(kv_quant.dequantize(kv_quant.quantize(hadamard.rotate(k, rot), "q4_0")), rot)
    err = lambda y: ((y - k).pow(2).mean() / k.pow(2).mean()).sqrt().item()
    assert err(rotated) < 0.5 * err(plain)


@pytest.mark.parametrize(
    "k_type,skip_wht,rotated",
    [("f16", False, False), ("bf16", False, False), ("q8_0", False, True), ("q8_0", True, True),
     ("q4_0", False, True), ("q4_0", True, False), ("q4_1", False, True), ("q4_1", True, True)],
)
def test_k_rotation_rule(k_type, skip_wht, rotated):
    rot = hadamard.k_rotation_for(k_type, 128, skip_wht)
    assert (rot is not None) == rotated
