"""The fast CPU LM head settles its near-ties in float32 (engine.lm_head) against gguf-py's weights."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from engine.gguf_file import TensorInfo
from engine.linear import DENSE_FROM_ROWS, DenseLinear
from engine.lm_head import MARGIN, RescoredHead, make_lm_head, near_top
from tests.engine.gguf_builders import encode_tensor, random_blocks

IN_FEATURES = 512


def info_of(raw: np.ndarray, qtype: QT, shape: tuple[int, int]) -> TensorInfo:
    return TensorInfo("output.weight", qtype, shape, np.ascontiguousarray(raw).reshape(-1))


def oracle_logits(info: TensorInfo, x: torch.Tensor) -> torch.Tensor:
    """x: (M, K) -> (M, N) float64 with gguf-py's dequantized weights."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[info.qtype]
    rows = info.data.reshape(info.shape[0], info.shape[1] // block_elems * block_bytes)
    weight = torch.from_numpy(gguf.quants.dequantize(rows, info.qtype).astype(np.float64))  # (N, K)
    return x.double() @ weight.reshape(info.shape).T


@pytest.fixture(params=["int4", "bf16"])
def two_plane(request, monkeypatch):
    """Both fast heads of a two-plane type (Q8_0, Q6_K): the int4 op and bfloat16 weights (engine.linear)."""
    monkeypatch.setenv("TANDEM_CPU_TWO_PLANE", request.param)
    return request.param


def test_a_bfloat16_tie_goes_to_the_float32_winner(two_plane):
    # Rows 0 and 1 are all 1.0 (Q8_0 code 127) but row 0 has one code 126: with x = 0.05 everywhere their
    # logits are ~25.6 and differ by d * 0.05 ~ 4e-4, far under bfloat16's step of 0.125 there.
    values = np.random.default_rng(0).normal(0.0, 0.02, (40, IN_FEATURES)).astype(np.float32)
    values[0:2] = 1.0
    values[0, 5] = 126 / 127
    info = info_of(encode_tensor(values, QT.Q8_0), QT.Q8_0, values.shape)
    head = make_lm_head(info, "cpu", "int4-bf16")
    assert isinstance(head, RescoredHead)
    x = torch.full((1, IN_FEATURES), 0.05)
    plain = head.linear(x)  # (1, 40), bfloat16-valued
    assert plain[0, 0] == plain[0, 1] and int(plain.argmax()) == 0, "the fixture must tie in bfloat16"
    want = oracle_logits(info, x)
    assert int(want.argmax()) == 1

    got = head(x)  # (1, 40)
    assert int(got.argmax()) == 1
    torch.testing.assert_close(got[0, :2].double(), want[0, :2], rtol=4e-6, atol=0)  # float32 sums of 512
    torch.testing.assert_close(got[0, 2:], plain[0, 2:], rtol=0, atol=0)  # far from the top: untouched


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q6_K, QT.Q4_K])
def test_greedy_picks_match_float32_on_random_rows(qtype, two_plane):
    rng = np.random.default_rng(1)
    n_out = 300
    info = info_of(random_blocks(qtype, (n_out, IN_FEATURES), rng, max_abs=0.05), qtype, (n_out, IN_FEATURES))
    head = make_lm_head(info, "cpu", "int4-bf16")
    x = torch.from_numpy(rng.normal(0.0, 40.0, (64, IN_FEATURES)).astype(np.float32))  # top logits ~10-30
    want = oracle_logits(info, x)  # (64, N)
    top2 = want.topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4  # rows whose float32 winner is not itself a float32 tie
    assert int(clear.sum()) >= 60
    got = head(x)
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_rows_settle_alone_bit_for_bit(two_plane):
    # A speculative verify block of 16 rows must give each row the logits decoding it alone gives.
    rng = np.random.default_rng(2)
    info = info_of(random_blocks(QT.Q6_K, (200, IN_FEATURES), rng, max_abs=0.05), QT.Q6_K, (200, IN_FEATURES))
    head = make_lm_head(info, "cpu", "int4-bf16")
    x = torch.from_numpy(rng.normal(0.0, 40.0, (16, IN_FEATURES)).astype(np.float32))
    block = head(x)
    for i in range(16):
        assert torch.equal(block[i : i + 1], head(x[i : i + 1]))


def test_prefill_sized_blocks_keep_the_exact_gemm(two_plane):
    rng = np.random.default_rng(3)
    info = info_of(random_blocks(QT.Q8_0, (50, IN_FEATURES), rng, max_abs=0.05), QT.Q8_0, (50, IN_FEATURES))
    head = make_lm_head(info, "cpu", "int4-bf16")
    x = torch.from_numpy(rng.normal(0.0, 1.0, (DENSE_FROM_ROWS, IN_FEATURES)).astype(np.float32))
    assert torch.equal(head(x), head.linear(x))


def test_exact_mode_and_float_heads_are_plain_linears():
    rng = np.random.default_rng(4)
    quantized = info_of(random_blocks(QT.Q8_0, (8, IN_FEATURES), rng), QT.Q8_0, (8, IN_FEATURES))
    assert isinstance(make_lm_head(quantized, "cpu", "dense"), DenseLinear)
    half = np.random.default_rng(5).normal(0, 1, (8, IN_FEATURES)).astype(np.float16)
    float_head = info_of(half.view(np.uint8), QT.F16, (8, IN_FEATURES))
    assert isinstance(make_lm_head(float_head, "cpu", "int4-bf16"), DenseLinear)


@pytest.mark.parametrize("n", [100, 256, 1000, 49152 + 37])
def test_near_top_finds_every_logit_within_the_margin(n):
    logits = torch.from_numpy(np.random.default_rng(n).normal(0.0, 3.0, n).astype(np.float32))
    logits[n // 3], logits[n - 1], logits[0] = 20.0, 19.5, 19.0  # one in the tail past the last whole block
    threshold = 20.0 - 20.0 * MARGIN
    assert torch.equal(near_top(logits, MARGIN), torch.nonzero(logits >= threshold).flatten())
    negative = -torch.rand(n) * 0.01  # |top| < 1: the margin is MARGIN itself
    assert torch.equal(near_top(negative, MARGIN),
                       torch.nonzero(negative >= float(negative.max()) - MARGIN).flatten())
