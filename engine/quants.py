"""GGML block formats and their dequantization in torch, bit-exact with `gguf.quants.dequantize`.

Table-driven in the gguf-py style: `BLOCK_TABLE` gives (elements per block, bytes per block)
for every type Tandem can run, and `_DEQUANT_BLOCKS` maps each type to a function that turns
a (n_blocks, block_bytes) uint8 tensor into (n_blocks, block_elems) float32.

Bit-exactness: in every format the products are exact in float32 (an fp16 scale has an 11-bit
significand, the integer factors have at most 8 + 6 bits) except at most one, and the only other
rounding is the final `+ m` / `- dmin * m`. So each output is the correctly rounded value of an
exact expression: evaluation order, and even an FMA in a fused kernel, give the same bits. The code
below still follows gguf-py's order of operations, so this never has to be argued again.

The functions work on any torch device; GGUF byte views from `engine.gguf_file` live on CPU.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

if TYPE_CHECKING:
    from engine.gguf_file import TensorInfo

logger = logging.getLogger(__name__)

QK_K = 256  # elements per K-quant super-block

# (elements per block, bytes per block) for each type Tandem can run.
BLOCK_TABLE: dict[QT, tuple[int, int]] = {
    QT.F32: (1, 4),
    QT.F16: (1, 2),
    QT.BF16: (1, 2),
    QT.Q4_0: (32, 2 + 16),
    QT.Q4_1: (32, 2 + 2 + 16),
    QT.Q5_0: (32, 2 + 4 + 16),
    QT.Q5_1: (32, 2 + 2 + 4 + 16),
    QT.Q8_0: (32, 2 + 32),
    QT.Q2_K: (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
    QT.Q3_K: (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    QT.Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),
    QT.Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    QT.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
}

# Work on about this many output elements at a time, so a whole 151936 x 1536 table never needs
# several full-size temporaries (4 MiB of float32 per chunk).
_CHUNK_ELEMS = 1 << 20


def supported_type_names() -> str:
    """The supported types as a readable list, for error messages."""
    return ", ".join(t.name for t in BLOCK_TABLE)


def row_nbytes(qtype: QT, n_cols: int) -> int:
    """Bytes of one row of `n_cols` elements; `n_cols` must be a whole number of blocks."""
    block_elems, block_bytes = BLOCK_TABLE[qtype]
    if n_cols % block_elems != 0:
        raise ValueError(f"{qtype.name} rows must hold a multiple of {block_elems} elements, got {n_cols}")
    return n_cols // block_elems * block_bytes


def tensor_nbytes(qtype: QT, shape: Sequence[int]) -> int:
    """Bytes of a tensor of `shape` (torch order: the last dimension is the row)."""
    if len(shape) == 0:
        return row_nbytes(qtype, 1)
    n_rows = 1
    for dim in shape[:-1]:
        n_rows *= int(dim)
    return n_rows * row_nbytes(qtype, int(shape[-1]))


def byte_tensor(data: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 torch view of raw GGUF bytes, zero-copy.

    GGUF views are read-only memory maps: never write into the returned tensor (torch cannot
    mark it read-only; a write would fault). Its warning about this is silenced here once.
    """
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise ValueError(f"expected raw bytes (uint8), got a {data.dtype} tensor")
        return data.reshape(-1)
    arr = np.asarray(data)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected raw bytes (uint8), got a {arr.dtype} array")
    arr = arr.reshape(-1)
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


# ---------------------------------------------------------------------------------------------
# Field helpers: little-endian fields at a byte offset inside every block.


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at `offset` of every block as float32: (n, 1)."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).to(torch.float32)  # (n, 1)


def _shifts(values: Sequence[int], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=like.device).reshape(shape)


def _low_high_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) packed bytes -> (n, 32) values: the low nibbles first, then the high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)  # (n, 32)


def _bits_le(packed: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 8k) bits, bit i of the little-endian integer at position i."""
    n = packed.shape[0]
    bits = (packed.unsqueeze(2) >> _shifts(range(8), (1, 1, 8), packed)) & 1  # (n, k, 8)
    return bits.reshape(n, -1)  # (n, 8k)


def _k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes of packed 6-bit scales and mins -> two (n, 8) uint8 tensors."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]  # (n, 4) each
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=1)  # (n, 8)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=1)  # (n, 8)
    return sc, mn


# ---------------------------------------------------------------------------------------------
# One function per block format: (n, block_bytes) uint8 -> (n, block_elems) float32.


def _dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)  # (n, 1)
    q = _low_high_nibbles(blocks[:, 2:18]).to(torch.float32) - 8.0  # (n, 32)
    return d * q


def _dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)  # (n, 1)
    q = _low_high_nibbles(blocks[:, 4:20]).to(torch.float32)  # (n, 32)
    return d * q + m


def _dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)  # (n, 1)
    high = _bits_le(blocks[:, 2:6]) << 4  # (n, 32)
    q = (_low_high_nibbles(blocks[:, 6:22]) | high).to(torch.float32) - 16.0  # (n, 32)
    return d * q


def _dequant_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)  # (n, 1)
    high = _bits_le(blocks[:, 4:8]) << 4  # (n, 32)
    q = (_low_high_nibbles(blocks[:, 8:24]) | high).to(torch.float32)  # (n, 32)
    return d * q + m


def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)  # (n, 1)
    q = blocks[:, 2:34].contiguous().view(torch.int8).to(torch.float32)  # (n, 32)
    return q * d


def _dequant_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales, qs = blocks[:, 0:16], blocks[:, 16:80]  # (n, 16), (n, 64)
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)  # (n, 1)
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)  # (n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)  # (n, 16, 1)
    # Each 32-byte half holds four 2-bit planes of 32 values.
    q = (qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), qs)) & 3  # (n, 2, 4, 32)
    q = q.reshape(n, 16, 16).to(torch.float32)  # (n, 16, 16)
    return (dl * q - ml).reshape(n, QK_K)


def _dequant_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, 0:32], blocks[:, 32:96], blocks[:, 96:108]  # (n, 32), (n, 64), (n, 12)
    d = _f16(blocks, 108)  # (n, 1)
    # 16 6-bit scales: low 4 bits in bytes 0..7 (low then high nibbles), top 2 bits in bytes 8..11.
    low = torch.cat([scales[:, 0:8] & 0x0F, scales[:, 0:8] >> 4], dim=1)  # (n, 16)
    high = (scales[:, 8:12].unsqueeze(1) >> _shifts([0, 2, 4, 6], (1, 4, 1), scales)) & 3  # (n, 4, 4)
    sc = (low | (high.reshape(n, 16) << 4)).to(torch.float32) - 32.0  # (n, 16)
    dl = (d * sc).reshape(n, 16, 1)  # (n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), qs)) & 3  # (n, 2, 4, 32)
    qh = (hmask.reshape(n, 1, 32) >> _shifts(range(8), (1, 8, 1), hmask)) & 1  # (n, 8, 32)
    # A set hmask bit means "no offset"; a clear one subtracts 4.
    q = ql.reshape(n, 16, 16).to(torch.int16) - ((qh.reshape(n, 16, 16) ^ 1) << 2).to(torch.int16)
    return (dl * q.to(torch.float32)).reshape(n, QK_K)


def _dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # (n, 1)
    sc, mn = _k_scales_mins(blocks[:, 4:16])  # (n, 8)
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)  # (n, 8, 1)
    ml = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)  # (n, 8, 1)
    qs = blocks[:, 16:144].reshape(n, 4, 1, 32)  # 4 chunks of 32 bytes = 64 values each
    q = (qs >> _shifts([0, 4], (1, 1, 2, 1), qs)) & 0x0F  # (n, 4, 2, 32)
    return (dl * q.reshape(n, 8, 32).to(torch.float32) - ml).reshape(n, QK_K)


def _dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # (n, 1)
    sc, mn = _k_scales_mins(blocks[:, 4:16])  # (n, 8)
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)  # (n, 8, 1)
    ml = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)  # (n, 8, 1)
    qh, qs = blocks[:, 16:48], blocks[:, 48:176]  # (n, 32), (n, 128)
    ql = (qs.reshape(n, 4, 1, 32) >> _shifts([0, 4], (1, 1, 2, 1), qs)) & 0x0F  # (n, 4, 2, 32)
    high = (qh.reshape(n, 1, 32) >> _shifts(range(8), (1, 8, 1), qh)) & 1  # (n, 8, 32)
    q = (ql.reshape(n, 8, 32) | (high << 4)).to(torch.float32)  # (n, 8, 32)
    return (dl * q - ml).reshape(n, QK_K)


def _dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql, qh = blocks[:, 0:128], blocks[:, 128:192]  # (n, 128), (n, 64)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)  # (n, 16)
    d = _f16(blocks, 208)  # (n, 1)
    dl = (d * scales).reshape(n, 16, 1)  # (n, 16, 1)
    low = (ql.reshape(n, 2, 1, 64) >> _shifts([0, 4], (1, 1, 2, 1), ql)) & 0x0F  # (n, 2, 2, 64)
    high = (qh.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), qh)) & 3  # (n, 2, 4, 32)
    q = (low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)).to(torch.float32) - 32.0  # (n, 8, 32)
    return (dl * q.reshape(n, 16, 16)).reshape(n, QK_K)


def _dequant_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)  # (n, 1)


def _dequant_f16(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0)


def _dequant_bf16(blocks: torch.Tensor) -> torch.Tensor:
    # bf16 -> fp32 only appends 16 zero bits, so torch's conversion is exact (NaN payloads too).
    return blocks.contiguous().view(torch.bfloat16).to(torch.float32)  # (n, 1)


_DEQUANT_BLOCKS: dict[QT, Callable[[torch.Tensor], torch.Tensor]] = {
    QT.F32: _dequant_f32,
    QT.F16: _dequant_f16,
    QT.BF16: _dequant_bf16,
    QT.Q4_0: _dequant_q4_0,
    QT.Q4_1: _dequant_q4_1,
    QT.Q5_0: _dequant_q5_0,
    QT.Q5_1: _dequant_q5_1,
    QT.Q8_0: _dequant_q8_0,
    QT.Q2_K: _dequant_q2_k,
    QT.Q3_K: _dequant_q3_k,
    QT.Q4_K: _dequant_q4_k,
    QT.Q5_K: _dequant_q5_k,
    QT.Q6_K: _dequant_q6_k,
}
assert _DEQUANT_BLOCKS.keys() == BLOCK_TABLE.keys()


def _dequantize_blocks(blocks: torch.Tensor, qtype: QT) -> torch.Tensor:
    """(n_blocks, block_bytes) uint8 -> (n_blocks * block_elems,) float32, chunked."""
    block_elems, _ = BLOCK_TABLE[qtype]
    n_blocks = blocks.shape[0]
    out = torch.empty(n_blocks * block_elems, dtype=torch.float32, device=blocks.device)  # (N,)
    step = max(1, _CHUNK_ELEMS // block_elems)
    fn = _DEQUANT_BLOCKS[qtype]
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        out[start * block_elems : stop * block_elems] = fn(blocks[start:stop]).reshape(-1)
    return out


def _check_type(qtype: QT) -> QT:
    qtype = QT(qtype)
    if qtype not in BLOCK_TABLE:
        raise ValueError(f"tensor type {qtype.name} is not supported (supported: {supported_type_names()})")
    return qtype


def dequantize(data: np.ndarray | torch.Tensor, qtype: QT, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGML bytes of `qtype` -> a new float32 tensor of `shape` (torch order), on the data's device.

    Bit-exact with `gguf.quants.dequantize`. `data` must hold exactly the tensor's bytes.
    """
    qtype = _check_type(qtype)
    shape = tuple(int(s) for s in shape)
    raw = byte_tensor(data)  # (n_bytes,)
    expected = tensor_nbytes(qtype, shape)
    if raw.numel() != expected:
        raise ValueError(f"{qtype.name} tensor of shape {shape} needs {expected} bytes, got {raw.numel()}")
    _, block_bytes = BLOCK_TABLE[qtype]
    blocks = raw.reshape(-1, block_bytes)  # (n_blocks, block_bytes)
    return _dequantize_blocks(blocks, qtype).reshape(shape)


def dequantize_tensor(info: TensorInfo) -> torch.Tensor:
    """The whole tensor of a GGUF file as float32, in torch order."""
    return dequantize(info.data, info.qtype, info.shape)


def dequantize_rows(info: TensorInfo, rows: torch.Tensor) -> torch.Tensor:
    """Only the given rows of a 2-D tensor as float32: (len(rows), cols), on the device of `rows`.

    For embedding lookups: gathers the rows' bytes first, so a 151936-row table is never
    dequantized whole.
    """
    if len(info.shape) != 2:
        raise ValueError(f"dequantize_rows needs a 2-D tensor, {info.name} has shape {info.shape}")
    qtype = _check_type(info.qtype)
    n_rows, n_cols = info.shape
    idx = torch.as_tensor(rows).reshape(-1)
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"row indices must be integers, got {idx.dtype}")
    device = idx.device
    idx = idx.to("cpu", torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_rows):
        raise IndexError(f"row index out of range for {info.name} with {n_rows} rows")
    table = byte_tensor(info.data).reshape(n_rows, row_nbytes(qtype, n_cols))  # (R, row_bytes)
    picked = table.index_select(0, idx)  # (n, row_bytes), a copy
    _, block_bytes = BLOCK_TABLE[qtype]
    out = _dequantize_blocks(picked.reshape(-1, block_bytes), qtype)  # (n * cols,)
    return out.reshape(idx.numel(), n_cols).to(device)  # (n, cols)
