"""Prefill-chunk attention over the quantized KV cache.

Queries of a new chunk at positions [start_pos, start_pos + T) attend causally to cache positions
[0, start_pos + T): the cached prefix and the chunk itself, whose K/V the caller has already
written (k_write / v_write) — so every key is read from the cache, as in a cold run with any
chunking. A program handles BLOCK_M queries of one query head (GQA: KV head = head // (Hq / Hkv))
with an online softmax over BLOCK_N-position K/V tiles dequantized in registers.

q: (B, Hq, T, D), already in K's basis (rotate it with engine.hadamard.rotate when K is rotated).
Stores: (B, Hkv, max_positions, X) as engine.kv_quant lays them out. window W (0/None = full):
the query at position i sees keys j with i - W < j <= i. Attention sinks (`k_sink` / `v_sink`, f16
copies of a side's first S positions, S <= block_n): a program's first tile, when it starts below S,
reads those rows from the copies; the other tiles run as without sinks.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from engine.kv_quant import KVStore
from kernels.kv_blocks import (
    LOG2E,
    _load_rows,
    _sink_rows,
    _storage_cols,
    attend_with_sinks_reference,
    check_kernel_head_dim,
    sink_args,
    store_args,
)
from kernels.pdl import pdl_launch, wait_for_previous

log = logging.getLogger(__name__)


def prefill_attention_reference(
    q: torch.Tensor, k_store: KVStore, v_store: KVStore, start_pos: int, *,
    scale: float | None = None, window: int | None = None, k_sink: torch.Tensor | None = None,
    v_sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch prefill attention: the oracle of `prefill_attention` (and the CPU path)."""
    return attend_with_sinks_reference(q, k_store, v_store, start_pos, scale=scale, window=window,
                                       k_sink=k_sink, v_sink=v_sink)


@triton.jit
def _attend_tile(
    q, qpos, m_i, l_i, acc, n0, hi, window,
    kq_ptr, kd_ptr, km_ptr, k_base, ks_base, stride_kt, stride_kst,
    vq_ptr, vd_ptr, vm_ptr, v_base, vs_base, stride_vt, stride_vst, kcols, vcols, ks, vs, sink_end,
    BLOCK_N: tl.constexpr, D: tl.constexpr, K_TYPE: tl.constexpr, V_TYPE: tl.constexpr,
    K_SINK: tl.constexpr, V_SINK: tl.constexpr,
):
    """Online-softmax step of queries q [BLOCK_M, D] at qpos over cache rows [n0, n0 + BLOCK_N) (rows
    >= hi absent). K_SINK / V_SINK: rows < sink_end read from the f16 sink slab ks / vs."""
    kpos = n0 + tl.arange(0, BLOCK_N)
    kmask = kpos < hi
    kpos64 = kpos.to(tl.int64)
    k = _load_rows(kq_ptr, kd_ptr, km_ptr, k_base + kpos64 * stride_kt, ks_base + kpos64 * stride_kst,
                   kmask, BLOCK_N, D, K_TYPE)  # [BLOCK_N, D] fp16
    if K_SINK:
        k = _sink_rows(k, ks, kpos, sink_end, kcols, D)
    s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] fp32
    visible = kmask[None, :] & (kpos[None, :] <= qpos[:, None])
    if window > 0:
        visible = visible & (kpos[None, :] > qpos[:, None] - window)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = _load_rows(vq_ptr, vd_ptr, vm_ptr, v_base + kpos64 * stride_vt, vs_base + kpos64 * stride_vst,
                   kmask, BLOCK_N, D, V_TYPE)  # [BLOCK_N, D] fp16
    if V_SINK:
        v = _sink_rows(v, vs, kpos, sink_end, vcols, D)
    acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
    return m_new, l_i, acc


@triton.jit
def _prefill_attention_kernel(
    q_ptr, stride_qb, stride_qh, stride_qt,
    kq_ptr, kd_ptr, km_ptr, stride_kb, stride_kh, stride_kt, stride_ksb, stride_ksh, stride_kst,
    vq_ptr, vd_ptr, vm_ptr, stride_vb, stride_vh, stride_vt, stride_vsb, stride_vsh, stride_vst,
    o_ptr, stride_ob, stride_oh, stride_ot,
    qk_scale, window, start_pos, T, HQ,
    ks_ptr, stride_ksnb, stride_ksnh, vs_ptr, stride_vsnb, stride_vsnh, n_sink,
    D: tl.constexpr, GQA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    K_TYPE: tl.constexpr, V_TYPE: tl.constexpr, K_SINK: tl.constexpr, V_SINK: tl.constexpr,
    SINKS: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)  # PDL launch: wait for the kernel before (kernels/pdl.py)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hkv = h // GQA
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    kcols = _storage_cols(D, K_TYPE)  # Q is read in K's column order, the output written in V's
    vcols = _storage_cols(D, V_TYPE)
    q_row = b.to(tl.int64) * stride_qb + h * stride_qh + rows.to(tl.int64) * stride_qt  # [BLOCK_M]
    q = tl.load(q_ptr + q_row[:, None] + kcols[None, :], mask=rmask[:, None], other=0.0)
    q = (q.to(tl.float32) * qk_scale).to(tl.float16)  # [BLOCK_M, D], softmax scale and log2(e) folded in
    qpos = start_pos + rows  # [BLOCK_M]

    n_keys = start_pos + T
    hi = tl.minimum(start_pos + pid_m * BLOCK_M + BLOCK_M, n_keys)
    lo = 0
    if window > 0:
        lo = tl.maximum(start_pos + pid_m * BLOCK_M - window + 1, 0)

    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    k_base = b.to(tl.int64) * stride_kb + hkv * stride_kh
    ks_base = b.to(tl.int64) * stride_ksb + hkv * stride_ksh
    v_base = b.to(tl.int64) * stride_vb + hkv * stride_vh
    vs_base = b.to(tl.int64) * stride_vsb + hkv * stride_vsh
    ks = ks_ptr + (b.to(tl.int64) * stride_ksnb + hkv * stride_ksnh)  # sink slabs (S, D), if any
    vs = vs_ptr + (b.to(tl.int64) * stride_vsnb + hkv * stride_vsnh)
    sink_end = tl.minimum(n_sink, hi)  # sink rows past the keys are never read
    n_first = lo
    if SINKS:
        if lo < sink_end:  # the tile holding the sinks reads them from their f16 copies, peeled off so
            m_i, l_i, acc = _attend_tile(  # that the main loop runs as without sinks
                q, qpos, m_i, l_i, acc, lo, hi, window,
                kq_ptr, kd_ptr, km_ptr, k_base, ks_base, stride_kt, stride_kst,
                vq_ptr, vd_ptr, vm_ptr, v_base, vs_base, stride_vt, stride_vst, kcols, vcols, ks, vs,
                sink_end, BLOCK_N, D, K_TYPE, V_TYPE, K_SINK, V_SINK)
            n_first = lo + BLOCK_N
    for n0 in range(n_first, hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, qpos, m_i, l_i, acc, n0, hi, window,
            kq_ptr, kd_ptr, km_ptr, k_base, ks_base, stride_kt, stride_kst,
            vq_ptr, vd_ptr, vm_ptr, v_base, vs_base, stride_vt, stride_vst, kcols, vcols, ks, vs, sink_end,
            BLOCK_N, D, K_TYPE, V_TYPE, False, False)

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_row = b.to(tl.int64) * stride_ob + h * stride_oh + rows.to(tl.int64) * stride_ot  # [BLOCK_M]
    tl.store(o_ptr + o_row[:, None] + vcols[None, :], o.to(o_ptr.dtype.element_ty), mask=rmask[:, None])


def prefill_attention(
    q: torch.Tensor, k_store: KVStore, v_store: KVStore, start_pos: int, *,
    scale: float | None = None, window: int | None = None, block_m: int = 64, block_n: int = 64,
    num_warps: int = 4, num_stages: int = 3, out: torch.Tensor | None = None,
    k_sink: torch.Tensor | None = None, v_sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of queries (B, Hq, T, D) at [start_pos, start_pos + T) -> (B, Hq, T, D).

    out: an optional (B, Hq, T, D) tensor (any float dtype, any strides with a contiguous last dim) to
    write the result into, e.g. a (T, Hq, D) buffer seen through .permute(1, 0, 2)[None].
    k_sink / v_sink: attention sinks, (B, Hkv, S, D) float16 copies of positions [0, S) of a side (both
    the same S), read instead of that side's store; None: the side keeps none.

    Defaults measured on an H200 (Hq 12, Hkv 2, D 128, a 512-token chunk after 4096 cached):
    block 64 x 64, 4 warps, 3 stages gave 142 TFLOP/s (f16 cache), 62 (q4_0), 59 (q8_0); 32 x 64,
    64 x 32 and 128 x 64 (8 warps) were slower for every type.
    """
    bsz, hq, t, dim = q.shape
    check_kernel_head_dim(dim)
    hkv = k_store.qs.shape[1]
    if hq % hkv or k_store.head_dim != dim or v_store.head_dim != dim:
        raise ValueError(f"q {tuple(q.shape)} does not match the stores {k_store.shape} / {v_store.shape}")
    if start_pos + t > k_store.qs.shape[2]:
        raise ValueError(f"positions up to {start_pos + t} exceed the cache's {k_store.qs.shape[2]}")
    if block_n < 32:
        # measured: q4 tiles of 16 rows come out wrong on an H200 with Triton 3.6 (32 and up are exact)
        raise ValueError(f"block_n must be at least 32, got {block_n}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)  # (B, Hq, T, D)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} must be {tuple(q.shape)} with a contiguous last dim")
    if t == 0:
        return out
    block_m = min(block_m, max(16, triton.next_power_of_2(t)))
    ka, va = store_args(k_store), store_args(v_store)
    qk_scale = (scale if scale is not None else dim**-0.5) * LOG2E
    ksa, vsa = sink_args(k_sink, k_store, q), sink_args(v_sink, v_store, q)
    n_sink = next((x.shape[2] for x in (k_sink, v_sink) if x is not None), 0)
    if any(x is not None and x.shape[2] != n_sink for x in (k_sink, v_sink)) or n_sink > block_n:
        raise ValueError(f"K and V sinks must keep the same number of positions, at most block_n {block_n}")
    _prefill_attention_kernel[(triton.cdiv(t, block_m), bsz * hq)](
        q, q.stride(0), q.stride(1), q.stride(2), *ka[:9], *va[:9],
        out, out.stride(0), out.stride(1), out.stride(2),
        qk_scale, int(window or 0), start_pos, t, hq, *ksa, *vsa, n_sink,
        D=dim, GQA=hq // hkv, BLOCK_M=block_m, BLOCK_N=block_n, K_TYPE=ka[9], V_TYPE=va[9],
        K_SINK=k_sink is not None, V_SINK=v_sink is not None, SINKS=n_sink > 0,
        num_warps=num_warps, num_stages=num_stages, **pdl_launch(q.device),
    )
    return out
