"""V-cache write: quantize new V rows straight into the cache (V is never rotated or smoothed).

Layouts: v (B, Hkv, T, D) float holds positions [start_pos, start_pos + T); the store is
(B, Hkv, max_positions, X) (engine.kv_quant). Positions as in kernels.k_write: `start_pos` or a
device tensor `positions` (T,) (negative = skip the row), for CUDA-graph replay at any position.
`sink` (B, Hkv, S, D) float16: the attention sinks, as in kernels.k_write (rows at positions < S also
stored there in f16), so a captured step may write sink positions too.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from engine import kv_quant
from engine.kv_quant import KVStore
from kernels.k_write import _load_head_rows, _store_rows_at, write_rows_reference, write_sink_rows_reference
from kernels.kv_blocks import (
    check_kernel_head_dim,
    check_positions,
    sink_args,
    store_args,
)
from kernels.pdl import pdl_launch, wait_for_previous

log = logging.getLogger(__name__)


def v_write_reference(v: torch.Tensor, store: KVStore, start_pos: int | None = None, *,
                      positions: torch.Tensor | None = None, sink: torch.Tensor | None = None) -> None:
    """Plain-torch V write: the oracle of `v_write` and the CPU path."""
    x = v.to(torch.float32)  # (B, Hkv, T, D)
    write_rows_reference(kv_quant.quantize(x, store.kv_type), store, start_pos, positions)
    if sink is not None:
        write_sink_rows_reference(x, sink, start_pos, positions)


@triton.jit
def _v_write_kernel(
    v_ptr, stride_vb, stride_vh, stride_vt,
    qs_ptr, d_ptr, m_ptr, stride_qb, stride_qh, stride_qt, stride_sb, stride_sh, stride_st,
    T, H, start_pos, pos_ptr,
    sink_ptr, stride_nb, stride_nh, n_sink,
    D: tl.constexpr, BLOCK_T: tl.constexpr, KV_TYPE: tl.constexpr, POS_TENSOR: tl.constexpr,
    SINK: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)  # PDL launch: wait for the kernel before (kernels/pdl.py)
    x, t, row_mask, b, h = _load_head_rows(v_ptr, stride_vb, stride_vh, stride_vt, T, H, BLOCK_T, D)
    _store_rows_at(x, t, row_mask, start_pos, pos_ptr, qs_ptr, d_ptr, m_ptr,
                   b.to(tl.int64) * stride_qb + h * stride_qh, b.to(tl.int64) * stride_sb + h * stride_sh,
                   stride_qt, stride_st, sink_ptr, b.to(tl.int64) * stride_nb + h * stride_nh, n_sink,
                   BLOCK_T, D, KV_TYPE, POS_TENSOR, SINK)  # f16 sink copies, quantize, store


def v_write(v: torch.Tensor, store: KVStore, start_pos: int | None = None, *, block_t: int = 16,
            positions: torch.Tensor | None = None, sink: torch.Tensor | None = None) -> None:
    """Write V rows (B, Hkv, T, D) at positions [start_pos, start_pos + T) of a (B, Hkv, P, X) store,
    or at per-row `positions` (T,) (a device tensor; rows < 0 are skipped); rows below S also into
    `sink` (B, Hkv, S, D) float16 when given."""
    b, h, t, dim = v.shape
    check_kernel_head_dim(dim)
    check_positions(start_pos, positions, t, store.qs.shape[2])
    if store.head_dim != dim or store.qs.shape[:2] != (b, h):
        raise ValueError(f"V {tuple(v.shape)} does not fit the store {store.shape}")
    if v.stride(-1) != 1:
        v = v.contiguous()
    if t == 0:
        return
    args = store_args(store)
    grid = (triton.cdiv(t, block_t), b * h)
    _v_write_kernel[grid](
        v, v.stride(0), v.stride(1), v.stride(2), *args[:9], t, h, start_pos or 0,
        v if positions is None else positions,
        *sink_args(sink, store, v), 0 if sink is None else sink.shape[2],
        D=dim, BLOCK_T=block_t, KV_TYPE=args[9], POS_TENSOR=positions is not None, SINK=sink is not None,
        enable_fp_fusion=False, **pdl_launch(v.device),
    )
