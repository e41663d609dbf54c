"""kernels/split_output.py: a GEMV's K-split partial sums handed to the kernel that reads them.

Oracles: the GEMV's own output (qmatmul without split_output) and each reader fed that tensor. Everything
must agree bit for bit: the reader adds the splits in the order and precision the GEMV's epilogue did.
Interpreter at small shapes; on a GPU (`gpu`) the Qwen2.5-1.5B shapes the engine launches.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gguf import GGMLQuantizationType as QT  # noqa: E402

from engine.hadamard import make_rotation  # noqa: E402
from engine.kv_quant import allocate  # noqa: E402
from kernels.layer_ops import add_rms_norm, add_rms_norm_reference, gated_activation  # noqa: E402
from kernels.qmatmul import KernelConfig, QuantizedWeight, qmatmul  # noqa: E402
from kernels.rope_kv_write import rope_kv_write, rope_kv_write_reference  # noqa: E402
from kernels.split_output import SplitOutput  # noqa: E402
from tests.engine.gguf_builders import random_blocks  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def weight(qtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    return QuantizedWeight.from_bytes(random_blocks(qtype, shape, rng, max_abs=0.01), qtype, shape, DEVICE)


def x_rows(m, k, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.float16)


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K, QT.Q4_0, QT.Q8_0])
@pytest.mark.parametrize("m", [1, 3])
def test_split_output_value_is_the_gemv_output(qtype, m):
    w = weight(qtype, (96, 512))
    bias = torch.randn(96).to(DEVICE)
    x = x_rows(m, 512)
    for b in (None, bias):
        split = qmatmul(x, w, b, split_output=True)
        assert isinstance(split, SplitOutput) and split.shape == (m, 96) and split.splits > 1
        assert torch.equal(split.value(), qmatmul(x, w, b))


def test_one_split_and_the_gemm_path():
    w = weight(QT.Q4_0, (64, 256))
    x = x_rows(2, 256)
    bias = torch.randn(64).to(DEVICE)
    cfg = KernelConfig(block_n=64, block_m=16, block_k=128, split_k=1)
    for b in (None, bias):
        one = qmatmul(x, w, b, config=cfg, split_output=True)
        assert one.splits == 1 and torch.equal(one.value(), qmatmul(x, w, b, config=cfg))
    tall = x_rows(20, 256)
    assert isinstance(qmatmul(tall, w, split_output=True), torch.Tensor)  # prefill rows: a plain tensor
    with pytest.raises(ValueError, match="GEMV"):
        qmatmul(x, w, config=KernelConfig(block_n=64, block_m=32, block_k=128, split_k=1), split_output=True)


def test_columns_and_split_are_column_views():
    ws = torch.randn(3, 16, 10)
    bias = torch.randn(10)
    y = SplitOutput(ws, bias, 2, torch.float16)
    a, b = y.split([4, 6])
    assert a.shape == (2, 4) and b.shape == (2, 6)
    assert torch.equal(torch.cat([a.value(), b.value()], dim=1), y.value())
    assert torch.equal(y.columns(4, 10).value(), b.value())


@pytest.mark.parametrize("delta_norm", [False, True])
def test_add_rms_norm_reads_a_split_delta(delta_norm):
    w = weight(QT.Q4_K, (256, 512))
    split = qmatmul(x_rows(3, 512), w, torch.randn(256).to(DEVICE), split_output=True)
    norm_w = torch.rand(256).to(DEVICE) + 0.5
    delta_w = torch.rand(256).to(DEVICE) + 0.5 if delta_norm else None
    x = torch.randn(3, 256).to(DEVICE)
    x_ref, x_plain = x.clone(), x.clone()
    got = add_rms_norm(x, norm_w, 1e-6, split, delta_w, delta_scale=32.0)
    want = add_rms_norm(x_plain, norm_w, 1e-6, split.value(), delta_w, delta_scale=32.0)
    assert torch.equal(got, want) and torch.equal(x, x_plain)
    ref = add_rms_norm_reference(x_ref, norm_w, 1e-6, split, delta_w, delta_scale=32.0)
    assert torch.allclose(got.float(), ref.float(), atol=2e-3, rtol=2e-3)


def test_gated_activation_reads_split_gate_and_up():
    w = weight(QT.Q4_K, (128, 256))
    split = qmatmul(x_rows(2, 256), w, split_output=True)
    gate, up = split.split([64, 64])
    plain = split.value()
    want = gated_activation(plain[:, :64], plain[:, 64:], "silu", 2.0**-5)
    assert torch.equal(gated_activation(gate, up, "silu", 2.0**-5), want)
    # one input split, the other a tensor: each rounds to its own (common) dtype
    assert torch.equal(gated_activation(plain[:, :64], up, "silu", 2.0**-5), want)
    assert torch.equal(gated_activation(gate, plain[:, 64:], "silu", 2.0**-5), want)
    other = SplitOutput(gate.ws, gate.bias, gate.rows, torch.bfloat16)
    with pytest.raises(ValueError, match="one dtype"):
        gated_activation(gate, other, "silu")


def test_bf16_readers_agree_with_the_gemv_output():
    """bf16 activations: the readers round the split sums as the GEMV's epilogue does. (Against
    `SplitOutput.value` only on CUDA: the interpreter rounds float32 to bf16 by truncation.)"""
    w = weight(QT.Q4_K, (128, 256))
    x = x_rows(3, 256).to(torch.bfloat16)
    bias = torch.randn(128).to(DEVICE)
    split = qmatmul(x, w, bias, split_output=True)
    y = qmatmul(x, w, bias)
    assert split.dtype == torch.bfloat16
    gate, up = split.split([64, 64])
    want = gated_activation(y[:, :64], y[:, 64:], "silu")
    assert torch.equal(gated_activation(gate, up, "silu"), want)
    assert torch.equal(gated_activation(y[:, :64], up, "silu"), want)
    if HAS_CUDA:
        assert torch.equal(split.value(), y)


@pytest.mark.parametrize("kv", ["f16", "q4_0"])
def test_rope_kv_write_reads_split_projections(kv):
    """Q and K from one GEMV with a bias, V from another (as Qwen2's Q4_K Q/K and Q6_K V), the K recipe of
    a q4_0 cache (rotation, smoothing, equalization): the same q and cache bytes as from the tensors."""
    hq, hkv, dim, cap, t = 4, 2, 64, 16, 3
    qk = qmatmul(x_rows(t, 256), weight(QT.Q4_K, ((hq + hkv) * dim, 256)),
                 torch.randn((hq + hkv) * dim).to(DEVICE), split_output=True)
    v = qmatmul(x_rows(t, 256, seed=2), weight(QT.Q6_K, (hkv * dim, 256), seed=3), split_output=True)
    q_split, k_split = qk.split([hq * dim, hkv * dim])
    positions = torch.tensor([5, 6, -1]).to(DEVICE)
    cos, sin = torch.rand(cap, dim // 2).to(DEVICE), torch.rand(cap, dim // 2).to(DEVICE)
    quant = kv != "f16"
    opts = dict(neox=True, rotation=make_rotation(dim).to(DEVICE) if quant else None,
                k_scale=torch.full((hkv, dim), 0.5).to(DEVICE) if quant else None,
                mean=torch.randn(hkv, dim).to(DEVICE) * 0.1 if quant else None)
    stores = []
    outs = []
    for q_in, k_in, v_in in ((q_split, k_split, v),
                             tuple(s.value().view(t, -1, dim) for s in (q_split, k_split, v))):
        k_store, v_store = allocate(kv, (1, hkv, cap), dim, DEVICE), allocate(kv, (1, hkv, cap), dim, DEVICE)
        outs.append(rope_kv_write(q_in, k_in, v_in, positions, cos, sin, k_store, v_store, **opts))
        stores.append((k_store, v_store))
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(stores[0], stores[1], strict=True):
        assert torch.equal(a.qs, b.qs) and (a.d is None or torch.equal(a.d, b.d))
    k_ref, v_ref = allocate(kv, (1, hkv, cap), dim, DEVICE), allocate(kv, (1, hkv, cap), dim, DEVICE)
    q_ref = rope_kv_write_reference(q_split, k_split, v, positions, cos, sin, k_ref, v_ref, **opts)
    assert torch.allclose(outs[0], q_ref, atol=1e-3, rtol=1e-3)


@gpu
@needs_cuda
@pytest.mark.parametrize("qtype,shape", [(QT.Q4_K, (17920, 1536)), (QT.Q4_K, (1792, 1536)),
                                         (QT.Q6_K, (256, 1536)), (QT.Q4_K, (1536, 1536)),
                                         (QT.Q4_K, (1536, 8960)), (QT.Q6_K, (1536, 8960))])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_engine_shapes_split_output_is_the_gemv_output(qtype, shape, m):
    w = weight(qtype, shape)
    x = x_rows(m, shape[1])
    bias = torch.randn(shape[0]).to(DEVICE)
    split = qmatmul(x, w, bias, split_output=True)
    assert torch.equal(split.value(), qmatmul(x, w, bias))
    if shape[0] == 17920:
        gate, up = split.split([8960, 8960])
        y = split.value()
        want = gated_activation(y[:, :8960], y[:, 8960:], "silu")
        assert torch.equal(gated_activation(gate, up, "silu"), want)
    if shape[0] == 1536:
        x0 = torch.randn(m, 1536, device=DEVICE)
        x1 = x0.clone()
        norm_w = torch.rand(1536, device=DEVICE)
        want = add_rms_norm(x1, norm_w, 1e-6, split.value())
        assert torch.equal(add_rms_norm(x0, norm_w, 1e-6, split), want)
        assert torch.equal(x0, x1)


# ---- two weights of one input in one launch (qmatmul_pair) -------------------------------------------


@pytest.mark.parametrize("types", [(QT.Q4_K, QT.Q6_K), (QT.Q4_0, QT.Q8_0)], ids=["q4_k+q6_k", "q4_0+q8_0"])
@pytest.mark.parametrize("m", [1, 3])
def test_pair_launch_equals_two_launches(types, m):
    from dataclasses import replace

    from kernels.qmatmul import pair_config, qmatmul_pair

    a, b = weight(types[0], (96, 512), seed=2), weight(types[1], (32, 512), seed=3)
    cfg = KernelConfig(block_n=32, block_m=16, block_k=128, split_k=2)
    a.gemv_config, b.gemv_config = cfg, replace(cfg, prefetch=True)  # the prefetch may differ
    assert pair_config(a, b) is not None
    bias_a = torch.randn(96).to(DEVICE)
    x = x_rows(m, 512)
    got = qmatmul_pair(x, a, b, bias_a, None)
    for split, w, bias in zip(got, (a, b), (bias_a, None), strict=True):
        want = qmatmul(x, w, bias, split_output=True)
        assert split.splits == want.splits == 2
        assert torch.equal(split.ws[:, :m], want.ws[:, :m]) and torch.equal(split.value(), want.value())
    b.gemv_config = replace(cfg, block_n=64)
    assert pair_config(a, b) is None


@gpu
@needs_cuda
def test_pair_launch_engine_shapes_gpu():
    # Qwen2.5-1.5B Q4_K_M: Q/K fused (Q4_K) and V (Q6_K) in half the layers, each with its default launch
    from kernels.qmatmul import pair_config, qmatmul_pair

    a, b = weight(QT.Q4_K, (1792, 1536), seed=4), weight(QT.Q6_K, (256, 1536), seed=5)
    assert pair_config(a, b) is not None
    for m in (1, 16):
        x = x_rows(m, 1536)
        got = qmatmul_pair(x, a, b)
        for split, w in zip(got, (a, b), strict=True):
            assert torch.equal(split.value(), qmatmul(x, w))
