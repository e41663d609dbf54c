"""Repack GGML block formats into the operands of torch's CPU int4 matmul, without loss.

`torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_zeros)` computes
`x @ w.T` with `w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]`, `q` in 0..15 and
`g = k // 32` (measured: the other readings of the op, `q * s + z` etc., miss by ~90%).

Every GGML format below is rewritten in that form with *integer* codes and float32
scale/zero pairs that equal the GGUF values exactly (fp16 scale x a small integer fits a
float32 significand), so in float32 the op computes the GGUF weights up to float32 rounding
of `8 * s + z` and of the dot product. Formats with more than 4 bits per weight are split in
two int4 planes: the layer's input is widened to K' = 2K columns and each weight gets a low
and a high code.

- Q4_0  `d*(q-8)`:            one plane, scale d, zero 0.
- Q4_1  `d*q + m`:            one plane, scale d, zero m + 8d.
- Q4_K  `d*sc*q - dmin*mn`:   one plane per 32-element sub-block, scale d*sc, zero 8*d*sc - dmin*mn.
- Q8_0  `d*q`, q = u - 128:   per 32-block a low group (u & 15, scale d, zero 8d) and a high
                              group (u >> 4, scale 16d, zero 0); input columns repeated twice.
- Q5_0  `d*(q-16)`:           low group (scale d, zero -8d), high group (bit + 8, scale 16d, zero 0).
- Q5_1  `d*q + m`:            low group (scale d, zero 8d + m), high group as Q5_0.
- Q6_K  `d*sc*(q-32)`, one int8 scale per 16 elements: a 32-group holds the 16 low nibbles and
        the 16 high 2-bit parts of one sub-block, both with scale d*sc and zero 0; the high
        code is 2*h + 5 and its input columns are multiplied by 8 (a power of two: exact), since
        (lo - 8) + 8 * (2h + 5 - 8) = lo + 16h - 32.

Only the int4 *storage* is lossless by itself; the op's float32 path is a scalar loop (slow),
its bfloat16 path is vectorized but rounds scales, inputs and outputs to bfloat16.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from engine.quants import BLOCK_TABLE, byte_tensor

logger = logging.getLogger(__name__)

GROUP_SIZE = 32  # the op's qGroupSize: the smallest it accepts, and the GGML block size


@dataclass(frozen=True)
class Int4Planes:
    """A weight rewritten for the int4 op, before packing: w' = (codes - 8) * scale + zero per group."""

    codes: torch.Tensor  # (N, K') uint8 in 0..15
    scales: torch.Tensor  # (N, K' / 32) float32
    zeros: torch.Tensor  # (N, K' / 32) float32
    split_width: int  # 0: K' = K; else each `split_width`-wide input slice is repeated (K' = 2K)
    high_multiplier: float  # factor on the repeated input slice (1.0, or 8.0 for Q6_K)


Planes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # codes (n, c), scales (n, g), zeros (n, g)


def _f16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at `offset` of every block as float32: (n, 1)."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).to(torch.float32)  # (n, 1)


_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F  # per-byte masks on int64 words: 8 codes per operation
_LOW_2BITS = 0x0303030303030303
_BYTES_5 = 0x0505050505050505


def _words(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., L), L a multiple of 8 -> a contiguous int64 (..., L / 8) view of the same bytes."""
    return packed.contiguous().view(torch.int64)


def _nibbles(qs: torch.Tensor, dim: int) -> torch.Tensor:
    """Packed bytes -> their low nibbles, then their high nibbles, along `dim` (uint8)."""
    w = _words(qs)
    # Per byte: the arithmetic shift's sign bits only reach the top byte's high nibble, masked off.
    return torch.cat([w & _LOW_NIBBLES, (w >> 4) & _LOW_NIBBLES], dim=dim).view(torch.uint8)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) little-endian bytes -> (n, 32) bits, bit i of the 32-bit integer at position i."""
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8)
    return ((qh.unsqueeze(2) >> shifts) & 1).reshape(qh.shape[0], 32)  # (n, 32)


def _q4_0(blocks: torch.Tensor) -> Planes:
    d = _f16_field(blocks, 0)  # (n, 1)
    return _nibbles(blocks[:, 2:18], 1), d, torch.zeros_like(d)  # (n, 32), (n, 1), (n, 1)


def _q4_1(blocks: torch.Tensor) -> Planes:
    d, m = _f16_field(blocks, 0), _f16_field(blocks, 2)  # (n, 1) each
    return _nibbles(blocks[:, 4:20], 1), d, m + 8.0 * d


def _q4_k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, dmin = _f16_field(blocks, 0), _f16_field(blocks, 2)  # (n, 1) each
    packed = blocks[:, 4:16]  # (n, 12): 6-bit scales and mins of the 8 sub-blocks
    sd, sm, smd = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = torch.cat([sd & 0x3F, (smd & 0x0F) | ((sd >> 2) & 0x30)], dim=1).to(torch.float32)  # (n, 8)
    mn = torch.cat([sm & 0x3F, (smd >> 4) | ((sm >> 2) & 0x30)], dim=1).to(torch.float32)  # (n, 8)
    scale = d * sc  # (n, 8) exact: 11-bit x 6-bit significands
    return scale, 8.0 * scale - dmin * mn


def _q4_k(blocks: torch.Tensor) -> Planes:
    n = blocks.shape[0]
    # 32 bytes per 64 elements: low nibbles are sub-block 2j, high nibbles sub-block 2j + 1.
    codes = _nibbles(blocks[:, 16:144].reshape(n, 4, 1, 32), 2).reshape(n, 256)  # (n, 256)
    return (codes, *_q4_k_scales(blocks))


def _high_groups(d: torch.Tensor, low_zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros of (low group, high group) pairs: the high group weighs 16x, no zero."""
    return torch.cat([d, 16.0 * d], dim=1), torch.cat([low_zero, torch.zeros_like(d)], dim=1)  # (n, 2) each


def _q8_0(blocks: torch.Tensor) -> Planes:
    d = _f16_field(blocks, 0)  # (n, 1)
    u = blocks[:, 2:34] ^ 0x80  # (n, 32): q + 128 as unsigned
    return (_nibbles(u, 1), *_high_groups(d, 8.0 * d))  # codes (n, 64): low group, then high group


def _q5_codes(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Low group: the 4 low bits; high group: the fifth bit + 8 -> (n, 64)."""
    return torch.cat([_nibbles(qs, 1), _bits32(qh) + 8], dim=1)  # (n, 64)


def _q5_0(blocks: torch.Tensor) -> Planes:
    d = _f16_field(blocks, 0)  # (n, 1)
    return (_q5_codes(blocks[:, 2:6], blocks[:, 6:22]), *_high_groups(d, -8.0 * d))


def _q5_1(blocks: torch.Tensor) -> Planes:
    d, m = _f16_field(blocks, 0), _f16_field(blocks, 2)  # (n, 1) each
    return (_q5_codes(blocks[:, 4:8], blocks[:, 8:24]), *_high_groups(d, 8.0 * d + m))


_Q6_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.int64).reshape(1, 1, 4, 1)


def _q6_k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sc = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)  # (n, 16)
    scale = _f16_field(blocks, 208) * sc  # (n, 16) exact: 11-bit x 8-bit significands
    return scale, torch.zeros_like(scale)


def _q6_k(blocks: torch.Tensor) -> Planes:
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n, 2, 2, 32)  # (n, half, a, l)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)  # (n, half, 1, l)
    # Element 128*half + 32*c + l: nibble c // 2 of ql[half, c % 2, l], bits 2c, 2c+1 of qh[half, l].
    lo = _words(_nibbles(ql, 2).reshape(n, 16, 16))  # (n, sub-block, 2 words of 8 codes)
    hi = (_words(qh) >> _Q6_SHIFTS) & _LOW_2BITS  # (n, 2, 4, 4 words): bits 2c, 2c+1 per byte
    hi = hi.reshape(n, 16, 2) * 2 + _BYTES_5  # (n, sub-block, 2 words): 2h + 5 per byte, no carries
    codes = torch.cat([lo, hi], dim=2).view(torch.uint8).reshape(n, 512)  # (n, 16 groups x 32)
    return (codes, *_q6_k_scales(blocks))


# qtype -> (planes of a batch of blocks, split width, high multiplier)
_REPACKERS: dict[QT, tuple[Callable[[torch.Tensor], Planes], int, float]] = {
    QT.Q4_0: (_q4_0, 0, 1.0),
    QT.Q4_1: (_q4_1, 0, 1.0),
    QT.Q4_K: (_q4_k, 0, 1.0),
    QT.Q8_0: (_q8_0, 32, 1.0),
    QT.Q5_0: (_q5_0, 32, 1.0),
    QT.Q5_1: (_q5_1, 32, 1.0),
    QT.Q6_K: (_q6_k, 16, 8.0),
}

INT4_TYPES: frozenset[QT] = frozenset(_REPACKERS)


def _blocks(data: np.ndarray | torch.Tensor, qtype: QT, shape: tuple[int, int]) -> torch.Tensor:
    """Raw bytes -> (N, blocks per row, block_bytes) uint8, checking the type and the size."""
    if qtype not in _REPACKERS:
        supported = ", ".join(t.name for t in INT4_TYPES)
        raise ValueError(f"{qtype.name} has no int4 repacking; supported: {supported}")
    n_rows, n_cols = int(shape[0]), int(shape[1])
    block_elems, block_bytes = BLOCK_TABLE[qtype]
    if n_cols % block_elems != 0:
        raise ValueError(f"{qtype.name} rows must hold a multiple of {block_elems} elements, got {n_cols}")
    raw = byte_tensor(data)
    if raw.numel() != n_rows * n_cols // block_elems * block_bytes:
        raise ValueError(f"{qtype.name} weight of shape {tuple(shape)} does not match {raw.numel()} bytes")
    return raw.reshape(n_rows, n_cols // block_elems, block_bytes)  # (N, B, block_bytes)


def to_int4_planes(data: np.ndarray | torch.Tensor, qtype: QT, shape: tuple[int, int]) -> Int4Planes:
    """Raw GGML bytes of a (N, K) weight -> int4 codes and float32 scale/zero pairs, exactly."""
    blocks = _blocks(data, qtype, shape)  # (N, B, block_bytes)
    fn, split_width, high_multiplier = _REPACKERS[qtype]
    n_rows = blocks.shape[0]
    codes, scales, zeros = fn(blocks.reshape(-1, blocks.shape[2]))
    return Int4Planes(
        codes=codes.reshape(n_rows, -1),  # (N, K')
        scales=scales.reshape(n_rows, -1),  # (N, K' / 32)
        zeros=zeros.reshape(n_rows, -1),  # (N, K' / 32)
        split_width=split_width,
        high_multiplier=high_multiplier,
    )


def widen_input(x: torch.Tensor, split_width: int, high_multiplier: float) -> torch.Tensor:
    """(M, K) -> (M, K'): each `split_width` slice followed by itself times `high_multiplier`."""
    if split_width == 0:
        return x
    m, k = x.shape
    xs = x.reshape(m, k // split_width, split_width)  # (M, K / w, w)
    high = xs * high_multiplier if high_multiplier != 1.0 else xs
    return torch.cat([xs, high], dim=2).reshape(m, 2 * k)  # (M, 2K)


# ---------------------------------------------------------------------------------------------
# Packing into the op's layout.
#
# With AVX512, `_convert_weight_to_int4pack_for_cpu` stores rows in blocks of 64 as (K', 32) bytes:
# byte d of a column pairs rows d and d + 32 (low, high nibble), byte 16 + d rows d + 16 and d + 48.
# Building that from uint8 codes here skips the op's int32 input (4 bytes a code: 1.9 GB for a
# 151936 x 3072 LM head). `packing_matches_torch()` checks the layout against the op once; if it
# differs (another CPU capability, another torch), the op's own converter is used.

PACK_ROWS = 64  # rows per packed block
_CHUNK_ROWS = 2048  # rows repacked at a time: bounds the temporaries (6 MB at K' = 3072)
_packing_checked: bool | None = None


def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """(R, K') uint8 codes, R a multiple of 64 -> (R, K' / 2) uint8 in the op's AVX512 layout."""
    r, k = codes.shape
    lanes = _words(codes).reshape(r // PACK_ROWS, 4, 16, k // 8)  # (R/64, lane, 16, K'/8 words)
    packed = (lanes[:, 0:2] | (lanes[:, 2:4] << 4)).view(torch.uint8)  # (R/64, 2, 16, K'): lanes 0|2, 1|3
    return packed.permute(0, 3, 1, 2).reshape(r, k // 2)  # (R, K'/2) as (R/64, K', 2, 16)


def packing_matches_torch() -> bool:
    """Whether `_pack_rows` reproduces the op's converter on this machine (checked once)."""
    global _packing_checked
    if _packing_checked is None:
        gen = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (2 * PACK_ROWS, 96), dtype=torch.int32, generator=gen)  # (128, 96)
        want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        got = _pack_rows(codes.to(torch.uint8))
        _packing_checked = bool(want.shape == got.shape and torch.equal(want, got))
        if not _packing_checked:
            logger.info("int4 packing: using torch's converter (layout differs on this CPU)")
    return _packing_checked


# Direct packing of the two big K-quant types: the op pairs rows r and r + 32 of each 64-row block in
# one byte (r's code low, r + 32's high), so the packed bytes are computed straight from the GGUF
# bytes of both rows, 8 at a time in int64 words, without materializing one byte per code.
_HIGH_NIBBLES = ~_LOW_NIBBLES  # 0xF0F0F0F0F0F0F0F0 as an int64
_PAIR_BASE_Q6 = 0x5555555555555555  # (2a + 5) | (2b + 5) << 4 = 2a + 32b + 0x55 per byte


def _row_pairs(blocks: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, B, block_bytes) -> words of bytes lo:hi of rows r and r + 32: (R/64, 32, B, W) each."""
    r, b = blocks.shape[0], blocks.shape[1]
    words = _words(blocks[:, :, lo:hi]).reshape(r // PACK_ROWS, 2, PACK_ROWS // 2, b, -1)
    return words[:, 0], words[:, 1]


def _q4_k_paired(blocks: torch.Tensor, dest: torch.Tensor) -> None:
    """(R, B, 144) Q4_K blocks, R a multiple of 64 -> fill dest (R/64, K, 32) in the op's layout."""
    a, b = _row_pairs(blocks, 16, 144)  # (R/64, 32, B, 16 words): rows r and r + 32
    low = (a & _LOW_NIBBLES) | ((b << 4) & _HIGH_NIBBLES)  # sub-blocks 2j
    high = ((a >> 4) & _LOW_NIBBLES) | (b & _HIGH_NIBBLES)  # sub-blocks 2j + 1
    n_pairs, _, n_blocks, _ = a.shape
    # K order per block: (chunk j, nibble, 32 bytes); the transposing copy interleaves the nibbles.
    out = dest.view(n_pairs, n_blocks, 4, 2, 32, PACK_ROWS // 2)  # (R/64, B, j, nibble, l, row)
    for nibble, words in enumerate((low, high)):
        src = words.view(torch.uint8).reshape(n_pairs, PACK_ROWS // 2, n_blocks, 4, 32)  # (.., row, B, j, l)
        out[:, :, :, nibble].copy_(src.permute(0, 2, 3, 4, 1))


def _q6_k_paired(blocks: torch.Tensor, dest: torch.Tensor) -> None:
    """(R, B, 210) Q6_K blocks, R a multiple of 64 -> fill dest (R/64, 2K, 32) in the op's layout."""
    qa, qb = _row_pairs(blocks, 0, 128)  # (R/64, 32, B, 16 words)
    ha, hb = _row_pairs(blocks, 128, 192)  # (R/64, 32, B, 8 words)
    n_pairs, _, n_blocks, _ = qa.shape
    # K' order per block: (half, c, j, plane, 16 codes) for sub-block 8 * half + 2c + j.
    out = dest.view(n_pairs, n_blocks, 2, 4, 2, 2, 16, PACK_ROWS // 2)  # (R/64, B, half, c, j, plane, l, row)

    def put(words: torch.Tensor, c: slice | int, plane: int) -> None:
        src = words.view(torch.uint8).reshape(n_pairs, PACK_ROWS // 2, n_blocks, 2, -1, 2, 16)
        src = src.permute(0, 2, 3, 4, 5, 6, 1)  # (R/64, B, half, c, j, l, row)
        out[:, :, :, c, :, plane].copy_(src if isinstance(c, slice) else src[:, :, :, 0])

    put((qa & _LOW_NIBBLES) | ((qb << 4) & _HIGH_NIBBLES), slice(0, 2), 0)  # c = 0, 1: low nibbles
    put(((qa >> 4) & _LOW_NIBBLES) | (qb & _HIGH_NIBBLES), slice(2, 4), 0)  # c = 2, 3: high nibbles
    for c in range(4):
        high_a = ((ha >> (2 * c)) & _LOW_2BITS) << 1
        high_b = ((hb >> (2 * c)) & _LOW_2BITS) << 5
        put(high_a + high_b + _PAIR_BASE_Q6, c, 1)


_DIRECT_PACKERS: dict[QT, tuple[Callable[[torch.Tensor, torch.Tensor], None], Callable]] = {
    QT.Q4_K: (_q4_k_paired, _q4_k_scales),
    QT.Q6_K: (_q6_k_paired, _q6_k_scales),
}


@dataclass(frozen=True)
class PackedInt4:
    """Operands of `_weight_int4pack_mm_for_cpu` for one weight."""

    packed: torch.Tensor  # (N_pad, K' / 2) uint8 in the op's layout
    scales_zeros: torch.Tensor  # (K' / 32, N_pad, 2) in the compute dtype
    out_features: int  # N; rows past N are zero-weight padding
    split_width: int
    high_multiplier: float


def repack_int4(
    data: np.ndarray | torch.Tensor,
    qtype: QT,
    shape: tuple[int, int],
    compute_dtype: torch.dtype = torch.float32,
    use_direct: bool = True,
) -> PackedInt4:
    """Raw GGML bytes of a (N, K) weight -> the op's operands, `_CHUNK_ROWS` rows at a time.

    `use_direct=False` builds Q4_K/Q6_K through the one-byte-per-code path too (for tests).
    """
    blocks = _blocks(data, qtype, shape)  # (N, B, block_bytes)
    fn, split_width, high_multiplier = _REPACKERS[qtype]
    n_rows, n_cols = int(shape[0]), int(shape[1])
    k_wide = n_cols * (2 if split_width else 1)
    n_pad = -(-n_rows // PACK_ROWS) * PACK_ROWS
    fast = packing_matches_torch()
    packed = torch.empty(n_pad, k_wide // 2, dtype=torch.uint8)  # (N_pad, K'/2)
    scales_zeros = torch.zeros(n_pad, k_wide // GROUP_SIZE, 2, dtype=torch.float32)  # (N_pad, G, 2)
    direct = _DIRECT_PACKERS.get(qtype) if fast and use_direct else None
    for r0 in range(0, n_pad, _CHUNK_ROWS):
        r1 = min(r0 + _CHUNK_ROWS, n_pad)
        real = max(0, min(r1, n_rows) - r0)
        if direct is not None:
            chunk = blocks[r0 : r0 + real]  # (real, B, block_bytes)
            s, z = direct[1](chunk.reshape(-1, blocks.shape[2]))
            scales_zeros[r0 : r0 + real, :, 0] = s.reshape(real, -1)
            scales_zeros[r0 : r0 + real, :, 1] = z.reshape(real, -1)
            if real < r1 - r0:  # padding rows: scale 0 and zero 0 weigh nothing, whatever the codes
                chunk = torch.cat([chunk, torch.zeros(r1 - r0 - real, *blocks.shape[1:], dtype=torch.uint8)])
            direct[0](chunk, packed[r0:r1].view((r1 - r0) // PACK_ROWS, k_wide, PACK_ROWS // 2))
            continue
        codes = torch.empty(0, k_wide, dtype=torch.uint8)  # (R, K')
        if real:
            c, s, z = fn(blocks[r0 : r0 + real].reshape(-1, blocks.shape[2]))
            codes = c.reshape(real, k_wide)
            scales_zeros[r0 : r0 + real, :, 0] = s.reshape(real, -1)
            scales_zeros[r0 : r0 + real, :, 1] = z.reshape(real, -1)
        if real < r1 - r0:  # padding rows: code 8 and scale 0 weigh nothing
            codes = torch.cat([codes, torch.full((r1 - r0 - real, k_wide), 8, dtype=torch.uint8)])
        if fast:
            packed[r0:r1] = _pack_rows(codes)
        else:
            packed[r0:r1] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    sz = scales_zeros.transpose(0, 1).to(compute_dtype).contiguous()  # (G, N_pad, 2)
    return PackedInt4(packed, sz, n_rows, split_width, high_multiplier)


def int4_matmul(x: torch.Tensor, weight: PackedInt4) -> torch.Tensor:
    """(M, K) -> (M, N) in the dtype of `weight.scales_zeros` (the input is cast to it)."""
    xw = widen_input(x, weight.split_width, weight.high_multiplier).to(weight.scales_zeros.dtype)  # (M, K')
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    y = mm(xw.contiguous(), weight.packed, GROUP_SIZE, weight.scales_zeros)  # (M, N_pad)
    return y[:, : weight.out_features]  # (M, N)
