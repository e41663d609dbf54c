"""Triton building blocks shared by the KV-cache kernels: quantize-and-store a tile of rows, load and
dequantize a tile of cached rows, and the in-register Walsh–Hadamard butterfly.

Numerics follow `engine.kv_quant` (itself bit-exact with gguf-py): float32, IEEE division
(`div_rn`), gguf-py's roundf. Launchers of the write kernels pass `enable_fp_fusion=False` so that
`x * id + 8.5` is not contracted into an FMA on the GPU (that would change rounding at ties).

KV type codes (constexpr `KV_TYPE`): 0 f16, 1 bf16, 2 q8_0, 3 q4_0, 4 q4_1 (`engine.kv_quant.KV_TYPES`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from engine.errors import SettingsError
from engine.kv_quant import KVStore, kv_type

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_kernel_head_dim(head_dim: int) -> None:
    if head_dim < 32 or head_dim > 256 or head_dim & (head_dim - 1):
        raise SettingsError(
            f"the Triton KV-cache kernels need a power-of-two head_dim in 32..256, got {head_dim}; "
            "run this model with device=cpu"
        )


def check_positions(
    start_pos: int | None, positions: torch.Tensor | None, n_rows: int, capacity: int
) -> None:
    """A write takes either start_pos (an int) or positions (a (T,) integer tensor), never both."""
    if (start_pos is None) == (positions is None):
        raise ValueError("pass exactly one of start_pos and positions")
    if positions is not None:
        if positions.shape != (n_rows,) or positions.dtype.is_floating_point:
            raise ValueError(f"positions must be a ({n_rows},) integer tensor, got {tuple(positions.shape)}")
    elif start_pos < 0 or start_pos + n_rows > capacity:
        raise ValueError(
            f"rows [{start_pos}, {start_pos + n_rows}) do not fit a store of {capacity} positions"
        )


def store_args(store: KVStore) -> tuple:
    """(qs, d, m, stride_b, stride_h, stride_t, sstride_b, sstride_h, sstride_t, type code) for a launcher.

    Stores are laid out (B, H, T, X) with a contiguous last dim; f16/bf16 pass qs in place of d and m.
    """
    qs = store.qs
    if qs.dim() != 4 or qs.stride(-1) != 1:
        raise ValueError(f"a kernel store must be (B, H, T, X), last dim contiguous; got {tuple(qs.shape)}")
    d = store.d if store.d is not None else qs
    m = store.m if store.m is not None else d
    if store.d is not None and (d.stride(-1) != 1 or (store.m is not None and m.stride() != d.stride())):
        raise ValueError("scale and min tensors of a store must share a contiguous (B, H, T, NB) layout")
    sd = d.stride() if store.d is not None else (0, 0, 0, 0)
    code = kv_type(store.kv_type).code
    return (qs, d, m, qs.stride(0), qs.stride(1), qs.stride(2), sd[0], sd[1], sd[2], code)


@triton.jit
def _fwht_rows(x, ROWS: tl.constexpr, G: tl.constexpr, LOG2_G: tl.constexpr):
    """x: [ROWS, G] fp32 -> x @ H_G, in the same perfect-shuffle order as engine.hadamard.fwht."""
    for _ in tl.static_range(LOG2_G):
        a, b = tl.split(tl.reshape(x, (ROWS, G // 2, 2)))
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (ROWS, G))
    return x


@triton.jit
def _inverse(d):
    """1 / d with IEEE rounding, and 0 where d == 0 (as gguf-py)."""
    one = tl.full(d.shape, 1.0, tl.float32)
    return tl.where(d == 0.0, 0.0, tl.math.div_rn(one, tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _quantize_store_rows(
    x,  # [BLOCK_T, D] fp32
    row_mask,  # [BLOCK_T] bool
    qs_ptr, d_ptr, m_ptr,
    qs_row,  # [BLOCK_T] int64 element offsets of each row in qs
    s_row,  # [BLOCK_T] int64 element offsets of each row in d / m
    BLOCK_T: tl.constexpr, D: tl.constexpr, KV_TYPE: tl.constexpr,
):
    NB: tl.constexpr = D // 32
    cols = tl.arange(0, D)
    if KV_TYPE == 0:
        tl.store(qs_ptr + qs_row[:, None] + cols[None, :], x.to(tl.float16), mask=row_mask[:, None])
    elif KV_TYPE == 1:
        # round to nearest even by hand: the interpreter truncates fp32 -> bf16, the GPU rounds
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        xb16 = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(qs_ptr + qs_row[:, None] + cols[None, :], xb16, mask=row_mask[:, None])
    else:
        xb = tl.reshape(x, (BLOCK_T * NB, 32))  # one row per 32-block
        if KV_TYPE == 2:  # q8_0
            amax = tl.max(tl.abs(xb), axis=1)
            d = tl.math.div_rn(amax, 127.0)
            inv = _inverse(d)
            v = xb * inv[:, None]
            a = tl.abs(v)
            fl = tl.floor(a)
            r = fl + tl.floor(2.0 * (a - fl))  # gguf-py roundf on |v|
            q = tl.where(v < 0.0, -r, r).to(tl.int8)
            q = tl.reshape(q, (BLOCK_T, D))
            tl.store(qs_ptr + qs_row[:, None] + cols[None, :], q, mask=row_mask[:, None])
        else:
            if KV_TYPE == 3:  # q4_0: d = (element of largest |x|) / -8
                idx = tl.argmax(tl.abs(xb), axis=1, tie_break_left=True)
                lane = tl.arange(0, 32)
                mx = tl.sum(tl.where(lane[None, :] == idx[:, None], xb, 0.0), axis=1)
                d = tl.math.div_rn(mx, -8.0)
                inv = _inverse(d)
                qf = tl.floor(xb * inv[:, None] + 8.5)
            else:  # q4_1: d = (max - min) / 15, min kept
                mx = tl.max(xb, axis=1)
                mn = tl.min(xb, axis=1)
                d = tl.math.div_rn(mx - mn, 15.0)
                inv = _inverse(d)
                qf = tl.floor((xb - mn[:, None]) * inv[:, None] + 0.5)
                mcols = tl.arange(0, NB)
                tl.store(m_ptr + s_row[:, None] + mcols[None, :],
                         tl.reshape(mn, (BLOCK_T, NB)).to(tl.float16), mask=row_mask[:, None])
            q = tl.minimum(tl.maximum(qf, 0.0), 15.0).to(tl.uint8)  # [BLOCK_T * NB, 32]
            lo, hi = tl.split(tl.permute(tl.reshape(q, (BLOCK_T * NB, 2, 16)), (0, 2, 1)))
            packed = tl.reshape(lo | (hi << 4), (BLOCK_T, D // 2))
            pcols = tl.arange(0, D // 2)
            tl.store(qs_ptr + qs_row[:, None] + pcols[None, :], packed, mask=row_mask[:, None])
        scols = tl.arange(0, NB)
        tl.store(d_ptr + s_row[:, None] + scols[None, :],
                 tl.reshape(d, (BLOCK_T, NB)).to(tl.float16), mask=row_mask[:, None])


@triton.jit
def _storage_cols(D: tl.constexpr, KV_TYPE: tl.constexpr):
    """Element index (along head_dim) of each column of a tile as `_load_rows` returns it.

    q4 rows come back in storage order (low and high nibble of each byte side by side), which is
    a permutation inside each 32-block; attention is indifferent to the column order as long as Q
    is loaded, and the output stored, through this map.
    """
    c = tl.arange(0, D)
    if KV_TYPE >= 3:
        c = (c // 32) * 32 + (c % 32) // 2 + 16 * (c % 2)
    return c


@triton.jit
def _load_rows(
    qs_ptr, d_ptr, m_ptr,
    qs_row,  # [N] int64 element offsets of each row in qs
    s_row,  # [N] int64 element offsets of each row in d / m
    row_mask,  # [N] bool
    N: tl.constexpr, D: tl.constexpr, KV_TYPE: tl.constexpr,
):
    """Load N cached rows and dequantize them -> [N, D] fp16 in `_storage_cols` order (masked rows 0).

    fp16 because the attention dots take fp16 operands: for f16, q8_0 and q4_0 the fp16 product
    d * q is the fp32 product rounded once, as before; q4_1's d * q + m rounds twice.
    """
    cols = tl.arange(0, D)
    mask = row_mask[:, None]
    if KV_TYPE < 2:
        x = tl.load(qs_ptr + qs_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float16)
    else:
        NB: tl.constexpr = D // 32
        s_off = s_row[:, None] + tl.arange(0, NB)[None, :]
        d = tl.load(d_ptr + s_off, mask=mask, other=0.0)[:, :, None]  # [N, NB, 1] fp16
        if KV_TYPE == 2:
            q = tl.load(qs_ptr + qs_row[:, None] + cols[None, :], mask=mask, other=0).to(tl.float16)
            x = tl.reshape(tl.reshape(q, (N, NB, 32)) * d, (N, D))
        else:
            bcols = tl.arange(0, D // 2)
            byte = tl.load(qs_ptr + qs_row[:, None] + bcols[None, :], mask=mask, other=0)  # [N, D/2]
            nib = tl.reshape(tl.join(byte & 0x0F, byte >> 4), (N, NB, 32))  # the storage-order
            # permutation stays inside each 32-block, so block b is still nib[:, b]
            if KV_TYPE == 3:
                x = tl.reshape((nib.to(tl.int8) - 8).to(tl.float16) * d, (N, D))
            else:
                mn = tl.load(m_ptr + s_off, mask=mask, other=0.0)[:, :, None]  # [N, NB, 1] fp16
                x = tl.reshape(d * nib.to(tl.float16) + mn, (N, D))
    return x


def empty_store_like(store: KVStore) -> KVStore:
    return KVStore(
        store.kv_type,
        torch.zeros_like(store.qs),
        None if store.d is None else torch.zeros_like(store.d),
        None if store.m is None else torch.zeros_like(store.m),
    )
