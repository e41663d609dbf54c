"""RoPE, the K/V cache write and decode attention of one row in one launch, while the context fits one
attention split (the engine's short 1-row step graph, engine/cuda_graphs.py).

A decode step ran, per layer, `rope_kv_write` (one program per Q, K and V head) and then
`decode_attention` (one program per KV head and split). When one split holds the whole context and the
cache keeps its K and V unquantized, one program per KV head can do both: RoPE of its GQA query heads
(stored to q_out, float32, as rope_kv_write stores them), RoPE of its K head and the K and V rows written
at the row's position, a CTA barrier, then the attention of `decode_attention`'s direct path over
[0, position + 1), reading the rows it just wrote from the cache. One launch and one kernel boundary a
layer fewer.

Bits: the RoPE and the writes are rope_kv_write's @triton.jit helpers with its compile option (no FMA
contraction); the attention is `decode_attention.attend_range` + `store_normalized` with the split size
and tile size of the cache, so a row equals rope_kv_write + decode_attention at its length, and so the
verify rows of the same position (tested on the GPU through the engine's step graphs).

Applies (`applies`) only without what would need more: a head norm (its sum's order depends on the warp
layout), K rotation / smoothing / equalization (quantized K types), attention sinks, quantized V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kv_quant import KVStore, kv_type
from kernels.decode_attention import (
    LOG2E,
    attend_range,
    check_attention_args,
    check_out,
    launch_config,
    store_normalized,
)
from kernels.k_write import _store_rows_at
from kernels.kv_blocks import store_args
from kernels.layer_ops import _rope_head, _rope_one_head
from kernels.pdl import pdl_launch, wait_for_previous
from kernels.rope_kv_write import _head_rows, _split_args, rope_kv_write_reference
from kernels.split_output import SplitOutput, dtype_constexpr, load_input


def applies(k_store: KVStore, v_store: KVStore, rows: int, max_length: int, split_size: int,
            head_norm: bool, rotated: bool, smoothed: bool, equalized: bool, sinks: bool) -> bool:
    """Whether `rope_write_attend` takes this step (else rope_kv_write, then decode_attention)."""
    unquantized = not kv_type(k_store.kv_type).quantized and not kv_type(v_store.kv_type).quantized
    return (rows == 1 and max_length <= split_size and unquantized
            and not (head_norm or rotated or smoothed or equalized or sinks))


def rope_write_attend_reference(
    q, k, v, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_store: KVStore,
    v_store: KVStore, *, neox: bool, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_kv_write_reference, then attention of the row over [0, position + 1) -> (q_out (1, Hq, D)
    float32, out (1, Hq, D) float32)."""
    from kernels.decode_attention import decode_attention_reference

    q_out = rope_kv_write_reference(q, k, v, positions, cos, sin, k_store, v_store, neox=neox)
    length = int(positions[0]) + 1
    return q_out, decode_attention_reference(q_out, k_store, v_store, length, scale=scale)


@triton.jit
def _rope_write_attend_kernel(
    q_ptr, stride_qt, k_ptr, stride_kt, v_ptr, stride_vt, qo_ptr,
    q_split_stride, q_bias_ptr, k_split_stride, k_bias_ptr, v_split_stride, v_bias_ptr,
    pos_ptr, cos_ptr, sin_ptr, stride_cs,
    kq_ptr, kd_ptr, km_ptr, stride_kh, stride_kt_store, stride_ksh,
    vq_ptr, vd_ptr, vm_ptr, stride_vh, stride_vt_store, stride_vsh,
    out_ptr, stride_oh, qk_scale, window,
    D: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr, GQA: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, K_TYPE: tl.constexpr, V_TYPE: tl.constexpr, FAST: tl.constexpr,
    Q_SPLITS: tl.constexpr, Q_BIAS: tl.constexpr, K_SPLITS: tl.constexpr, K_BIAS: tl.constexpr,
    V_SPLITS: tl.constexpr, V_BIAS: tl.constexpr, IN_DTYPE: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)
    hkv = tl.program_id(0)
    raw = tl.load(pos_ptr)  # the row's position (-1: a padding row, RoPE at 0 and nothing written)
    pos = tl.maximum(raw, 0).to(tl.int64)
    cos_row = cos_ptr + pos * stride_cs
    sin_row = sin_ptr + pos * stride_cs
    for j in tl.static_range(GQA):  # rope_kv_write's Q programs of this KV head's query heads
        h = hkv * GQA + j
        _rope_one_head(q_ptr + h * D, qo_ptr + h * D, qo_ptr, cos_row, sin_row, qo_ptr, qo_ptr, qo_ptr, 1.0,
                       0.0, D, HALF, NEOX, False, False, False, 32, 5, q_split_stride, q_bias_ptr + h * D,
                       Q_SPLITS, Q_BIAS, IN_DTYPE)
    rows = tl.arange(0, 1)  # [1] row 0, as rope_kv_write's K and V programs index it
    row_mask = rows < 1
    y = _rope_head(k_ptr + hkv * D, qo_ptr, cos_row, sin_row, qo_ptr, qo_ptr, qo_ptr, 1.0, 0.0, D, HALF,
                   NEOX, False, False, False, 32, 5, k_split_stride, k_bias_ptr + hkv * D, K_SPLITS, K_BIAS,
                   IN_DTYPE)  # [D] fp32
    _store_rows_at(y[None, :], rows, row_mask, 0, pos_ptr, kq_ptr, kd_ptr, km_ptr,
                   hkv.to(tl.int64) * stride_kh, hkv.to(tl.int64) * stride_ksh, stride_kt_store, 0,
                   qo_ptr, 0, 0, 1, D, K_TYPE, True, False)
    cols = tl.arange(0, D)
    x = load_input(v_ptr, hkv * D + cols, cols < D, v_split_stride, v_bias_ptr + hkv * D, cols, V_SPLITS,
                   V_BIAS, IN_DTYPE).to(tl.float32)  # [D]
    _store_rows_at(x[None, :], rows, row_mask, 0, pos_ptr, vq_ptr, vd_ptr, vm_ptr,
                   hkv.to(tl.int64) * stride_vh, hkv.to(tl.int64) * stride_vsh, stride_vt_store, 0,
                   qo_ptr, 0, 0, 1, D, V_TYPE, True, False)
    tl.debug_barrier()  # q_out and the cache rows written above, seen by every thread of the program
    length = (raw + 1).to(tl.int32)  # as decode_attention's lengths
    lo = 0
    if window > 0:
        lo = tl.maximum(length - window, 0)
    heads = hkv * GQA + tl.arange(0, BLOCK_H)
    hmask = tl.arange(0, BLOCK_H) < GQA
    m_i, l_acc, acc_lo, acc_hi = attend_range(
        qo_ptr + heads[:, None] * D, hmask, qk_scale, kq_ptr + hkv * stride_kh, kd_ptr + hkv * stride_ksh,
        km_ptr + hkv * stride_ksh, vq_ptr + hkv * stride_vh, vd_ptr + hkv * stride_vsh,
        vm_ptr + hkv * stride_vsh, lo, length, D, BLOCK_H, BLOCK_N, K_TYPE, V_TYPE, FAST)
    store_normalized(acc_lo, acc_hi, l_acc, out_ptr + heads[:, None] * stride_oh, hmask, D)


def rope_write_attend(
    q: torch.Tensor | SplitOutput, k: torch.Tensor | SplitOutput, v: torch.Tensor | SplitOutput,
    positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_store: KVStore, v_store: KVStore, *,
    neox: bool, scale: float, window: int | None, split_size: int, block_n: int, out: torch.Tensor,
) -> torch.Tensor:
    """rope_kv_write (no head norm, no K rotation / smoothing / equalization, no sinks) and decode attention
    of the row over [0, positions[0] + 1) in one launch (see the module docstring); the context must fit
    one split of `split_size` (the caller's graph bound). q: (1, Hq, D) / k, v: (1, Hkv, D) as rope_kv_write
    takes them (tensors with contiguous heads or SplitOutputs); stores (1, Hkv, P, D) f16/bf16; out
    (1, Hq, D) receives the attention output (as decode_attention's out). Returns out."""
    dim = k_store.head_dim
    (t, hq), q_args = _head_rows(q, dim, "q")
    (_, hkv), k_args = _head_rows(k, dim, "k")
    _, v_args = _head_rows(v, dim, "v")
    if t != 1 or positions.shape != (1,) or hq % hkv:
        raise ValueError("rope_write_attend takes one row and a (1,) position")
    if kv_type(k_store.kv_type).quantized or kv_type(v_store.kv_type).quantized:
        raise ValueError("rope_write_attend writes unquantized K and V only")
    half = cos.shape[1]
    if cos.stride(1) != 1 or sin.stride() != cos.stride() or 2 * half > dim:
        raise ValueError("cos/sin tables must be contiguous (P, rope_dim / 2) with rope_dim <= head_dim")
    q_out = torch.empty(1, hq, dim, dtype=torch.float32, device=out.device)  # (1, Hq, D) RoPE'd queries
    check_attention_args(q_out, k_store, v_store, split_size)
    out = check_out(out, q_out)
    kq, kd, km, _, kh, kt, _, ksh, _, k_code = store_args(k_store)
    vq, vd, vm, _, vh, vt, _, vsh, _, v_code = store_args(v_store)
    tile_bytes = block_n * dim * (k_store.qs.element_size() + v_store.qs.element_size())
    num_warps, num_stages = launch_config(split_size, block_n, tile_bytes)
    split_inputs = [x for x in (q, k, v) if isinstance(x, SplitOutput)]
    _rope_write_attend_kernel[(hkv,)](
        q_args[0], q_args[1], k_args[0], k_args[1], v_args[0], v_args[1], q_out,
        *_split_args(q_args, cos), *_split_args(k_args, cos), *_split_args(v_args, cos),
        positions, cos, sin, cos.stride(0),
        kq, kd, km, kh, kt, ksh, vq, vd, vm, vh, vt, vsh,
        out, out.stride(1), scale * LOG2E, int(window or 0),
        D=dim, HALF=half, NEOX=neox, GQA=hq // hkv, BLOCK_H=max(16, triton.next_power_of_2(hq // hkv)),
        BLOCK_N=block_n, K_TYPE=k_code, V_TYPE=v_code, FAST=False,
        Q_SPLITS=q_args[3], Q_BIAS=q_args[4] is not None, K_SPLITS=k_args[3], K_BIAS=k_args[4] is not None,
        V_SPLITS=v_args[3], V_BIAS=v_args[4] is not None,
        IN_DTYPE=dtype_constexpr(split_inputs[0] if split_inputs else q),
        num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False, **pdl_launch(out.device),
    )
    return out
