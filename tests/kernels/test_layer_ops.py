"""kernels.layer_ops (fused norm / RoPE / activation of the CUDA engine path) against torch references."""

import pytest
import torch

from engine import hadamard
from engine.models.transformer import rope_tables
from kernels.layer_ops import (
    add_rms_norm,
    add_rms_norm_reference,
    gated_activation,
    gated_activation_reference,
    rope_heads,
    rope_heads_reference,
)
from tests.kernels._util import DEVICE, assert_close_rms, gpu

FP32_TOL = 2e-6  # same fp32 expression, only the summation order of the norm differs


@pytest.mark.parametrize(
    "n,with_delta,delta_norm", [(256, False, False), (200, True, False), (96, True, True)]
)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_add_rms_norm(n, with_delta, delta_norm, out_dtype):
    scale = 32.0 if with_delta else 1.0  # the engine's undoing of the FFN-down input scale
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(5, n, generator=gen) * 30).to(DEVICE)  # (T, D) residual stream
    w = (1 + 0.1 * torch.randn(n, generator=gen)).to(DEVICE)
    delta = (torch.randn(5, n, generator=gen) * 4).to(torch.bfloat16).to(DEVICE) if with_delta else None
    dw = (1 + 0.1 * torch.randn(n, generator=gen)).to(DEVICE) if delta_norm else None
    x_ref = x.clone()
    want = add_rms_norm_reference(x_ref, w, 1e-6, delta, dw, out_dtype, delta_scale=scale)
    got = add_rms_norm(x, w, 1e-6, delta, dw, out_dtype, delta_scale=scale)
    assert got.dtype == out_dtype
    assert_close_rms("residual after the add", x, x_ref, FP32_TOL)
    assert_close_rms(
        "normed output", got.float(), want.float(), 1e-2 if out_dtype == torch.bfloat16 else 2e-3
    )


@pytest.mark.parametrize(
    "neox,rope_dim,head_norm,rotate",
    [(True, 64, False, False), (False, 64, False, True), (True, 32, True, True), (False, 48, True, False)],
    ids=["neox", "pairs-rotated", "partial-norm-rotated", "partial-pairs-norm"],
)
def test_rope_heads(neox, rope_dim, head_norm, rotate):
    gen = torch.Generator().manual_seed(rope_dim)
    t, hq, hkv, dim = 3, 4, 2, 64
    qkv = torch.randn(t, (hq + 2 * hkv) * dim, generator=gen).to(torch.bfloat16).to(DEVICE)  # fused output
    q = qkv[:, : hq * dim].view(t, hq, dim)  # (T, Hq, D) a strided view, as the engine passes it
    k = qkv[:, hq * dim : (hq + hkv) * dim].view(t, hkv, dim)
    positions = torch.tensor([7, 8, -1], device=DEVICE)  # the last row is padding
    cos, sin = rope_tables(torch.arange(0, 16), rope_dim, 10000.0, 1.0, None)
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    norms = {}
    if head_norm:
        norms = {
            "q_norm": (1 + 0.1 * torch.randn(dim, generator=gen)).to(DEVICE),
            "k_norm": (1 + 0.1 * torch.randn(dim, generator=gen)).to(DEVICE),
        }
    rot = hadamard.make_rotation(dim).to(DEVICE) if rotate else None
    want_q, want_k = rope_heads_reference(q, k, positions, cos, sin, neox=neox, rotation=rot, **norms)
    got_q, got_k = rope_heads(q, k, positions, cos, sin, neox=neox, rotation=rot, **norms)
    assert_close_rms("q after RoPE", got_q, want_q, FP32_TOL)
    assert_close_rms("k after RoPE", got_k, want_k, FP32_TOL)


@pytest.mark.parametrize("rotate", [False, True])
def test_rope_heads_scales_q_for_k_equalization(rotate):
    # Q head h times the scales of KV head h // 2 (GQA 2), before the rotation; K untouched
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(3, 4, 64, generator=gen).to(DEVICE)  # (T, Hq, D)
    k = torch.randn(3, 2, 64, generator=gen).to(DEVICE)  # (T, Hkv, D)
    pos = torch.tensor([0, 1, 2], device=DEVICE)
    cos, sin = (t.to(DEVICE) for t in rope_tables(torch.arange(0, 4), 64, 10000.0, 1.0, None))
    scale = torch.exp2(torch.randint(-3, 4, (2, 64), generator=gen).float()).to(DEVICE)  # powers of two
    rot = hadamard.make_rotation(64).to(DEVICE) if rotate else None
    want_q, want_k = rope_heads_reference(q, k, pos, cos, sin, neox=True, rotation=rot, q_scale=scale)
    got_q, got_k = rope_heads(q, k, pos, cos, sin, neox=True, rotation=rot, q_scale=scale)
    assert_close_rms("scaled q after RoPE", got_q, want_q, FP32_TOL)
    plain_q, plain_k = rope_heads(q, k, pos, cos, sin, neox=True)
    assert torch.equal(got_k, plain_k), "K is never scaled here (k_write divides it)"
    if not rotate:  # a power-of-two product is exact: the plain Q times the scales, bit for bit
        assert torch.equal(got_q, plain_q * scale.repeat_interleave(2, dim=0))
    with pytest.raises(ValueError, match="q_scale"):
        rope_heads(q, k, pos, cos, sin, neox=True, q_scale=scale[:1])


def test_rope_heads_rows_do_not_depend_on_the_block():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(4, 2, 32, generator=gen).to(DEVICE)
    k = torch.randn(4, 1, 32, generator=gen).to(DEVICE)
    pos = torch.tensor([3, 4, 5, 6], device=DEVICE)
    cos, sin = (t.to(DEVICE) for t in rope_tables(torch.arange(0, 8), 32, 10000.0, 1.0, None))
    q4, k4 = rope_heads(q, k, pos, cos, sin, neox=True)
    q1, k1 = rope_heads(q[2:3], k[2:3], pos[2:3], cos, sin, neox=True)
    assert torch.equal(q4[2:3], q1) and torch.equal(k4[2:3], k1)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_activation(activation):
    gen = torch.Generator().manual_seed(0)
    fused = (torch.randn(3, 2 * 300, generator=gen) * 3).to(torch.float16).to(DEVICE)  # [gate | up]
    gate, up = fused[:, :300], fused[:, 300:]
    got = gated_activation(gate, up, activation, scale=1 / 32)
    want = gated_activation_reference(gate, up, activation, scale=1 / 32)
    assert_close_rms(f"{activation}(gate) * up / 32", got.float(), want.float(), 2e-3)


@gpu
def test_layer_ops_real_shapes_gpu():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(512, 1536, generator=gen) * 30).to(DEVICE)
    w = (1 + 0.1 * torch.randn(1536, generator=gen)).to(DEVICE)
    delta = torch.randn(512, 1536, generator=gen).to(torch.bfloat16).to(DEVICE)
    x_ref = x.clone()
    want = add_rms_norm_reference(x_ref, w, 1e-6, delta)
    assert_close_rms("normed output", add_rms_norm(x, w, 1e-6, delta).float(), want.float(), 1e-2)
    qkv = torch.randn(16, (12 + 4) * 128, generator=gen).to(torch.bfloat16).to(DEVICE)
    q, k = qkv[:, : 12 * 128].view(16, 12, 128), qkv[:, 12 * 128 : 14 * 128].view(16, 2, 128)
    pos = torch.arange(4000, 4016, device=DEVICE)
    cos, sin = (t.to(DEVICE) for t in rope_tables(torch.arange(0, 4096), 128, 1e6, 1.0, None))
    rot = hadamard.make_rotation(128).to(DEVICE)
    want_q, want_k = rope_heads_reference(q, k, pos, cos, sin, neox=True, rotation=rot)
    got_q, got_k = rope_heads(q, k, pos, cos, sin, neox=True, rotation=rot)
    assert_close_rms("q", got_q, want_q, 1e-5)
    assert_close_rms("k", got_k, want_k, 1e-5)
