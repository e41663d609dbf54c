"""K-cache write: (smooth +) (equalize +) WHT-rotate + quantize new K rows straight into the cache, in one
kernel.

Layouts: k (B, Hkv, T, D) float (any strides, last dim contiguous) holds the K of positions
[start_pos, start_pos + T) after RoPE; the store is (B, Hkv, max_positions, X) (engine.kv_quant).
`mean` (Hkv, D) is the K-smoothing vector subtracted first; `scale` (Hkv, D) the K-equalization
scales (engine/k_equalize.py, powers of two) K is then divided by; `rotation` (engine.hadamard.Rotation)
or None is the WHT switch: pass None for f16/bf16 K and for skip-WHT q4_0 K.
`sink` (B, Hkv, S, D) float16: the attention sinks (engine/kv_cache.py); rows at positions < S are also
stored there, unquantized (rounded to f16), exactly as they went into the quantizer.

Positions: `start_pos` (an int: rows go to [start_pos, start_pos + T)) or `positions`, a (T,) integer
tensor on the device giving each row's position (negative = skip the row). The tensor form never reads
a position on the host, so a captured CUDA graph can replay the write at any position.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from engine import hadamard, kv_quant
from engine.hadamard import Rotation
from engine.kv_quant import KVStore
from kernels.kv_blocks import (
    _fwht_rows,
    _quantize_store_rows,
    check_kernel_head_dim,
    check_positions,
    sink_args,
    store_args,
)
from kernels.pdl import pdl_launch, wait_for_previous

log = logging.getLogger(__name__)


def k_write_reference(
    k: torch.Tensor, store: KVStore, start_pos: int | None = None, *, mean: torch.Tensor | None = None,
    rotation: Rotation | None = None, positions: torch.Tensor | None = None,
    scale: torch.Tensor | None = None, sink: torch.Tensor | None = None,
) -> None:
    """Plain-torch K write: the oracle of `k_write` and the CPU path."""
    x = k.to(torch.float32)  # (B, Hkv, T, D)
    if mean is not None:
        x = x - mean.to(torch.float32)[None, :, None, :]  # (B, Hkv, T, D)
    if scale is not None:
        x = x / scale.to(torch.float32)[None, :, None, :]  # exact: powers of two
    if rotation is not None:
        x = hadamard.rotate(x, rotation)  # (B, Hkv, T, D)
    write_rows_reference(kv_quant.quantize(x, store.kv_type), store, start_pos, positions)
    if sink is not None:
        write_sink_rows_reference(x, sink, start_pos, positions)


def write_sink_rows_reference(x: torch.Tensor, sink: torch.Tensor, start_pos: int | None,
                              positions: torch.Tensor | None) -> None:
    """Copy rows x (B, H, T, D) whose position is below S into the f16 sink buffer (B, H, S, D)."""
    pos = range(start_pos, start_pos + x.shape[2]) if positions is None else positions.tolist()
    for t, p in enumerate(pos):
        if 0 <= p < sink.shape[2]:
            sink[:, :, p] = x[:, :, t].to(torch.float16)


def write_rows_reference(rows: KVStore, store: KVStore, start_pos: int | None,
                         positions: torch.Tensor | None) -> None:
    """Copy encoded rows (B, H, T, X) to [start_pos, start_pos + T) or to per-row `positions` (< 0: skip)."""
    if positions is None:
        store.narrow(2, start_pos, rows.qs.shape[2]).copy_(rows)
        return
    for t, p in enumerate(positions.tolist()):
        if p >= 0:
            store.narrow(2, p, 1).copy_(rows.narrow(2, t, 1))


@triton.jit
def _k_prepare_rows(
    x,  # [BLOCK_T, D] fp32 K rows of one KV head, after RoPE
    mean_row, scale_row,  # pointers to that head's (D,) smoothing mean / K-equalization scales
    s1_ptr, s2_ptr, rot_scale,
    BLOCK_T: tl.constexpr, D: tl.constexpr, SMOOTH: tl.constexpr, EQUALIZE: tl.constexpr,
    ROTATE: tl.constexpr, G: tl.constexpr, LOG2_G: tl.constexpr,
):
    """K rows -> what the quantizer takes: smoothed, equalized, WHT-rotated ([BLOCK_T, D] fp32)."""
    cols = tl.arange(0, D)
    if SMOOTH:
        x = x - tl.load(mean_row + cols)[None, :].to(tl.float32)
    if EQUALIZE:  # powers of two: the division is exact
        x = tl.math.div_rn(x, tl.broadcast_to(tl.load(scale_row + cols)[None, :], x.shape))
    if ROTATE:
        gl = tl.arange(0, G)
        xg = tl.reshape(x, (BLOCK_T * (D // G), G)) * tl.load(s1_ptr + gl)[None, :]
        xg = _fwht_rows(xg, BLOCK_T * (D // G), G, LOG2_G)
        xg = xg * tl.load(s2_ptr + gl)[None, :]
        x = tl.reshape(xg * rot_scale, (BLOCK_T, D))
    return x


@triton.jit
def _store_rows_at(
    x,  # [BLOCK_T, D] fp32 rows of one head
    t,  # [BLOCK_T] row indices of the write
    row_mask,  # [BLOCK_T] bool
    start_pos, pos_ptr,
    qs_ptr, d_ptr, m_ptr,
    qs_head, s_head,  # int64 element offsets of the head's (P, X) slab in qs and in d / m
    stride_qt, stride_st,
    sink_ptr, sink_head, n_sink,  # sink_head: int64 element offset of the head's (S, D) sink slab
    BLOCK_T: tl.constexpr, D: tl.constexpr, KV_TYPE: tl.constexpr, POS_TENSOR: tl.constexpr,
    SINK: tl.constexpr,
):
    """Rows to their positions (start_pos + t, or pos_ptr[t] with negative rows skipped): the f16 sink
    copy of rows below n_sink, then quantize and store (kernels.k_write and kernels.v_write alike)."""
    cols = tl.arange(0, D)
    if POS_TENSOR:
        pos = tl.load(pos_ptr + t, mask=row_mask, other=-1).to(tl.int64)
        row_mask = row_mask & (pos >= 0)
    else:
        pos = (start_pos + t).to(tl.int64)
    qs_row = qs_head + pos * stride_qt
    s_row = s_head + pos * stride_st
    if SINK:  # attention sinks: rows below n_sink also in f16, as they go into the quantizer
        n_row = sink_head + pos * D
        tl.store(sink_ptr + n_row[:, None] + cols[None, :], x.to(tl.float16),
                 mask=(row_mask & (pos < n_sink))[:, None])
    _quantize_store_rows(x, row_mask, qs_ptr, d_ptr, m_ptr, qs_row, s_row, BLOCK_T, D, KV_TYPE)


@triton.jit
def _load_head_rows(src_ptr, stride_b, stride_h, stride_t, T, H, BLOCK_T: tl.constexpr, D: tl.constexpr):
    """This program's block of rows of one (sequence, head) of a (B, H, T, D) input: (x [BLOCK_T, D] fp32,
    t [BLOCK_T] row indices, row_mask, b, h) for grid (row blocks, B * H) (k_write and v_write alike)."""
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = t < T
    row = b.to(tl.int64) * stride_b + h * stride_h + t.to(tl.int64) * stride_t  # [BLOCK_T]
    x = tl.load(src_ptr + row[:, None] + tl.arange(0, D)[None, :], mask=row_mask[:, None], other=0.0)
    return x.to(tl.float32), t, row_mask, b, h


@triton.jit
def _k_write_kernel(
    k_ptr, stride_kb, stride_kh, stride_kt,
    mean_ptr, stride_mh, scale_ptr, stride_eh,
    s1_ptr, s2_ptr, rot_scale,
    qs_ptr, d_ptr, m_ptr, stride_qb, stride_qh, stride_qt, stride_sb, stride_sh, stride_st,
    T, H, start_pos, pos_ptr,
    sink_ptr, stride_nb, stride_nh, n_sink,
    D: tl.constexpr, BLOCK_T: tl.constexpr, KV_TYPE: tl.constexpr,
    SMOOTH: tl.constexpr, EQUALIZE: tl.constexpr, ROTATE: tl.constexpr, G: tl.constexpr,
    LOG2_G: tl.constexpr, POS_TENSOR: tl.constexpr, SINK: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)  # PDL launch: wait for the kernel before (kernels/pdl.py)
    x, t, row_mask, b, h = _load_head_rows(k_ptr, stride_kb, stride_kh, stride_kt, T, H, BLOCK_T, D)
    x = _k_prepare_rows(x, mean_ptr + h * stride_mh, scale_ptr + h * stride_eh, s1_ptr, s2_ptr,
                        rot_scale, BLOCK_T, D, SMOOTH, EQUALIZE, ROTATE, G, LOG2_G)  # [BLOCK_T, D]
    _store_rows_at(x, t, row_mask, start_pos, pos_ptr, qs_ptr, d_ptr, m_ptr,
                   b.to(tl.int64) * stride_qb + h * stride_qh, b.to(tl.int64) * stride_sb + h * stride_sh,
                   stride_qt, stride_st, sink_ptr, b.to(tl.int64) * stride_nb + h * stride_nh, n_sink,
                   BLOCK_T, D, KV_TYPE, POS_TENSOR, SINK)


def k_write(
    k: torch.Tensor, store: KVStore, start_pos: int | None = None, *, mean: torch.Tensor | None = None,
    rotation: Rotation | None = None, block_t: int = 16, positions: torch.Tensor | None = None,
    scale: torch.Tensor | None = None, sink: torch.Tensor | None = None,
) -> None:
    """Write K rows (B, Hkv, T, D) at positions [start_pos, start_pos + T) of a (B, Hkv, P, X) store,
    or at per-row `positions` (T,) (a device tensor; rows < 0 are skipped; positions are not checked
    against the store's length on the host: the caller keeps them in range).

    scale: (Hkv, D) float32 K-equalization scales (powers of two) or None; sink: (B, Hkv, S, D) float16
    with contiguous (S, D) slabs, or None (see the module docstring)."""
    b, h, t, dim = k.shape
    check_kernel_head_dim(dim)
    check_positions(start_pos, positions, t, store.qs.shape[2])
    if store.head_dim != dim or store.qs.shape[:2] != (b, h):
        raise ValueError(f"K {tuple(k.shape)} does not fit the store {store.shape}")
    if k.stride(-1) != 1:
        k = k.contiguous()
    if rotation is not None and rotation.head_dim != dim:
        raise ValueError(f"rotation for head_dim {rotation.head_dim} used on head_dim {dim}")
    if t == 0:
        return
    dummy = k  # stands in for pointers the constexpr switches leave unread (no allocation: graph-friendly)
    mean_t = dummy if mean is None else mean.to(device=k.device, dtype=torch.float32).contiguous()  # (Hkv, D)
    scale_t = dummy if scale is None else scale.to(device=k.device, dtype=torch.float32).contiguous()
    sinks = sink_args(sink, store, dummy)  # (sink, stride_b, stride_h), checked against the store
    rot = rotation
    if rot is not None and rot.s1.device != k.device:
        rot = rot.to(k.device)  # a host-to-device copy per call: keep the engine's Rotation on the device
    group = rot.group if rot is not None else 32
    grid = (triton.cdiv(t, block_t), b * h)
    _k_write_kernel[grid](
        k, k.stride(0), k.stride(1), k.stride(2),
        mean_t, 0 if mean is None else mean_t.stride(0), scale_t, 0 if scale is None else scale_t.stride(0),
        dummy if rot is None else rot.s1, dummy if rot is None else rot.s2,
        1.0 if rot is None else rot.scale,
        *store_args(store)[:9],
        t, h, start_pos or 0, dummy if positions is None else positions,
        *sinks, 0 if sink is None else sink.shape[2],
        D=dim, BLOCK_T=block_t, KV_TYPE=store_args(store)[9],
        SMOOTH=mean is not None, EQUALIZE=scale is not None, ROTATE=rot is not None, G=group,
        LOG2_G=group.bit_length() - 1, POS_TENSOR=positions is not None, SINK=sink is not None,
        enable_fp_fusion=False, **pdl_launch(k.device),
    )
