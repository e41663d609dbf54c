"""qmatmul (GGUF-block matmul) against an independent oracle, bitwise row independence, split-K, graphs.

Oracle: gguf-py-exact dequantization of the *original* GGUF bytes (`engine.quants.dequantize`),
then a float32 matmul -- it never sees the kernel's struct-of-arrays layout.

Error bounds (relative RMS over the whole output): the kernel rounds each dequantized weight to
x's dtype for the tensor-core dot (float32 accumulation) and rounds the output once. For fp16 each
rounding is a relative error of at most 2^-11 (RMS about 2^-11/sqrt(3) ~ 2.8e-4 per weight; over a
dot of random signs the relative error stays of that size), plus the same again for the output:
about 3.5e-4 measured, bound 1.5e-3. bf16 has 3 fewer significand bits (8x): RNE on the GPU gives
about 2.4e-3 in torch; the Triton 3.9 interpreter converts float32 -> bf16 by truncation, which
doubles it (about 6e-3 measured), bound 1.2e-2. A layout or index mistake gives errors of order 1.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as QT

from engine import quants
from engine.errors import ModelFileError
from engine.gguf_file import GGUFModelFile
from kernels.qmatmul import (
    DENSE_TYPES,
    FAST_TYPES,
    KERNEL_TYPES,
    KernelConfig,
    QuantizedWeight,
    default_gemm_config,
    default_gemv_config,
    qmatmul,
    qmatmul_reference,
)
from kernels.qmatmul_layouts import VECTOR_FIELDS, q4_k_scales, split_fields, to_gguf_bytes
from kernels.qmatmul_tiles import _q6_scales
from tests.engine.gguf_builders import random_blocks, write_gguf
from tests.kernels._util import DEVICE, assert_close_rms, gpu

ALL_TYPES = KERNEL_TYPES + DENSE_TYPES
TOL = {torch.float16: 1.5e-3, torch.bfloat16: 1.2e-2}


def _weight(qtype: QT, n: int, k: int, seed: int = 0, max_abs: float = 0.02):
    """Random valid GGUF blocks (finite fp16 scales) -> (raw bytes, QuantizedWeight, oracle weight)."""
    rng = np.random.default_rng(seed)
    raw = random_blocks(qtype, (n, k), rng, max_abs=max_abs)  # (N, row_bytes) uint8
    w = QuantizedWeight.from_bytes(raw, qtype, (n, k), DEVICE)
    want_w = quants.dequantize(raw, qtype, (n, k)).to(DEVICE)  # (N, K) float32, gguf-py exact
    return raw, w, want_w


def _oracle(x: torch.Tensor, want_w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.to(torch.float32) @ want_w.T  # (M, N)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y


def _x(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)  # (M, K)


def _names(qtypes):
    return [t.name for t in qtypes]


# ---------------------------------------------------------------------------------------------
# Interpreter / CPU: tiny shapes


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=_names(KERNEL_TYPES))
def test_layout_round_trip_is_byte_exact(qtype):
    raw = torch.from_numpy(random_blocks(qtype, (5, 512), np.random.default_rng(3))).reshape(-1)
    fields = split_fields(raw, qtype, (5, 512))
    assert sum(t.numel() * t.element_size() for t in fields.values()) == raw.numel()  # GGUF size
    assert torch.equal(to_gguf_bytes(fields, qtype, (5, 512)), raw)


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=_names(KERNEL_TYPES))
def test_vector_layout_round_trip_is_byte_exact(qtype):
    """The vector-metadata layout (kernels/qmatmul_layouts.py): still the GGUF bytes, moved."""
    raw = torch.from_numpy(random_blocks(qtype, (6, 512), np.random.default_rng(4))).reshape(-1)
    fields = split_fields(raw, qtype, (6, 512), vector_meta=True)
    assert sum(t.numel() * t.element_size() for t in fields.values()) == raw.numel()  # GGUF size
    assert torch.equal(to_gguf_bytes(fields, qtype, (6, 512)), raw)
    blocks = raw.reshape(6, 512 // 256 if qtype in VECTOR_FIELDS or qtype == QT.Q6_K else 16, -1)
    if qtype in VECTOR_FIELDS:  # Q4_K / Q5_K: d, dmin and the 12 scale bytes of each block, 4 words
        assert set(fields) == {f.role for f in VECTOR_FIELDS[qtype]}
        head = fields["s"].view(torch.uint8).reshape(6, 2, 16)
        assert torch.equal(head, blocks[:, :, :16])
    if qtype == QT.Q6_K:  # d column-major: element sb of row n at sb * N + n
        assert fields["d"].shape == (6, 2) and fields["d"].stride() == (1, 6)
        assert torch.equal(fields["d"].contiguous().view(torch.uint8).reshape(6, 2, 2), blocks[:, :, 208:210])


def test_q4_k_scales_are_the_rounded_products_of_gguf_scales():
    """The precomputed Q4_K scales (the fast GEMV's `d` role in the vector layout) are fp16(d * sc) and
    -fp16(dmin * m) of gguf-py's 6-bit scales and mins, in the kernel's group order; the weight still
    round-trips to its GGUF bytes."""
    from gguf.quants import Q4_K

    shape = (3, 512)
    raw = random_blocks(QT.Q4_K, shape, np.random.default_rng(8), max_abs=0.05)
    blocks = raw.reshape(-1, 144)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (nb, 1)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = Q4_K.get_scale_min(blocks[:, 4:16])  # (nb, 8) each
    dl = (d * sc.astype(np.float32)).astype(np.float16)
    ml = (-(dmin * mn.astype(np.float32))).astype(np.float16)
    want = np.stack([dl[:, 0::2], ml[:, 0::2], dl[:, 1::2], ml[:, 1::2]], axis=2).reshape(3, -1)
    got = q4_k_scales(torch.from_numpy(raw).reshape(-1), shape)
    assert got.dtype == torch.float16 and got.shape == (3, 32)
    assert np.array_equal(got.numpy().view(np.uint16), want.view(np.uint16))
    w = QuantizedWeight.from_bytes(raw, QT.Q4_K, shape, DEVICE, vector_meta=True, q4k_scales=True)
    assert w.prescaled and torch.equal(w.fields["d"].cpu(), got)
    unscaled = QuantizedWeight.from_bytes(raw, QT.Q4_K, shape, DEVICE, vector_meta=True, q4k_scales=False)
    assert unscaled.vector_meta and not unscaled.prescaled and "d" not in unscaled.fields
    want_w = quants.dequantize(torch.from_numpy(raw).reshape(-1), QT.Q4_K, shape)
    assert torch.equal(w.dequantize().cpu(), want_w)


def test_vector_layout_needs_even_rows_for_q6_k():
    raw = random_blocks(QT.Q6_K, (5, 256), np.random.default_rng(5))
    assert not QuantizedWeight.from_bytes(raw, QT.Q6_K, (5, 256), DEVICE, vector_meta=True).vector_meta
    assert QuantizedWeight.from_bytes(raw[:4], QT.Q6_K, (4, 256), DEVICE, vector_meta=True).vector_meta
    with pytest.raises(ValueError, match="vector"):
        split_fields(torch.from_numpy(raw).reshape(-1), QT.Q6_K, (5, 256), vector_meta=True)


_VECTOR_TYPES = [QT.Q4_K, QT.Q5_K, QT.Q6_K]


@pytest.mark.parametrize("qtype", _VECTOR_TYPES, ids=_names(_VECTOR_TYPES))
def test_vector_metadata_changes_no_bit(qtype):
    """The same weight in both layouts gives the same bits with the engine's launches (GEMV at 1 and 16
    rows, GEMM, fp16 and bf16); in a hand-made split-K launch (block_n 16, a partial last column tile) each
    layout keeps rows independent and the two agree to rounding: on the H200 (session 5) the Q6_K fast
    path differed from the plain layout in 1-2 of 640 outputs by one fp16 ulp there, never in the engine's
    own launch shapes (`bench_qmatmul --ab-meta`)."""
    raw = random_blocks(qtype, (40, 768), np.random.default_rng(6), max_abs=0.02)  # 3 super-blocks a row
    plain = QuantizedWeight.from_bytes(raw, qtype, (40, 768), DEVICE, vector_meta=False)
    vector = QuantizedWeight.from_bytes(raw, qtype, (40, 768), DEVICE, vector_meta=True)
    assert vector.vector_meta and not plain.vector_meta
    split = KernelConfig(block_n=16, block_m=16, block_k=256, split_k=3)  # rows 32..47 of 40 masked
    for dtype in (torch.float16, torch.bfloat16):
        x = _x(33, 768, dtype, seed=7)
        for rows in (1, 16, 33):
            got, want = qmatmul(x[:rows], vector), qmatmul(x[:rows], plain)
            n_bad = (got.view(torch.int16) != want.view(torch.int16)).sum().item()
            assert n_bad == 0, f"{qtype.name} {dtype} M={rows}: {n_bad} outputs differ"
        got = qmatmul(x[:16], vector, config=split)
        assert_close_rms(f"{qtype.name} {dtype} split-K, vector vs plain", got,
                         qmatmul(x[:16], plain, config=split), 2e-3)
        for i in (0, 7, 15):  # rows stay independent in the vector layout too
            assert torch.equal(got[i : i + 1], qmatmul(x[i : i + 1], vector, config=split)), f"row {i}"


@triton.jit
def _q6_scales_probe(s_ptr, ss, out_ptr, N_ROWS: tl.constexpr, NG: tl.constexpr):
    """Every (FIRST, COUNT) of _q6_scales the two Q6_K paths use, for rows 0..N_ROWS and halves
    0..NG: out[row, half, k] for k in 0..7 (once from the pairs, once from the quads)."""
    rows = tl.arange(0, N_ROWS).to(tl.int64)
    gi = tl.arange(0, NG)
    mask2 = (rows[:, None] >= 0) & (gi[None, :] >= 0)
    base = out_ptr + (rows[:, None, None] * NG + gi[None, :, None]) * 16
    two = tl.arange(0, 2)[None, None, :]
    four = tl.arange(0, 4)[None, None, :]
    for first in tl.static_range(0, 8, 2):
        tl.store(base + first + two, _q6_scales(s_ptr, ss, rows, gi, mask2, first, 2))
    tl.store(base + 8 + four, _q6_scales(s_ptr, ss, rows, gi, mask2, 0, 4))
    tl.store(base + 12 + four, _q6_scales(s_ptr, ss, rows, gi, mask2, 4, 4))


def test_q6_scales_words_give_the_scale_bytes():
    """The word-wise Q6_K scale loads of the vector layout (the inline-PTX path's pairs included, which
    the interpreter's GEMV does not run) give the int8 scales the byte loads give."""
    raw = random_blocks(QT.Q6_K, (4, 512), np.random.default_rng(8))
    s = split_fields(torch.from_numpy(raw).reshape(-1), QT.Q6_K, (4, 512), vector_meta=True)["s"].to(DEVICE)
    out = torch.empty(4, 4, 16, device=DEVICE)  # (row, half super-block, 2 x 8 scales)
    _q6_scales_probe[(1,)](s, s.stride(0), out, N_ROWS=4, NG=4)
    want = s.reshape(4, 4, 8).to(torch.float32)  # scales of half gi = bytes 8 gi .. 8 gi + 7 of the row
    assert torch.equal(out[:, :, :8], want) and torch.equal(out[:, :, 8:], want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=_names(ALL_TYPES))
def test_gemv_matches_oracle(qtype, dtype):
    _, w, want_w = _weight(qtype, 41, 512)
    x = _x(7, 512, dtype)
    got = qmatmul(x, w)
    assert got.dtype == dtype and got.shape == (7, 41)
    assert_close_rms(f"{qtype.name} y", got, _oracle(x, want_w, None), TOL[dtype])


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=_names(KERNEL_TYPES))
def test_reference_is_the_oracle(qtype):
    _, w, want_w = _weight(qtype, 17, 256)
    x = _x(3, 256, torch.float16)
    assert torch.equal(qmatmul_reference(x, w), _oracle(x, want_w, None).to(torch.float16))


@pytest.mark.parametrize("m", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K],
                         ids=["Q4_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_rows_and_bias_odd_n(qtype, m):
    _, w, want_w = _weight(qtype, 33, 256, seed=m)
    x = _x(m, 256, torch.float16, seed=m)
    bias = torch.randn(33, generator=torch.Generator().manual_seed(5)).to(DEVICE)  # float32 bias
    got = qmatmul(x, w, bias)
    assert got.shape == (m, 33)
    assert_close_rms(f"{qtype.name} M={m} y", got, _oracle(x, want_w, bias), TOL[torch.float16])


def _assert_rows_bitwise(x, w, config=None):
    full = qmatmul(x, w, config=config)  # (M, N)
    for i in range(x.shape[0]):
        one = qmatmul(x[i : i + 1], w, config=config)  # (1, N)
        n_bad = (one[0].view(torch.int16) != full[i].view(torch.int16)).sum().item()
        assert n_bad == 0, f"{w.qtype.name}: row {i} of M={x.shape[0]} differs from M=1 in {n_bad} outputs"


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=_names(ALL_TYPES))
def test_gemv_rows_bitwise_independent(qtype):
    _, w, _ = _weight(qtype, 24, 512, seed=2)
    x = _x(16, 512, torch.float16, seed=2)
    _assert_rows_bitwise(x[:5], w)
    # Row i of the 16-row call against the 5-row call too (same code path for every M <= 16).
    assert torch.equal(qmatmul(x, w)[:5], qmatmul(x[:5], w))


def test_gemv_row_tiles(monkeypatch):
    """GEMV launches compute rows in tiles of their row_tile (8: two for 9..16 rows); the engine's 2-warp
    launches take 8, the others 16; TANDEM_GEMV_WIDE_TILE=1 / TANDEM_GEMV_NARROW_ALL=1 make every launch
    wide / narrow (A/Bs)."""
    from kernels.qmatmul import _row_tiles, default_gemv_config

    two = KernelConfig(block_n=64, block_m=16, block_k=128, split_k=2, num_warps=2, row_tile=8)
    four = KernelConfig(block_n=64, block_m=16, block_k=128, split_k=2, num_warps=4)
    assert [_row_tiles(two, m) for m in (1, 8, 9, 16)] == [(8, 1), (8, 1), (8, 2), (8, 2)]
    assert [_row_tiles(four, m) for m in (1, 9, 16)] == [(16, 1)] * 3
    assert _row_tiles(two, 17) == (16, 1)  # not a GEMV: the config's tile
    assert _row_tiles(KernelConfig(block_n=128, block_m=64, block_k=128, split_k=1), 5) == (64, 1)
    for warps in (2, 4):
        cfg = default_gemv_config(QT.Q4_K, (1536, 8960), "cpu", num_warps=warps)
        assert cfg.row_tile == (8 if warps == 2 else 16)
    monkeypatch.setenv("TANDEM_GEMV_NARROW_ALL", "1")
    assert _row_tiles(four, 1) == (8, 1) and _row_tiles(four, 16) == (8, 2)
    monkeypatch.setenv("TANDEM_GEMV_WIDE_TILE", "1")
    assert _row_tiles(two, 1) == _row_tiles(two, 16) == (16, 1)


def test_ptx_bytes_a_call_follow_the_warps(monkeypatch):
    """Q4_K's fast path takes four quant bytes a PTX call in launches of fewer than 4 warps (mma.sync), two
    in the others (wgmma); TANDEM_GEMV_TWO_BYTE_PTX=1 makes every launch take two (A/Bs)."""
    from kernels.qmatmul import _ptx_pack

    configs = {w: KernelConfig(block_n=64, block_m=16, block_k=128, split_k=2, num_warps=w)
               for w in (1, 2, 4, 8)}
    assert {w: _ptx_pack(c) for w, c in configs.items()} == {1: 4, 2: 4, 4: 2, 8: 2}
    monkeypatch.setenv("TANDEM_GEMV_TWO_BYTE_PTX", "1")
    assert {_ptx_pack(c) for c in configs.values()} == {2}


@pytest.mark.parametrize("switch", ["", "TANDEM_GEMV_WIDE_TILE", "TANDEM_GEMV_NARROW_ALL"])
@pytest.mark.parametrize("row_tile", [8, 16])
def test_rows_of_one_and_two_row_tiles_keep_their_bits(monkeypatch, switch, row_tile):
    """Rows 0..15 of a 16-row call (two 8-row tiles, or one of 16) equal 1-row calls, as do rows of a 9-row
    call, with the K split done in the kernel and left to the reader, under either A/B switch."""
    if switch:
        monkeypatch.setenv(switch, "1")
    _, w, want_w = _weight(QT.Q4_K, 40, 768, seed=21)
    x = _x(16, 768, torch.float16, seed=21)
    cfg = KernelConfig(block_n=16, block_m=16, block_k=256, split_k=3, row_tile=row_tile)
    y16 = qmatmul(x, w, config=cfg)
    assert_close_rms("16 rows", y16, _oracle(x, want_w, None), TOL[torch.float16])
    for i in (0, 7, 8, 15):
        assert torch.equal(qmatmul(x[i : i + 1], w, config=cfg)[0], y16[i]), f"row {i}"
    assert torch.equal(qmatmul(x[:9], w, config=cfg), y16[:9])
    split = qmatmul(x, w, config=cfg, split_output=True)
    assert torch.equal(split.value(), y16)


@pytest.mark.parametrize("split", [1, 3])
def test_split_k_matches_and_resets_counters(split):
    _, w, want_w = _weight(QT.Q4_K, 40, 768, seed=4)  # 3 K-tiles of 256
    x = _x(4, 768, torch.float16)
    cfg = KernelConfig(block_n=16, block_m=16, block_k=256, split_k=split)
    first = qmatmul(x, w, config=cfg)
    assert int(w.counters.abs().sum()) == 0, "split-K semaphores must be left at zero"
    assert torch.equal(qmatmul(x, w, config=cfg), first)  # a second call (a graph replay) sees clean counters
    assert_close_rms("split-K y", first, _oracle(x, want_w, None), TOL[torch.float16])
    _assert_rows_bitwise(x, w, cfg)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q5_1, QT.Q8_0, QT.F16], ids=["Q4_0", "Q5_1", "Q8_0", "F16"])
def test_k_not_a_multiple_of_the_tile(qtype):
    _, w, want_w = _weight(qtype, 20, 800, seed=6)  # 25 blocks of 32: the last K-tile is partial
    x = _x(3, 800, torch.float16)
    assert_close_rms(f"{qtype.name} K=800 y", qmatmul(x, w), _oracle(x, want_w, None), TOL[torch.float16])
    _assert_rows_bitwise(x, w)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q6_K], ids=["Q4_0", "Q6_K"])
def test_wide_tile_three_stage_config(qtype):
    """The LM-head launch (block_n 128, 3 stages) at a small shape: values and row independence."""
    _, w, want_w = _weight(qtype, 300, 256, seed=10)  # 2.3 tiles of 128 columns
    cfg = default_gemv_config(qtype, w.shape, DEVICE, block_n=128, num_stages=3)
    x = _x(5, 256, torch.float16)
    got = qmatmul(x, w, config=cfg)
    assert_close_rms(f"{qtype.name} y", got, _oracle(x, want_w, None), TOL[torch.float16])
    _assert_rows_bitwise(x, w, cfg)


def test_from_gguf_file(tmp_path):
    rng = np.random.default_rng(7)
    raw = random_blocks(QT.Q6_K, (24, 256), rng, max_abs=0.02)
    path = write_gguf(tmp_path / "w.gguf", "llama", {}, {"blk.0.ffn_down.weight": (raw, QT.Q6_K)})
    model = GGUFModelFile.open(path)
    w = QuantizedWeight.from_gguf(model.tensors["blk.0.ffn_down.weight"], DEVICE)
    assert (w.qtype, w.shape) == (QT.Q6_K, (24, 256))
    assert w.nbytes == raw.nbytes
    x = _x(2, 256, torch.float16)
    want_w = quants.dequantize(raw, QT.Q6_K, (24, 256)).to(DEVICE)
    assert_close_rms("from_gguf y", qmatmul(x, w), _oracle(x, want_w, None), TOL[torch.float16])


def test_unsupported_type_is_a_model_file_error():
    with pytest.raises(ModelFileError, match="not supported"):
        QuantizedWeight.from_bytes(np.zeros(16 * 18, np.uint8), QT.IQ4_NL, (16, 32), DEVICE)
    with pytest.raises(ModelFileError, match="needs"):
        QuantizedWeight.from_bytes(np.zeros(17, np.uint8), QT.Q4_0, (1, 32), DEVICE)


def test_bad_inputs_are_rejected():
    _, w, _ = _weight(QT.Q4_0, 16, 64)
    with pytest.raises(ValueError):
        qmatmul(_x(2, 32, torch.float16), w)  # wrong K
    with pytest.raises(ValueError):
        qmatmul(_x(2, 64, torch.float32), w)  # float32 activations
    assert qmatmul(_x(0, 64, torch.float16), w).shape == (0, 16)


# ---------------------------------------------------------------------------------------------
# GPU: real shapes (Qwen2.5-1.5B)

REAL_SHAPES = [(8960, 1536), (1536, 8960), (256, 1536)]  # (N, K)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=_names(ALL_TYPES))
@gpu
def test_real_shapes_gpu(qtype):
    for n, k in REAL_SHAPES:
        _, w, want_w = _weight(qtype, n, k, seed=n + k, max_abs=0.01)
        for dtype in (torch.float16, torch.bfloat16):
            x = _x(16, k, dtype)
            bias = torch.randn(n, device=DEVICE, dtype=dtype)
            y16 = qmatmul(x, w, bias)
            name = f"{qtype.name} ({n}, {k}) {dtype}"
            assert_close_rms(f"{name} M=16", y16, _oracle(x, want_w, bias), TOL[dtype])
            for m in (1, 2, 7):
                assert torch.equal(qmatmul(x[:m], w, bias), y16[:m]), f"{qtype.name} ({n}, {k}) M={m} rows"
            for i in (0, 5, 15):
                assert torch.equal(qmatmul(x[i : i + 1], w, bias)[0], y16[i]), f"{qtype.name} row {i}"
            xl = _x(300, k, dtype, seed=3)
            assert_close_rms(f"{name} M=300", qmatmul(xl, w), _oracle(xl, want_w, None), TOL[dtype])


@pytest.mark.parametrize("qtype", FAST_TYPES, ids=_names(FAST_TYPES))
@gpu
def test_lm_head_shape_gpu(qtype):
    """151936 x 1536 with the default (tuned) launch: values, and rows of M = 16 bit for bit M = 1."""
    _, w, want_w = _weight(qtype, 151936, 1536, seed=11, max_abs=0.01)
    x = _x(16, 1536, torch.float16)
    y16 = qmatmul(x, w)
    assert_close_rms(f"{qtype.name} LM head", y16, _oracle(x, want_w, None), TOL[torch.float16])
    for i in (0, 9, 15):
        assert torch.equal(qmatmul(x[i : i + 1], w)[0], y16[i]), f"{qtype.name} LM head row {i}"


@pytest.mark.parametrize("qtype", FAST_TYPES, ids=_names(FAST_TYPES))
@gpu
def test_fast_and_portable_dequant_gpu(qtype):
    """The inline-PTX fp16 dequantization and the float32 one, GEMV and GEMM, both against the oracle."""
    _, w, want_w = _weight(qtype, 1536, 1536, seed=8, max_abs=0.01)
    for m in (16, 300):
        x = _x(m, 1536, torch.float16, seed=m)
        base = w.gemv_config if m <= 16 else default_gemm_config(qtype, m)
        want = _oracle(x, want_w, None)
        for fast in (True, False):
            got = qmatmul(x, w, config=dataclasses.replace(base, fast=fast))
            assert_close_rms(f"{qtype.name} M={m} fast={fast}", got, want, TOL[torch.float16])


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_K, QT.Q6_K], ids=["Q4_0", "Q4_K", "Q6_K"])
@gpu
def test_cuda_graph_replay_is_bitwise_gpu(qtype):
    _, w, _ = _weight(qtype, 1536, 8960, seed=9, max_abs=0.01)  # split-K shape
    x = torch.zeros(16, 8960, device=DEVICE, dtype=torch.float16)
    outs = {}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for m in (1, 16):
            qmatmul(x[:m], w)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graphs = {}
    for m in (1, 16):
        graphs[m] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[m]):
            outs[m] = qmatmul(x[:m], w)
    x.copy_(_x(16, 8960, torch.float16))
    for m in (1, 16):
        graphs[m].replay()
    torch.cuda.synchronize()
    assert torch.equal(outs[16], qmatmul(x, w))
    assert torch.equal(outs[1][0], outs[16][0])



# ---- L2 prefetch and programmatic dependent launch (kernels/qmatmul_prefetch.py, kernels/pdl.py) ----


@pytest.mark.parametrize("n_k_tiles", [1, 7, 12, 70, 151])
@pytest.mark.parametrize("stride,elem", [(768, 1), (48, 2), (420, 1), (4480, 2), (7, 4)])
def test_prefetch_lines_cover_every_split(n_k_tiles, stride, elem):
    """The host's line count must let the kernel's addresses (lo + i * line, clamped to hi - 1) touch
    every 128-byte line of [lo, hi) for every split of the K-tiles (the formula of _prefetch_field)."""
    from kernels.qmatmul_prefetch import LINE_BYTES, _field_lines

    t = torch.empty(1, dtype={1: torch.uint8, 2: torch.float16, 4: torch.int32}[elem])
    line = LINE_BYTES // elem
    for tiles_per_split in sorted({1, 2, 3, max(1, n_k_tiles // 4), n_k_tiles}):
        lines = _field_lines(t, stride, tiles_per_split, n_k_tiles)
        for t_start in range(0, n_k_tiles, tiles_per_split):
            t_stop = min(t_start + tiles_per_split, n_k_tiles)
            lo = t_start * stride // n_k_tiles
            hi = (t_stop * stride + n_k_tiles - 1) // n_k_tiles
            for row_start in (0, 3 * stride):  # rows start anywhere relative to a line
                addrs = [row_start + min(lo + i * line, hi - 1) for i in range(lines)]
                touched = {a // line for a in addrs}
                needed = set(range((row_start + lo) // line, (row_start + hi - 1) // line + 1))
                assert needed <= touched, (tiles_per_split, t_start, lines)


@pytest.mark.parametrize("n_k_tiles", [1, 7, 12, 70])
@pytest.mark.parametrize("per_row,n_rows,block_n",
                         [(6, 1536, 64), (35, 256, 64), (3, 40, 16), (6, 151936, 64)])
def test_prefetch_columns_cover_every_split(n_k_tiles, per_row, n_rows, block_n):
    """Column-major fields (Q6_K's d in the vector layout): the kernel's addresses (elements lo + c,
    clamped to hi - 1; rows n0 + i * line, clamped to the tile's last row) touch every 128-byte line
    of the program's elements of every column tile, for every split. The addresses are rebuilt here from
    _prefetch_columns' formula (a prefetch has no visible effect to test in a kernel); the host line count
    (column_span) is the launcher's own."""
    from kernels.qmatmul_prefetch import LINE_BYTES, column_span

    elem = 2  # fp16 d
    line = LINE_BYTES // elem
    run_lines = 2 * ((block_n * elem + LINE_BYTES - 1) // LINE_BYTES)
    for tiles_per_split in sorted({1, 2, 3, max(1, n_k_tiles // 4), n_k_tiles}):
        cols = column_span(per_row, tiles_per_split, n_k_tiles)
        for t_start in range(0, n_k_tiles, tiles_per_split):
            t_stop = min(t_start + tiles_per_split, n_k_tiles)
            lo = t_start * per_row // n_k_tiles
            hi = (t_stop * per_row + n_k_tiles - 1) // n_k_tiles
            for n0 in sorted({0, block_n, (n_rows - 1) // block_n * block_n}):
                last = min(n0 + block_n, n_rows) - 1
                addrs = {min(lo + c, hi - 1) * n_rows + min(n0 + i * line, last)
                         for c in range(cols) for i in range(run_lines)}
                touched = {a // line for a in addrs}
                needed = {(e * n_rows + n) // line for e in range(lo, hi) for n in range(n0, last + 1)}
                assert needed <= touched, (tiles_per_split, t_start, n0, cols)


def test_prefetch_off_without_cuda():
    from kernels.qmatmul_prefetch import prefetch_lines

    q = torch.zeros(4, 8, dtype=torch.uint8)
    assert prefetch_lines([q] * 5 + [8, 0, 0, 0, 0], 1, 2) == (0, 0)


_CHAIN_TYPES = [QT.Q4_0, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0]


@pytest.mark.parametrize("qtype", _CHAIN_TYPES, ids=_names(_CHAIN_TYPES))
@gpu
def test_prefetch_and_pdl_change_no_bit_gpu(qtype):
    """A chain of GEMVs, each reading the previous one's output, in one CUDA graph: launched as
    programmatic dependents that prefetch their slices, they give the bits of plain launches
    (1 and 16 rows; small and split-K shapes)."""
    shapes = [(1536, 1536), (8960, 1536), (1536, 8960), (256, 1536)]  # (N, K): each K is the N before
    # block scales that give weights of RMS ~0.02, so the outputs stay O(1) through the chain
    max_abs = {QT.Q4_0: 0.01, QT.Q8_0: 6e-4, QT.Q4_K: 2e-4, QT.Q5_K: 1e-4, QT.Q6_K: 4e-5}[qtype]
    weights = [_weight(qtype, n, k, seed=20 + i, max_abs=max_abs)[1] for i, (n, k) in enumerate(shapes)]
    x = _x(16, 1536, torch.float16, seed=5)

    def chain(prefetch: bool, pdl: bool, m: int) -> list[torch.Tensor]:
        outs, h = [], x[:m]
        for w in weights:
            h = qmatmul(h, w, config=dataclasses.replace(w.gemv_config, prefetch=prefetch, pdl=pdl))
            outs.append(h)
        return outs

    for m in (1, 16):
        want = chain(False, False, m)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            chain(True, True, m)  # compile outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = chain(True, True, m)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert torch.isfinite(b).all() and b.abs().max() > 1e-2, f"{qtype.name} M={m} GEMV {i} scale"
            assert torch.equal(a, b), f"{qtype.name} M={m} GEMV {i}"


@pytest.mark.parametrize("shape", [(17920, 1536), (1536, 8960)], ids=["gate-up", "down"])
@gpu
def test_four_bytes_a_ptx_call_changes_no_bit_gpu(monkeypatch, shape):
    """Q4_K's fast path with two or four quant bytes a PTX call (qmatmul._ptx_pack): the same values,
    so the same bits, in the engine's 2-warp launches (gate/up, down: four a call by the rule)."""
    _, w, want_w = _weight(QT.Q4_K, *shape, seed=14, max_abs=0.01)
    assert w.prescaled and w.gemv_config.num_warps == 2, "not a launch that takes four bytes a call"
    x = _x(16, shape[1], torch.float16, seed=15)
    outs = {}
    for two_bytes in ("1", "0"):
        monkeypatch.setenv("TANDEM_GEMV_TWO_BYTE_PTX", two_bytes)
        outs[two_bytes] = [qmatmul(x[:m], w) for m in (1, 5, 16)]
    assert_close_rms(f"Q4_K {shape} by the rule", outs["0"][2], _oracle(x, want_w, None), TOL[torch.float16])
    for a, b in zip(outs["1"], outs["0"], strict=True):
        assert torch.equal(a, b), f"Q4_K {shape} rows {a.shape[0]}"


_ENGINE_GEMVS = [(QT.Q4_K, (1792, 1536)), (QT.Q4_K, (17920, 1536)), (QT.Q4_K, (1536, 8960)),
                 (QT.Q4_K, (256, 1536)), (QT.Q6_K, (1536, 8960)), (QT.Q6_K, (256, 1536)),
                 (QT.Q6_K, (151936, 1536)), (QT.Q5_K, (1536, 1536))]


@pytest.mark.parametrize("qtype,shape", _ENGINE_GEMVS, ids=[f"{q.name}-{n}x{k}" for q, (n, k) in
                                                             _ENGINE_GEMVS])
@gpu
def test_vector_metadata_changes_no_bit_gpu(qtype, shape):
    """The engine's GEMV launches (prefetch and PDL as configured) and GEMM give the same bits from the
    vector-metadata layout (Q4_K: with and without its precomputed scales) as from the plain one: fp16
    (inline PTX) and bf16 (float32 path)."""
    raw = random_blocks(qtype, shape, np.random.default_rng(12), max_abs=0.01)
    plain = QuantizedWeight.from_bytes(raw, qtype, shape, DEVICE, vector_meta=False)
    vector = QuantizedWeight.from_bytes(raw, qtype, shape, DEVICE, vector_meta=True, q4k_scales=True)
    assert vector.vector_meta and vector.prescaled == (qtype == QT.Q4_K)
    layouts = [vector]
    if qtype == QT.Q4_K:  # and the vector layout without the precomputed scales
        layouts.append(QuantizedWeight.from_bytes(raw, qtype, shape, DEVICE, vector_meta=True,
                                                  q4k_scales=False))
    for dtype in (torch.float16, torch.bfloat16):
        x = _x(300, shape[1], dtype, seed=13)
        for rows in (1, 16, 300):
            if rows == 300 and shape[0] > 20000:
                continue  # the GEMM of an LM head: slow and the same code as the other GEMMs
            want = qmatmul(x[:rows], plain)
            assert torch.isfinite(want).all()
            for w in layouts:
                got = qmatmul(x[:rows], w)
                assert torch.equal(got, want), f"{qtype.name} {shape} {dtype} M={rows} {w.prescaled=}"
