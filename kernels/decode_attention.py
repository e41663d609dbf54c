"""Decode attention over the quantized KV cache, flash-decoding style.

One query token per sequence attends to cache positions [0, L) (L = its length, the new token's
K/V already written at L - 1). Step 1 splits the context into chunks of `split_size` positions;
a program handles one (sequence, KV head, chunk) for all the GQA query heads of that KV head,
dequantizing K/V tiles in registers, and writes an unnormalised partial output with its running
max and sum. Step 2 (`_decode_reduce_kernel`) merges the chunks.

q: (B, Hq, D), already in K's basis: rotate it with engine.hadamard.rotate when K is stored rotated.
Stores: (B, Hkv, max_positions, X) as engine.kv_quant lays them out. window W (0/None = full):
the query at position L - 1 sees keys j > L - 1 - W.

Speculative verify rows: pass one cache as a batch with stride 0 (`store.qs.expand(R, ...)`), the
rows' queries as q (R, Hq, D) and per-row lengths. With the same `split_size`, row r then runs exactly
the arithmetic of a single-query decode at length lengths[r] (the splits and tiles depend only on
split_size and the length), so verification reproduces decoding bit for bit. With a device lengths
tensor and `max_length` given the launcher never reads the device, so it can be captured in a CUDA
graph; splits past a sequence's length do no work and merge as empty.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from engine.kv_quant import KVStore, attend_quantized
from kernels.kv_blocks import LOG2E, _load_rows, _storage_cols, check_kernel_head_dim, store_args

log = logging.getLogger(__name__)


def decode_attention_reference(
    q: torch.Tensor, k_store: KVStore, v_store: KVStore, lengths: int | torch.Tensor, *,
    scale: float | None = None, window: int | None = None,
) -> torch.Tensor:
    """Plain-torch decode attention (per sequence: attend_quantized with one query)."""
    lens = _lengths_list(lengths, q.shape[0])
    outs = []
    for b, n in enumerate(lens):
        kb, vb = k_store.narrow(0, b, 1), v_store.narrow(0, b, 1)
        outs.append(attend_quantized(q[b : b + 1, :, None, :], kb, vb, n - 1, scale=scale, window=window))
    return torch.cat(outs, dim=0)[:, :, 0, :]  # (B, Hq, D)


def _lengths_list(lengths: int | torch.Tensor, batch: int) -> list[int]:
    if isinstance(lengths, int):
        return [lengths] * batch
    return [int(n) for n in lengths.tolist()]


@triton.jit
def _decode_split_kernel(
    q_ptr, stride_qb, stride_qh,
    kq_ptr, kd_ptr, km_ptr, stride_kb, stride_kh, stride_kt, stride_ksb, stride_ksh, stride_kst,
    vq_ptr, vd_ptr, vm_ptr, stride_vb, stride_vh, stride_vt, stride_vsb, stride_vsh, stride_vst,
    lens_ptr, length_all, o_ptr, ml_ptr,
    qk_scale, window, split_size, n_splits, HKV,
    D: tl.constexpr, GQA: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    K_TYPE: tl.constexpr, V_TYPE: tl.constexpr, PER_SEQ_LENGTH: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    heads = hkv * GQA + tl.arange(0, BLOCK_H)
    hmask = tl.arange(0, BLOCK_H) < GQA
    kcols = _storage_cols(D, K_TYPE)  # Q is read in K's column order, the output in V's
    vcols = _storage_cols(D, V_TYPE)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + kcols[None, :],
                mask=hmask[:, None], other=0.0).to(tl.float32)
    q = (q * qk_scale).to(tl.float16)  # [BLOCK_H, D], softmax scale and log2(e) folded in

    length = length_all
    if PER_SEQ_LENGTH:
        length = tl.load(lens_ptr + b)
    lo = 0
    if window > 0:
        lo = tl.maximum(length - window, 0)
    start = tl.maximum(pid_s * split_size, lo)
    end = tl.minimum(pid_s * split_size + split_size, length)

    m_i = tl.full((BLOCK_H,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, D), tl.float32)
    k_base = b.to(tl.int64) * stride_kb + hkv * stride_kh
    ks_base = b.to(tl.int64) * stride_ksb + hkv * stride_ksh
    v_base = b.to(tl.int64) * stride_vb + hkv * stride_vh
    vs_base = b.to(tl.int64) * stride_vsb + hkv * stride_vsh
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pmask = pos < end
        pos64 = pos.to(tl.int64)
        k = _load_rows(kq_ptr, kd_ptr, km_ptr, k_base + pos64 * stride_kt, ks_base + pos64 * stride_kst,
                       pmask, BLOCK_N, D, K_TYPE)  # [BLOCK_N, D] fp16
        s = tl.dot(q, tl.trans(k))  # [BLOCK_H, BLOCK_N] fp32
        s = tl.where(pmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_rows(vq_ptr, vd_ptr, vm_ptr, v_base + pos64 * stride_vt, vs_base + pos64 * stride_vst,
                       pmask, BLOCK_N, D, V_TYPE)  # [BLOCK_N, D] fp16
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
        m_i = m_new

    row = (b * HKV * GQA + heads).to(tl.int64) * n_splits + pid_s  # [BLOCK_H] index into (B * Hq, S)
    tl.store(o_ptr + row[:, None] * D + vcols[None, :], acc, mask=hmask[:, None])
    tl.store(ml_ptr + row * 2, m_i, mask=hmask)
    tl.store(ml_ptr + row * 2 + 1, l_i, mask=hmask)


@triton.jit
def _decode_reduce_kernel(
    o_part_ptr, ml_ptr, out_ptr, stride_ob, stride_oh, HQ, n_splits,
    D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)  # b * Hq + h
    b = pid // HQ
    h = pid % HQ
    cols = tl.arange(0, D)
    base = pid.to(tl.int64) * n_splits
    m_max = tl.full([1], -1.0e30, tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):  # pass 1: the global running max
        sp = s0 + tl.arange(0, BLOCK_S)
        m = tl.load(ml_ptr + (base + sp) * 2, mask=sp < n_splits, other=-1.0e30)
        m_max = tl.maximum(m_max, tl.max(m, axis=0))
    l_sum = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):  # pass 2: rescale and add the partial outputs
        sp = s0 + tl.arange(0, BLOCK_S)
        smask = sp < n_splits
        m = tl.load(ml_ptr + (base + sp) * 2, mask=smask, other=-1.0e30)
        l_part = tl.load(ml_ptr + (base + sp) * 2 + 1, mask=smask, other=0.0)
        part = tl.load(o_part_ptr + (base + sp)[:, None] * D + cols[None, :], mask=smask[:, None], other=0.0)
        w = tl.exp2(m - m_max)  # [BLOCK_S]
        l_sum += tl.sum(w * l_part, axis=0)
        acc += tl.sum(part * w[:, None], axis=0)
    o = acc / tl.where(l_sum > 0.0, l_sum, 1.0)  # [D]
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + cols, o.to(out_ptr.dtype.element_ty))


_SM_COUNT: dict[int, int] = {}
PROGRAMS_PER_SM = 2  # H200, Hq 12 / Hkv 2 / D 128, L = 32768: 2 -> 17.5 us (f16), 4 -> 25 us, 8 -> 41 us


def default_split_size(device: torch.device, n_heads: int, max_len: int, block_n: int = 64) -> int:
    """Enough splits for PROGRAMS_PER_SM programs per SM, never fewer than block_n positions each."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        target = PROGRAMS_PER_SM * _SM_COUNT[idx]
    else:
        target = 8
    n_splits = max(1, min(triton.cdiv(target, n_heads), triton.cdiv(max(max_len, 1), block_n)))
    return triton.cdiv(triton.cdiv(max(max_len, 1), n_splits), block_n) * block_n


def decode_attention(
    q: torch.Tensor, k_store: KVStore, v_store: KVStore, lengths: int | torch.Tensor, *,
    scale: float | None = None, window: int | None = None, max_length: int | None = None,
    split_size: int | None = None, block_n: int = 64, num_warps: int = 4, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over cache positions [0, lengths[b]) -> (B, Hq, D).

    lengths: an int (all sequences) or a (B,) int tensor; max_length bounds it (read from the
    tensor, a host sync, when not given). split_size: positions per split (a multiple of block_n);
    by default about PROGRAMS_PER_SM programs per SM, never fewer than block_n positions each.
    out: an optional (B, Hq, D) tensor (any float dtype, contiguous heads) to write the result into.
    """
    bsz, hq, dim = q.shape
    check_kernel_head_dim(dim)
    hkv = k_store.qs.shape[1]
    if hq % hkv or k_store.head_dim != dim or v_store.head_dim != dim:
        raise ValueError(f"q {tuple(q.shape)} does not match the stores {k_store.shape} / {v_store.shape}")
    if isinstance(lengths, int):
        max_len = lengths
        lens = q  # unused: the kernel takes the length as a scalar
    else:
        lens = lengths.to(device=q.device, dtype=torch.int32)
        max_len = max_length if max_length is not None else int(lens.max().item())
    if max_len > k_store.qs.shape[2]:
        raise ValueError(f"length {max_len} exceeds the cache's {k_store.qs.shape[2]} positions")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if split_size is None:
        split_size = default_split_size(q.device, bsz * hkv, max_len, block_n)
    if block_n < 32:
        # measured: q4 tiles of 16 rows come out wrong on an H200 with Triton 3.6 (32 and up are exact)
        raise ValueError(f"block_n must be at least 32, got {block_n}")
    if split_size % block_n:
        raise ValueError(f"split_size {split_size} must be a multiple of block_n {block_n}")
    n_splits = max(1, triton.cdiv(max_len, split_size))
    gqa = hq // hkv
    o_part = torch.empty(bsz * hq, n_splits, dim, dtype=torch.float32, device=q.device)  # (B*Hq, S, D)
    ml = torch.empty(bsz * hq, n_splits, 2, dtype=torch.float32, device=q.device)  # (B*Hq, S, [max, sum])
    ka, va = store_args(k_store), store_args(v_store)
    qk_scale = (scale if scale is not None else dim**-0.5) * LOG2E
    _decode_split_kernel[(bsz * hkv, n_splits)](
        q, q.stride(0), q.stride(1), *ka[:9], *va[:9], lens, max_len, o_part, ml,
        qk_scale, int(window or 0), split_size, n_splits, hkv,
        D=dim, GQA=gqa, BLOCK_H=max(16, triton.next_power_of_2(gqa)), BLOCK_N=block_n,
        K_TYPE=ka[9], V_TYPE=va[9], PER_SEQ_LENGTH=not isinstance(lengths, int),
        num_warps=num_warps,
    )
    if out is None:
        out = torch.empty_like(q)  # (B, Hq, D)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} must be {tuple(q.shape)} with a contiguous last dim")
    _decode_reduce_kernel[(bsz * hq,)](
        o_part, ml, out, out.stride(0), out.stride(1), hq, n_splits,
        D=dim, BLOCK_S=32,
    )
    return out
