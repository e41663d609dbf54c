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
from kernels.qmatmul_layouts import split_fields, to_gguf_bytes
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
