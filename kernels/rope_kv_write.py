"""RoPE and the K and V cache writes of a decode or verify step in one launch.

The CUDA engine's row path (engine/models/cuda_transformer.py, T <= VERIFY_ROWS_MAX rows) ran three
kernels per layer after the QKV projection: `layer_ops.rope_heads` (Q and K), `k_write` and `v_write`.
Here one grid of (T, Hq + 2 Hkv) programs does all three, one (row, head) per program:

- Q head: exactly rope_heads' Q (optional head norm, RoPE, times the K-equalization scales, WHT
  rotation into K's basis) -> q_out, float32;
- K head: rope_heads' K (head norm, RoPE) kept in registers, then exactly k_write's work (smoothing,
  equalization, rotation, the f16 sink copy, quantize and store at the row's position);
- V head: v_write's work.

Q, K and V may each be a kernels.split_output.SplitOutput (the K-split partial sums of the QKV GEMVs,
added while loading: the same values as the tensors those GEMVs would have stored).

The three kinds of program share no memory they write: Q programs write only q_out, K and V programs
only their own cache rows and sinks; all read the projections, the tables and the fixed scale / mean
buffers, which nothing in the launch writes. So they may run in any order.

The same @triton.jit helpers as the three kernels (`layer_ops._rope_head`, `k_write._k_prepare_rows`,
`k_write._store_rows_at`) and the same compile options (no FMA contraction: k_write needs none for the
quantizer's roundings, rope_heads launches without it too; one warp per head as rope_heads, so the head
norm sums in the same order) make the values bit-identical to the three launches in sequence.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from engine.hadamard import Rotation
from engine.kv_quant import KVStore
from kernels.k_write import _k_prepare_rows, _store_rows_at, k_write_reference
from kernels.kv_blocks import check_kernel_head_dim, sink_args, store_args
from kernels.layer_ops import _rope_head, _rope_one_head, rope_heads_reference, rope_num_warps
from kernels.pdl import pdl_launch, wait_for_previous
from kernels.split_output import SplitOutput, dtype_constexpr, input_args, load_input, value_of
from kernels.v_write import v_write_reference

log = logging.getLogger(__name__)


def rope_kv_write_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
    sin: torch.Tensor, k_store: KVStore, v_store: KVStore, *, neox: bool, q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None, eps: float = 1e-6, rotation: Rotation | None = None,
    k_scale: torch.Tensor | None = None, mean: torch.Tensor | None = None,
    k_sink: torch.Tensor | None = None, v_sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """The three references in sequence (rope_heads, k_write, v_write); arguments as `rope_kv_write`.
    Returns q (T, Hq, D) float32 in K's basis."""
    dim = k_store.head_dim
    q, k, v = (value_of(x).view(x.shape[0], -1, dim) if isinstance(x, SplitOutput) else x for x in (q, k, v))
    q_out, k_roped = rope_heads_reference(q, k, positions, cos, sin, neox=neox, q_norm=q_norm, k_norm=k_norm,
                                          eps=eps, rotation=rotation, q_scale=k_scale)
    k_write_reference(k_roped.permute(1, 0, 2)[None], k_store, mean=mean, rotation=rotation,
                      positions=positions, scale=k_scale, sink=k_sink)  # (1, Hkv, T, D)
    v_write_reference(v.permute(1, 0, 2)[None], v_store, positions=positions, sink=v_sink)
    return q_out


@triton.jit
def _rope_kv_write_kernel(
    q_ptr, stride_qt, k_ptr, stride_kt, v_ptr, stride_vt, qo_ptr,
    q_split_stride, q_bias_ptr, k_split_stride, k_bias_ptr, v_split_stride, v_bias_ptr,
    pos_ptr, cos_ptr, sin_ptr, stride_cs, qn_ptr, kn_ptr, eps,
    mean_ptr, scale_ptr, s1_ptr, s2_ptr, rot_scale,
    kq_ptr, kd_ptr, km_ptr, stride_kqh, stride_kqt, stride_ksh, stride_kst,
    vq_ptr, vd_ptr, vm_ptr, stride_vqh, stride_vqt, stride_vsh, stride_vst,
    k_sink_ptr, stride_knh, k_n_sink, v_sink_ptr, stride_vnh, v_n_sink,
    T, HQ, HKV,
    D: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr, HEAD_NORM: tl.constexpr,
    SMOOTH: tl.constexpr, EQUALIZE: tl.constexpr, ROTATE: tl.constexpr, G: tl.constexpr,
    LOG2_G: tl.constexpr, K_TYPE: tl.constexpr, V_TYPE: tl.constexpr, K_SINK: tl.constexpr,
    V_SINK: tl.constexpr, Q_SPLITS: tl.constexpr, Q_BIAS: tl.constexpr, K_SPLITS: tl.constexpr,
    K_BIAS: tl.constexpr, V_SPLITS: tl.constexpr, V_BIAS: tl.constexpr, IN_DTYPE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous(PDL)  # PDL launch: wait for the kernel before (kernels/pdl.py)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    rows = tl.program_id(0) + tl.arange(0, 1)  # [1] this program's row, as k_write / v_write index rows
    row_mask = rows < T
    if h < HQ + HKV:  # Q or K: RoPE at the row's position (padding rows, -1, read position 0)
        pos = tl.maximum(tl.load(pos_ptr + t), 0).to(tl.int64)
        cos_row = cos_ptr + pos * stride_cs
        sin_row = sin_ptr + pos * stride_cs
        if h < HQ:  # rope_heads' Q: scaled and rotated into K's basis
            _rope_one_head(q_ptr + t * stride_qt + h * D, qo_ptr + (t * HQ + h) * D, qn_ptr, cos_row, sin_row,
                           scale_ptr + (h // (HQ // HKV)) * D, s1_ptr, s2_ptr, rot_scale, eps, D, HALF, NEOX,
                           HEAD_NORM, EQUALIZE, ROTATE, G, LOG2_G, q_split_stride, q_bias_ptr + h * D,
                           Q_SPLITS, Q_BIAS, IN_DTYPE)
        else:  # rope_heads' K, then k_write's
            hk = h - HQ
            y = _rope_head(k_ptr + t * stride_kt + hk * D, kn_ptr, cos_row, sin_row, scale_ptr, s1_ptr,
                           s2_ptr, rot_scale, eps, D, HALF, NEOX, HEAD_NORM, False, False, G, LOG2_G,
                           k_split_stride, k_bias_ptr + hk * D, K_SPLITS, K_BIAS, IN_DTYPE)  # [D]
            x = _k_prepare_rows(y[None, :], mean_ptr + hk * D, scale_ptr + hk * D, s1_ptr, s2_ptr, rot_scale,
                                1, D, SMOOTH, EQUALIZE, ROTATE, G, LOG2_G)  # [1, D]
            _store_rows_at(x, rows, row_mask, 0, pos_ptr, kq_ptr, kd_ptr, km_ptr,
                           hk.to(tl.int64) * stride_kqh, hk.to(tl.int64) * stride_ksh, stride_kqt, stride_kst,
                           k_sink_ptr, hk.to(tl.int64) * stride_knh, k_n_sink, 1, D, K_TYPE, True, K_SINK)
    else:  # v_write's
        hv = h - HQ - HKV
        cols = tl.arange(0, D)
        x = load_input(v_ptr, t * stride_vt + hv * D + cols, cols < D, v_split_stride, v_bias_ptr + hv * D,
                       cols, V_SPLITS, V_BIAS, IN_DTYPE).to(tl.float32)  # [D]
        _store_rows_at(x[None, :], rows, row_mask, 0, pos_ptr, vq_ptr, vd_ptr, vm_ptr,
                       hv.to(tl.int64) * stride_vqh, hv.to(tl.int64) * stride_vsh, stride_vqt, stride_vst,
                       v_sink_ptr, hv.to(tl.int64) * stride_vnh, v_n_sink, 1, D, V_TYPE, True, V_SINK)


def rope_kv_write(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
    sin: torch.Tensor, k_store: KVStore, v_store: KVStore, *, neox: bool, q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None, eps: float = 1e-6, rotation: Rotation | None = None,
    k_scale: torch.Tensor | None = None, mean: torch.Tensor | None = None,
    k_sink: torch.Tensor | None = None, v_sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """`rope_heads` + `k_write` + `v_write` of T rows in one launch.

    q: (T, Hq, D), k and v: (T, Hkv, D), any float, contiguous heads (row strides free: column slices of
    one fused QKV output), or each a SplitOutput (T, H * D) of the projection (kernels/split_output.py);
    positions: (T,) integer device tensor (negative = a padding row: RoPE at 0, not written); cos, sin:
    (P, rope_dim / 2) tables; k_store, v_store: (1, Hkv, P, X) stores;
    k_scale: (Hkv, D) float32 K-equalization scales (Q is multiplied by them, K divided) or None;
    mean: (Hkv, D) float32 K smoothing vector or None; rotation: K's WHT (Q is rotated the same) or None;
    k_sink, v_sink: (1, Hkv, S, D) float16 attention sinks or None. Positions are not checked against the
    stores on the host. Returns q (T, Hq, D) float32 in K's basis."""
    dim = k_store.head_dim
    check_kernel_head_dim(dim)
    (t, hq), q_args = _head_rows(q, dim, "q")
    (_, hkv), k_args = _head_rows(k, dim, "k")
    v_shape, v_args = _head_rows(v, dim, "v")
    if k.shape[0] != t or v_shape != (t, hkv) or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need (T, Hq, D) and "
                         f"(T, Hkv, D) rows with Hq a multiple of Hkv")
    split_inputs = [x for x in (q, k, v) if isinstance(x, SplitOutput)]
    if len({x.dtype for x in split_inputs}) > 1:
        raise ValueError("split Q/K/V inputs of different dtypes")
    if positions.shape != (t,) or positions.dtype.is_floating_point:
        raise ValueError(f"positions must be a ({t},) integer tensor, got {tuple(positions.shape)}")
    half = cos.shape[1]
    if cos.stride(1) != 1 or sin.stride() != cos.stride() or 2 * half > dim:
        raise ValueError("cos/sin tables must be contiguous (P, rope_dim / 2) with rope_dim <= head_dim")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("pass both Q and K head norms, or neither")
    for name, vec in (("k_scale", k_scale), ("mean", mean)):
        if vec is not None and (vec.shape != (hkv, dim) or vec.dtype != torch.float32
                                or not vec.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous ({hkv}, {dim}) float32 tensor")
    for name, store in (("K", k_store), ("V", v_store)):
        if store.head_dim != dim or store.qs.shape[:2] != (1, hkv):
            raise ValueError(f"{name} rows (1, {hkv}, T, {dim}) do not fit the store {store.shape}")
    if rotation is not None and rotation.head_dim != dim:
        raise ValueError(f"rotation for head_dim {rotation.head_dim} used on head_dim {dim}")
    q_out = torch.empty(t, hq, dim, dtype=torch.float32, device=q.device)
    if t == 0:
        return q_out
    rot = rotation
    if rot is not None and rot.s1.device != q.device:
        rot = rot.to(q.device)  # a host-to-device copy per call: keep the engine's Rotation on the device
    group = rot.group if rot is not None else 32
    dummy = cos  # stands in for pointers the constexpr switches leave unread
    kq, kd, km, _, kqh, kqt, _, ksh, kst, k_type = store_args(k_store)
    vq, vd, vm, _, vqh, vqt, _, vsh, vst, v_type = store_args(v_store)
    k_sinks = sink_args(k_sink, k_store, dummy)  # (sink, stride_b, stride_h)
    v_sinks = sink_args(v_sink, v_store, dummy)
    _rope_kv_write_kernel[(t, hq + 2 * hkv)](
        q_args[0], q_args[1], k_args[0], k_args[1], v_args[0], v_args[1], q_out,
        *_split_args(q_args, dummy), *_split_args(k_args, dummy), *_split_args(v_args, dummy),
        positions, cos, sin, cos.stride(0), dummy if q_norm is None else q_norm,
        dummy if k_norm is None else k_norm, eps,
        dummy if mean is None else mean, dummy if k_scale is None else k_scale,
        dummy if rot is None else rot.s1, dummy if rot is None else rot.s2, 1.0 if rot is None else rot.scale,
        kq, kd, km, kqh, kqt, ksh, kst, vq, vd, vm, vqh, vqt, vsh, vst,
        k_sinks[0], k_sinks[2], 0 if k_sink is None else k_sink.shape[2],
        v_sinks[0], v_sinks[2], 0 if v_sink is None else v_sink.shape[2],
        t, hq, hkv,
        D=dim, HALF=half, NEOX=neox, HEAD_NORM=q_norm is not None, SMOOTH=mean is not None,
        EQUALIZE=k_scale is not None, ROTATE=rot is not None, G=group, LOG2_G=group.bit_length() - 1,
        K_TYPE=k_type, V_TYPE=v_type, K_SINK=k_sink is not None, V_SINK=v_sink is not None,
        Q_SPLITS=q_args[3], Q_BIAS=q_args[4] is not None, K_SPLITS=k_args[3], K_BIAS=k_args[4] is not None,
        V_SPLITS=v_args[3], V_BIAS=v_args[4] is not None,
        IN_DTYPE=dtype_constexpr(split_inputs[0] if split_inputs else q),
        num_warps=rope_num_warps(dim), enable_fp_fusion=False, **pdl_launch(q.device),
    )
    return q_out


def _split_args(args: tuple, dummy: torch.Tensor) -> tuple:
    """(split stride, bias pointer) of an input's `input_args` for the kernel (dummy: no bias)."""
    return args[2], dummy if args[4] is None else args[4]


def _head_rows(x: torch.Tensor | SplitOutput, dim: int, name: str) -> tuple[tuple[int, int], tuple]:
    """((T, heads), input_args) of a projection given as (T, H, D) with contiguous heads or as a
    SplitOutput (T, H * D)."""
    if isinstance(x, SplitOutput):
        if x.shape[1] % dim:
            raise ValueError(f"{name} has {x.shape[1]} columns, not whole heads of {dim}")
        return (x.shape[0], x.shape[1] // dim), input_args(x)
    if x.dim() != 3 or x.shape[2] != dim or x.stride(2) != 1 or x.stride(1) != dim:
        raise ValueError(f"{name} {tuple(x.shape)}: need (T, H, {dim}) with contiguous heads")
    return (x.shape[0], x.shape[1]), (x, x.stride(0), 0, 0, None)
