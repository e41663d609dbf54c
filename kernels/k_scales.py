"""K-equalization scales of a first prefill chunk (engine/k_equalize.py), in two launches.

Taking the scales in torch (`engine.k_equalize.channel_scales` after the smoothing subtract) ran 46
small torch ops per layer (CPU profiler count, views included), each launched from Python on the first
chunk of every conversation; here it is one pass over the chunk's K and Q and one tiny finalize.
Step 1 (`_k_scales_partial_kernel`): a program sums, for one KV head and BLOCK_T rows,
the squares of K (smoothed: minus `mean`) and of the queries of that head's GQA group, per channel.
Step 2 (`_k_scales_finalize_kernel`): per KV head, channel RMS over the chunk, widths relative to the
head's RMS floored at RMS_FLOOR of it, s = 2^round(ALPHA * log2(width_k / width_q)) (round half to
even, as torch.round), 1 where a head's K or Q is all zero.

Layouts: k (T, Hkv, D) and q (T, Hq, D) float32 with contiguous heads (the RoPE kernel's outputs), mean
(Hkv, D) float32 or None, out (Hkv, D) float32. q None: the K-only recipe. The sums run in another order
than torch's, so a width within float32 rounding of a rounding boundary of the log2 may land on the other
power of two than `k_scales_reference` (attention is unchanged either way: the scales are exact).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from engine import k_equalize

log = logging.getLogger(__name__)


def k_scales_reference(
    k: torch.Tensor, q: torch.Tensor | None, mean: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain torch: k (T, Hkv, D), q (T, Hq, D) or None, mean (Hkv, D) or None -> (Hkv, D) scales."""
    x = k.to(torch.float32).transpose(0, 1)  # (Hkv, T, D)
    if mean is not None:
        x = x - mean.to(torch.float32)[:, None, :]
    return k_equalize.channel_scales(x, None if q is None else q.to(torch.float32).transpose(0, 1))


@triton.jit
def _k_scales_partial_kernel(
    k_ptr, stride_kt, q_ptr, stride_qt, mean_ptr, part_ptr, T,
    D: tl.constexpr, GQA: tl.constexpr, BLOCK_T: tl.constexpr, SMOOTH: tl.constexpr, HAS_Q: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    n_kv = tl.num_programs(1)
    cols = tl.arange(0, D)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = (t < T)[:, None]  # [BLOCK_T, 1]
    t64 = t.to(tl.int64)[:, None]
    x = tl.load(k_ptr + t64 * stride_kt + h * D + cols[None, :], mask=rows, other=0.0)  # [BLOCK_T, D]
    if SMOOTH:
        x = tl.where(rows, x - tl.load(mean_ptr + h * D + cols)[None, :], 0.0)
    part = part_ptr + (pid_t * n_kv + h).to(tl.int64) * 2 * D  # this block's (2, D) row of partial sums
    tl.store(part + cols, tl.sum(x * x, axis=0))
    if HAS_Q:
        sq = tl.zeros((D,), tl.float32)
        for g in tl.static_range(GQA):
            y = tl.load(q_ptr + t64 * stride_qt + (h * GQA + g) * D + cols[None, :], mask=rows, other=0.0)
            sq += tl.sum(y * y, axis=0)
        tl.store(part + D + cols, sq)


@triton.jit
def _relative_widths(sum_sq, count, floor, D: tl.constexpr):
    """Per-channel sums of squares over `count` values [D] -> (widths relative to the head's RMS, floored;
    whether the head's RMS is > 0), as engine.k_equalize._relative_widths."""
    rms = tl.sqrt_rn(tl.math.div_rn(sum_sq, tl.zeros((D,), tl.float32) + count))
    head = tl.sqrt_rn(tl.sum(rms * rms, axis=0) * (1.0 / D))  # D a power of two: exact, as a division
    safe = tl.where(head > 0.0, head, 1.0)
    return tl.math.div_rn(tl.maximum(rms, head * floor), tl.zeros((D,), tl.float32) + safe), head > 0.0


@triton.jit
def _k_scales_finalize_kernel(
    part_ptr, out_ptr, T, n_blocks, alpha, floor,
    D: tl.constexpr, GQA: tl.constexpr, HAS_Q: tl.constexpr,
):
    h = tl.program_id(0)
    n_kv = tl.num_programs(0)
    cols = tl.arange(0, D)
    sk = tl.zeros((D,), tl.float32)
    sq = tl.zeros((D,), tl.float32)
    for i in range(0, n_blocks):
        part = part_ptr + (i * n_kv + h).to(tl.int64) * 2 * D
        sk += tl.load(part + cols)
        if HAS_Q:
            sq += tl.load(part + D + cols)
    width, live = _relative_widths(sk, T * 1.0, floor, D)
    if HAS_Q:
        q_width, q_live = _relative_widths(sq, T * GQA * 1.0, floor, D)
        width = tl.math.div_rn(width, tl.where(q_live, q_width, 1.0))
        live = live & q_live
    width = tl.where(live, width, 1.0)  # a dead head (all zero) gets s = 1 below; keep its log2 finite
    e = alpha * tl.log2(width)  # [D]
    r = tl.floor(e + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    r = tl.where((r - e == 0.5) & odd, r - 1.0, r)  # round half to even, as torch.round
    scale = ((r.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)  # 2^r, exactly
    tl.store(out_ptr + h * D + cols, tl.where(live, scale, 1.0))


def k_scales(
    k: torch.Tensor, q: torch.Tensor | None, mean: torch.Tensor | None = None, *,
    out: torch.Tensor | None = None, block_t: int = 64,
) -> torch.Tensor:
    """Kernel of `k_scales_reference`: k (T, Hkv, D), q (T, Hq, D) or None, mean (Hkv, D) or None ->
    out (Hkv, D) float32 (a given buffer is written in place: the engine's fixed scale buffer)."""
    t, hkv, dim = k.shape
    if k.dtype != torch.float32 or k.stride(2) != 1 or k.stride(1) != dim:
        raise ValueError(f"k {tuple(k.shape)} must be float32 (T, Hkv, D) with contiguous heads")
    if q is not None and (q.dtype != torch.float32 or q.shape[0] != t or q.shape[2] != dim
                          or q.shape[1] % hkv or q.stride(2) != 1 or q.stride(1) != dim):
        raise ValueError(f"q {tuple(q.shape)} must be float32 (T, Hq, D) with contiguous heads, Hq a "
                         f"multiple of {hkv}")
    if mean is not None and (mean.shape != (hkv, dim) or mean.dtype != torch.float32
                             or not mean.is_contiguous()):
        raise ValueError(f"mean must be a contiguous ({hkv}, {dim}) float32 tensor")
    if out is None:
        out = torch.empty(hkv, dim, dtype=torch.float32, device=k.device)
    elif out.shape != (hkv, dim) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({hkv}, {dim}) float32 tensor")
    if t == 0:
        raise ValueError("K scales need at least one row")
    n_blocks = triton.cdiv(t, block_t)
    part = torch.empty(n_blocks, hkv, 2, dim, dtype=torch.float32, device=k.device)  # (blocks, Hkv, K|Q, D)
    gqa = 1 if q is None else q.shape[1] // hkv
    _k_scales_partial_kernel[(n_blocks, hkv)](
        k, k.stride(0), k if q is None else q, 0 if q is None else q.stride(0), k if mean is None else mean,
        part, t, D=dim, GQA=gqa, BLOCK_T=block_t, SMOOTH=mean is not None, HAS_Q=q is not None,
    )
    _k_scales_finalize_kernel[(hkv,)](
        part, out, t, n_blocks, k_equalize.ALPHA, k_equalize.RMS_FLOOR, D=dim, GQA=gqa, HAS_Q=q is not None,
    )
    return out
