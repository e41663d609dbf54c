"""Decode attention over the quantized KV cache, flash-decoding style.

One query token per sequence attends to cache positions [0, L) (L = its length, the new token's
K/V already written at L - 1). Step 1 splits the context into chunks of `split_size` positions;
a program handles one (sequence, KV head, chunk) for all the GQA query heads of that KV head and
writes an unnormalised partial output with its running max and sum. Step 2 (`_decode_reduce_kernel`)
merges the chunks that hold positions. When one split covers `max_length` and there are no sinks, the
split kernel divides by its sum and stores the output itself and step 2 is not launched (`DIRECT`): the
merge of a single split multiplies by exp2(0) = 1 and adds exact zeros, so the bits are the merge's (a
test compares). The engine captures its 1-row decode step with such a bound while the context fits the
first split (engine.cuda_graphs, `CudaKVCache.length_bound`).

Inside a program (kv_blocks._load_halves): K/V tiles stream through shared memory with cp.async
(`num_stages`), and each tile is used as two halves, the low and the high nibbles of the same q4 bytes
(for every type the same column split), dequantized straight into the tensor-core operand layout
(inline PTX on CUDA: a few integer ops and one fp16 multiply per pair of values); Q is read and the
output written through the matching column maps, so no value is shuffled into element order. Whole
tiles run without masks; only a split's last, partial tile is masked. Launch parameters
(`launch_config`) and split sizes (`default_split_size`) depend on the split, tile and cache types,
never on the batch.

q: (B, Hq, D), already in K's basis: rotate it with engine.hadamard.rotate when K is stored rotated.
Stores: (B, Hkv, max_positions, X) as engine.kv_quant lays them out, positions contiguous. window W
(0/None = full): the query at position L - 1 sees keys j > L - 1 - W.

Attention sinks (`k_sink` / `v_sink`, f16 copies of a side's first S positions): the splits skip
positions < S (split 0 starts at S instead of 0, as a window start would move it), and the merge kernel
adds those positions, read from the copies (or from an unquantized side's store), as one more softmax
partial computed in fp32 (S x D per program: a few hundred FMAs); the split kernel compiles as without
sinks but for one max. The alternative tried first, reading them in split 0's first tile (a peeled copy
of the tile), compiled (Triton 3.9, sm_90, q4_0/q4_0, one warp; ahead of time, not run) to 168
registers and 6 KB of stack instead of 255 and 1.3 KB, and 20 KB of shared memory instead of 8, for
every split.

Speculative verify rows go through `kernels.verify_attention` (each tile read once for all rows). Where
that does not apply (a sliding window, see `verify_attention.applies`) they come here as one cache seen
as a batch with stride 0 (`KVStore.shared_by(R)`), the rows' queries as q (R, Hq, D) and per-row lengths.
With the same `split_size`, row r then runs exactly the arithmetic of a single-query decode at length
lengths[r] (the splits, tiles and launch parameters depend only on split_size, block_n, the types and the
length), so verification reproduces decoding bit for bit. With a device lengths tensor and `max_length`
given the launcher never reads the device, so it can be captured in a CUDA graph; splits past a
sequence's length return at once and are not merged.
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from engine.kv_quant import KVStore, kv_type
from kernels.kv_blocks import (
    LOG2E,
    _half_cols,
    _load_halves,
    attend_with_sinks_reference,
    check_kernel_head_dim,
    interpreting,
    prefetch_rows,
    sink_args,
    store_args,
)
from kernels.pdl import pdl_launch, pdl_supported, wait_for_previous

log = logging.getLogger(__name__)


def decode_attention_reference(
    q: torch.Tensor, k_store: KVStore, v_store: KVStore, lengths: int | torch.Tensor, *,
    scale: float | None = None, window: int | None = None, k_sink: torch.Tensor | None = None,
    v_sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch decode attention (per sequence: attend_quantized with one query, sinks as
    kv_blocks.attend_with_sinks_reference)."""
    lens = _lengths_list(lengths, q.shape[0])
    one = lambda t, b: None if t is None else t.narrow(0, b, 1)
    outs = []
    for b, n in enumerate(lens):
        kb, vb = k_store.narrow(0, b, 1), v_store.narrow(0, b, 1)
        outs.append(attend_with_sinks_reference(q[b : b + 1, :, None, :], kb, vb, n - 1, scale=scale,
                                                window=window, k_sink=one(k_sink, b), v_sink=one(v_sink, b)))
    return torch.cat(outs, dim=0)[:, :, 0, :]  # (B, Hq, D)


def _lengths_list(lengths: int | torch.Tensor, batch: int) -> list[int]:
    if isinstance(lengths, int):
        return [lengths] * batch
    return [int(n) for n in lengths.tolist()]


@triton.jit
def attend_tile(
    q_lo, q_hi, m_i, l_acc, acc_lo, acc_hi, kq, kd, km, vq, vd, vm, n0, end, row_end,
    D: tl.constexpr, BLOCK_N: tl.constexpr, K_TYPE: tl.constexpr, V_TYPE: tl.constexpr,
    FAST: tl.constexpr, MASKED: tl.constexpr, ROW_ENDS: tl.constexpr, V_AT_OPERAND: tl.constexpr,
):
    """Online-softmax step over cache rows [n0, n0 + BLOCK_N) (MASKED: rows >= end count as absent, and
    are not loaded). ROW_ENDS (verify_attention's tile form, whose tile rows end at different positions):
    rows >= row_end ([BLOCK_H, 1]) count as absent for each tile row, in every tile; else row_end is unused.
    V_AT_OPERAND: where V's tile is dequantized (`kv_blocks._load_halves` AT_OPERAND; the same values).

    The softmax sum is accumulated by the tensor cores like the output (`row_sums`), not by a reduction
    whose order would depend on how the warps share the tile (see verify_attention)."""
    k_lo, k_hi = _load_halves(kq, kd, km, n0, end, BLOCK_N, D, K_TYPE, FAST, MASKED)  # [BLOCK_N, D/2] each
    s = tl.dot(q_lo, tl.trans(k_lo))
    s = tl.dot(q_hi, tl.trans(k_hi), s)  # [BLOCK_H, BLOCK_N] fp32
    if ROW_ENDS:
        s = tl.where((n0 + tl.arange(0, BLOCK_N))[None, :] < row_end, s, float("-inf"))
    elif MASKED:
        s = tl.where((n0 + tl.arange(0, BLOCK_N) < end)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p16 = tl.exp2(s - m_new[:, None]).to(tl.float16)
    l_acc = row_sums(p16, l_acc * alpha[:, None], BLOCK_N, 0)
    v_lo, v_hi = _load_halves(vq, vd, vm, n0, end, BLOCK_N, D, V_TYPE, FAST, MASKED,  # [BLOCK_N, D/2] each
                              V_AT_OPERAND)
    acc_lo = tl.dot(p16, v_lo, acc_lo * alpha[:, None])
    acc_hi = tl.dot(p16, v_hi, acc_hi * alpha[:, None])
    return m_new, l_acc, acc_lo, acc_hi


@triton.jit
def row_sums(p16, l_acc, BLOCK_N: tl.constexpr, BATCH: tl.constexpr):
    """l_acc + the row sums of p16 in each of l_acc's 16 columns, as a dot with ones: the same tensor-core
    accumulation order whatever the warp layout (tl.sum's order is not). p16 [R, BLOCK_N] and l_acc [R, 16]
    (BATCH 0), or [BATCH, R, BLOCK_N] and [BATCH, R, 16]."""
    if BATCH > 0:
        ones = tl.full([BATCH, BLOCK_N, 16], 1.0, tl.float16)
    else:
        ones = tl.full([BLOCK_N, 16], 1.0, tl.float16)
    return tl.dot(p16, ones, l_acc)


@triton.jit
def _decode_split_kernel(
    q_ptr, stride_qb, stride_qh,
    kq_ptr, kd_ptr, km_ptr, stride_kb, stride_kh, stride_ksb, stride_ksh,
    vq_ptr, vd_ptr, vm_ptr, stride_vb, stride_vh, stride_vsb, stride_vsh,
    lens_ptr, length_all, o_ptr, ml_ptr, out_ptr, stride_ob, stride_oh,
    qk_scale, window, split_size, n_splits, HKV,
    n_sink,
    D: tl.constexpr, GQA: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    K_TYPE: tl.constexpr, V_TYPE: tl.constexpr, PER_SEQ_LENGTH: tl.constexpr, FAST: tl.constexpr,
    SINKS: tl.constexpr, PDL: tl.constexpr, DIRECT: tl.constexpr, PREFETCH: tl.constexpr,
    PF_LINES: tl.constexpr, V_AT_OPERAND: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    # this (sequence, KV head)'s slab of each store; offsets inside a slab fit in int32
    kq = kq_ptr + (b.to(tl.int64) * stride_kb + hkv * stride_kh)
    kd = kd_ptr + (b.to(tl.int64) * stride_ksb + hkv * stride_ksh)
    km = km_ptr + (b.to(tl.int64) * stride_ksb + hkv * stride_ksh)
    vq = vq_ptr + (b.to(tl.int64) * stride_vb + hkv * stride_vh)
    vd = vd_ptr + (b.to(tl.int64) * stride_vsb + hkv * stride_vsh)
    vm = vm_ptr + (b.to(tl.int64) * stride_vsb + hkv * stride_vsh)
    if PREFETCH:  # before the wait: the split's cache rows (all written before the previous kernel, but
        # the last, which that kernel may be writing: harmless for L2) start moving while it runs.
        # The length read here only sizes the request, kept inside the store by length_all.
        pf_length = length_all
        if PER_SEQ_LENGTH:
            pf_length = tl.minimum(tl.load(lens_ptr + b), length_all)
        pf_start = pid_s * split_size
        if window > 0:
            pf_start = tl.maximum(pf_start, pf_length - window)
        pf_end = tl.minimum(pid_s * split_size + split_size, pf_length)
        prefetch_rows(kq, kd, km, pf_start, pf_end, D, K_TYPE, PF_LINES)
        prefetch_rows(vq, vd, vm, pf_start, pf_end, D, V_TYPE, PF_LINES)
    wait_for_previous(PDL)  # PDL launch: wait for the kernel before (kernels/pdl.py)
    heads = hkv * GQA + tl.arange(0, BLOCK_H)
    hmask = tl.arange(0, BLOCK_H) < GQA
    length = length_all
    if PER_SEQ_LENGTH:
        length = tl.load(lens_ptr + b)
    if pid_s * split_size >= length and not DIRECT:
        return  # a split past the sequence's end: the merge never reads it (DIRECT: one split, whose
        # output, zeros for an empty sequence, is written below)
    cols_lo = _half_cols(D, 0)  # tiles come in two halves (kv_blocks._load_halves); Q is read and
    cols_hi = _half_cols(D, 1)  # the output written through the same column maps
    q_row = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh  # [BLOCK_H, 1]
    lo = 0
    if window > 0:
        lo = tl.maximum(length - window, 0)
    start = tl.maximum(pid_s * split_size, lo)
    if SINKS:
        start = tl.maximum(start, n_sink)  # positions < n_sink: the merge reads their f16 copies
    end = tl.minimum(pid_s * split_size + split_size, length)
    m_i, l_acc, acc_lo, acc_hi = attend_range(
        q_row, hmask, qk_scale, kq, kd, km, vq, vd, vm, start, end, D, BLOCK_H, BLOCK_N, K_TYPE, V_TYPE, FAST,
        V_AT_OPERAND)
    if DIRECT:
        o_row = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh  # [BLOCK_H, 1]
        store_normalized(acc_lo, acc_hi, l_acc, o_row, hmask, D)
        return
    row = (b * HKV * GQA + heads).to(tl.int64) * n_splits + pid_s  # [BLOCK_H] index into (B * Hq, S)
    tl.store(o_ptr + row[:, None] * D + cols_lo[None, :], acc_lo, mask=hmask[:, None])
    tl.store(o_ptr + row[:, None] * D + cols_hi[None, :], acc_hi, mask=hmask[:, None])
    tl.store(ml_ptr + row * 2, m_i, mask=hmask)
    tl.store(ml_ptr + row * 2 + 1, tl.max(l_acc, axis=1), mask=hmask)


@triton.jit
def attend_range(
    q_row, hmask, qk_scale, kq, kd, km, vq, vd, vm, start, end,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, K_TYPE: tl.constexpr,
    V_TYPE: tl.constexpr, FAST: tl.constexpr, V_AT_OPERAND: tl.constexpr,
):
    """The GQA query heads at q_row ([BLOCK_H, 1] pointers to float rows of D, `hmask` the real ones) over
    cache rows [start, end) of one (sequence, KV head) slab: (max, sum [BLOCK_H, 16], unnormalised output
    halves [BLOCK_H, D/2] in `_half_cols` order)."""
    cols_lo = _half_cols(D, 0)
    cols_hi = _half_cols(D, 1)
    q_lo = tl.load(q_row + cols_lo[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)
    q_hi = tl.load(q_row + cols_hi[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)
    q_lo = (q_lo * qk_scale).to(tl.float16)  # [BLOCK_H, D/2], softmax scale and log2(e) folded in
    q_hi = (q_hi * qk_scale).to(tl.float16)
    m_i = tl.full((BLOCK_H,), -1.0e30, tl.float32)
    l_acc = tl.zeros((BLOCK_H, 16), tl.float32)  # the softmax sum, in each of 16 equal columns
    acc_lo = tl.zeros((BLOCK_H, D // 2), tl.float32)
    acc_hi = tl.zeros((BLOCK_H, D // 2), tl.float32)
    # whole tiles without masks, then the partial last tile (if any) with them
    n_full = start + (tl.maximum(end - start, 0) // BLOCK_N) * BLOCK_N
    for n0 in range(start, n_full, BLOCK_N):
        m_i, l_acc, acc_lo, acc_hi = attend_tile(
            q_lo, q_hi, m_i, l_acc, acc_lo, acc_hi, kq, kd, km, vq, vd, vm, n0, end, end,
            D, BLOCK_N, K_TYPE, V_TYPE, FAST, False, False, V_AT_OPERAND)
    if n_full < end:
        m_i, l_acc, acc_lo, acc_hi = attend_tile(
            q_lo, q_hi, m_i, l_acc, acc_lo, acc_hi, kq, kd, km, vq, vd, vm, n_full, end, end,
            D, BLOCK_N, K_TYPE, V_TYPE, FAST, True, False, V_AT_OPERAND)
    return m_i, l_acc, acc_lo, acc_hi


@triton.jit
def store_normalized(acc_lo, acc_hi, l_acc, o_row, hmask, D: tl.constexpr):
    """The output of a single split (`DIRECT`): the merge of one split multiplies by exp2(0) = 1 and adds
    exact zeros, then divides as here, so these are its bits. o_row: [BLOCK_H, 1] output row pointers."""
    l_i = tl.max(l_acc, axis=1)
    inv = tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ty = o_row.dtype.element_ty
    tl.store(o_row + _half_cols(D, 0)[None, :], (acc_lo / inv).to(o_ty), mask=hmask[:, None])
    tl.store(o_row + _half_cols(D, 1)[None, :], (acc_hi / inv).to(o_ty), mask=hmask[:, None])


@triton.jit
def _sink_partial(
    q_row, qk_scale, k_rows, v_rows, n_sink, length, window, cols,
    D: tl.constexpr, S_PAD: tl.constexpr,
):
    """One query's softmax partial over the sink positions j < n_sink it sees (j < length, and inside the
    window: j > length - 1 - window): (max [1], sum [1], unnormalised output [BLOCK_D] at `cols`), scores in
    the split kernel's log2 domain. k_rows / v_rows: f16 or bf16 rows of D values (the sink copies, or the
    store of an unquantized side)."""
    j = tl.arange(0, S_PAD)
    lo = 0
    if window > 0:
        lo = tl.maximum(length - window, 0)
    seen = (j < n_sink) & (j < length) & (j >= lo)  # [S_PAD]
    d = tl.arange(0, D)
    q = tl.load(q_row + d).to(tl.float32) * qk_scale  # [D]
    k = tl.load(k_rows + j[:, None] * D + d[None, :], mask=seen[:, None], other=0.0).to(tl.float32)
    s = tl.where(seen, tl.sum(k * q[None, :], axis=1), -1.0e30)  # [S_PAD]
    m = tl.max(s, axis=0)
    p = tl.where(seen, tl.exp2(s - m), 0.0)
    v = tl.load(v_rows + j[:, None] * D + cols[None, :], mask=seen[:, None], other=0.0).to(tl.float32)
    acc = tl.sum(p[:, None] * v, axis=0)  # [BLOCK_D]
    return tl.zeros([1], tl.float32) + m, tl.zeros([1], tl.float32) + tl.sum(p, axis=0), acc


@triton.jit
def _decode_reduce_kernel(
    o_part_ptr, ml_ptr, out_ptr, stride_ob, stride_oh, HQ, n_splits, lens_ptr, length_all, split_size,
    q_ptr, stride_qb, stride_qh, qk_scale, window, k_ptr, stride_kb, stride_kh, v_ptr, stride_vb, stride_vh,
    n_sink,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PER_SEQ_LENGTH: tl.constexpr,
    GQA: tl.constexpr, S_PAD: tl.constexpr, SINKS: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous(PDL)  # PDL launch: wait for the split kernel; the output GEMV may start its prefetch
    pid = tl.program_id(0)  # b * Hq + h
    b = pid // HQ
    h = pid % HQ
    length = length_all
    if PER_SEQ_LENGTH:
        length = tl.load(lens_ptr + b)
    n_used = tl.minimum(tl.cdiv(length, split_size), n_splits)  # the splits that hold positions
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    base = pid.to(tl.int64) * n_splits
    m_run = tl.full([1], -1.0e30, tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    if SINKS:  # attention sinks: the positions the splits skipped, from their f16 copies, merged first
        hkv = h // GQA
        m_run, l_run, acc = _sink_partial(
            q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh, qk_scale,
            k_ptr + b.to(tl.int64) * stride_kb + hkv * stride_kh,
            v_ptr + b.to(tl.int64) * stride_vb + hkv * stride_vh, n_sink, length, window, cols, D, S_PAD)
    for s0 in range(0, n_used, BLOCK_S):  # online merge of BLOCK_S splits at a time
        sp = s0 + tl.arange(0, BLOCK_S)
        smask = sp < n_used
        m = tl.load(ml_ptr + (base + sp) * 2, mask=smask, other=-1.0e30)  # [BLOCK_S]
        l_part = tl.load(ml_ptr + (base + sp) * 2 + 1, mask=smask, other=0.0)
        part = tl.load(o_part_ptr + (base + sp)[:, None] * D + cols[None, :], mask=smask[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        alpha = tl.exp2(m_run - m_new)
        w = tl.exp2(m - m_new)  # [BLOCK_S]
        l_run = l_run * alpha + tl.sum(w * l_part, axis=0)
        acc = acc * alpha + tl.sum(part * w[:, None], axis=0)
        m_run = m_new
    o = acc / tl.where(l_run > 0.0, l_run, 1.0)  # [BLOCK_D]
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + cols, o.to(out_ptr.dtype.element_ty))


_SM_COUNT: dict[int, int] = {}
PROGRAMS_PER_SM = 8  # split target: about one wave of one-warp programs (see `launch_config`)
MIN_TILES_PER_SPLIT = 2  # a split of fewer tiles spends more on its start and its partial output
MAX_SINKS = 64  # attention sinks: the merge kernel holds them in registers, [S, D] per program


def sm_count(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def default_split_size(device: torch.device, n_heads: int, max_len: int, block_n: int = 64) -> int:
    """Split size for n_heads (sequence, KV head) slabs of up to max_len positions: enough splits for
    PROGRAMS_PER_SM programs per SM, each at least MIN_TILES_PER_SPLIT tiles of block_n positions
    (one tile when max_len is shorter than that)."""
    sms = sm_count(device)
    target = PROGRAMS_PER_SM * sms if sms else 8
    length = max(max_len, 1)
    n_splits = max(1, min(triton.cdiv(target, n_heads), triton.cdiv(length, MIN_TILES_PER_SPLIT * block_n)))
    return triton.cdiv(triton.cdiv(length, n_splits), block_n) * block_n


STAGED_TILE_BYTES_MAX = 10 << 10  # long splits: three pipeline stages only for tiles up to this size


def launch_config(split_size: int, block_n: int, tile_bytes: int) -> tuple[int, int]:
    """(num_warps, num_stages) of the split kernel from the split size, the tile size and the K+V bytes
    of one tile (block_n positions of one KV head): never from the batch, so a batch of verify rows runs
    the same program as the single-query decode (the same arithmetic, bit for bit).

    Short splits (one sequence spread over the GPU): four warps, three stages. Long splits (a batch, or a
    long context): one warp per program, so the softmax max does not cross warps, and eight programs an SM;
    three stages only for tiles of at most STAGED_TILE_BYTES_MAX (q4 K and V at block_n 64), since a third
    copy of a larger tile in shared memory leaves room for fewer programs. Measured on an H200
    (kernels/README.md); a register cap (maxnreg 168, twelve one-warp programs an SM) measured slower.
    """
    if split_size < 4 * block_n:
        return 4, 3
    return 1, (3 if tile_bytes <= STAGED_TILE_BYTES_MAX else 2)


def position_bytes(store: KVStore) -> int:
    """Bytes of one position of one head: values, scales, mins."""
    return sum(t.shape[-1] * t.element_size() for t in (store.qs, store.d, store.m) if t is not None)


def _check_rows_contiguous(store: KVStore, args: tuple) -> None:
    """The kernel steps from position to position of a (sequence, head) slab by the row size."""
    qs = store.qs
    if args[5] != qs.shape[3] or (store.d is not None and args[8] != store.d.shape[3]):
        raise ValueError(f"attention kernels need the positions of a {store.kv_type} store contiguous "
                         f"(strides {qs.stride()})")


def sink_sources(
    k_store: KVStore, v_store: KVStore, k_sink: torch.Tensor | None, v_sink: torch.Tensor | None,
    dummy: torch.Tensor,
) -> tuple[int, tuple, tuple]:
    """(S, (K rows, stride_b, stride_h), (V rows, ...)) for the merge kernel's sink partial: each side's
    first S positions as f16/bf16 rows of D values, from its sink copies, or from its store when that is
    unquantized (a quantized side must bring its copies). S = 0: no sinks."""
    n_sink = next((t.shape[2] for t in (k_sink, v_sink) if t is not None), 0)
    if n_sink == 0:
        return 0, (dummy, 0, 0), (dummy, 0, 0)
    if any(t is not None and t.shape[2] != n_sink for t in (k_sink, v_sink)) or n_sink > MAX_SINKS:
        raise ValueError(f"K and V sinks must keep the same number of positions, at most {MAX_SINKS}")
    sources = []
    for name, sink, store in (("K", k_sink, k_store), ("V", v_sink, v_store)):
        if sink is None and kv_type(store.kv_type).quantized:
            raise ValueError(f"a {store.kv_type} {name} store needs its sinks when the other side has them")
        sources.append(sink_args(sink, store, dummy) if sink is not None else
                       (store.qs, store.qs.stride(0), store.qs.stride(1)))  # rows of D values (checked)
    return n_sink, sources[0], sources[1]


def decode_attention(
    q: torch.Tensor, k_store: KVStore, v_store: KVStore, lengths: int | torch.Tensor, *,
    scale: float | None = None, window: int | None = None, max_length: int | None = None,
    split_size: int | None = None, block_n: int = 64, num_warps: int | None = None,
    num_stages: int | None = None, maxnreg: int | None = None, fast: bool = True,
    out: torch.Tensor | None = None, k_sink: torch.Tensor | None = None, v_sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over cache positions [0, lengths[b]) -> (B, Hq, D).

    lengths: an int (all sequences) or a (B,) int tensor; max_length bounds it (read from the
    tensor, a host sync, when not given). split_size: positions per split (a multiple of block_n);
    by default `default_split_size`. num_warps / num_stages: by default `launch_config`; maxnreg:
    a register cap per thread (none by default).
    out: an optional (B, Hq, D) tensor (any float dtype, contiguous heads) to write the result into.
    k_sink / v_sink: attention sinks, (B, Hkv, S, D) float16 copies of positions [0, S) of a side (S at
    most MAX_SINKS, the same for both), read instead of that side's store; None: the side keeps none
    (allowed for an f16/bf16 side only, whose store is read then).
    """
    bsz, hq, dim = q.shape
    if isinstance(lengths, int):
        max_len = lengths
        lens = q  # unused: the kernel takes the length as a scalar
    else:
        lens = lengths.to(device=q.device, dtype=torch.int32)
        max_len = max_length if max_length is not None else int(lens.max().item())
    hkv, gqa, ka, va = check_attention_args(q, k_store, v_store, max_len)
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
    tile_bytes = block_n * (position_bytes(k_store) + position_bytes(v_store))
    auto_warps, auto_stages = launch_config(split_size, block_n, tile_bytes)
    num_warps = num_warps or auto_warps
    num_stages = num_stages or auto_stages
    qk_scale = (scale if scale is not None else dim**-0.5) * LOG2E
    n_sink, k_rows, v_rows = sink_sources(k_store, v_store, k_sink, v_sink, q)
    direct, out, o_part, ml = split_outputs(q, n_splits, n_sink, out)
    _decode_split_kernel[(n_splits, bsz * hkv)](
        q, q.stride(0), q.stride(1), *ka[:5], *ka[6:8], *va[:5], *va[6:8], lens, max_len, o_part, ml,
        out, out.stride(0), out.stride(1), qk_scale, int(window or 0), split_size, n_splits, hkv, n_sink,
        D=dim, GQA=gqa, BLOCK_H=max(16, triton.next_power_of_2(gqa)), BLOCK_N=block_n,
        K_TYPE=ka[9], V_TYPE=va[9], PER_SEQ_LENGTH=not isinstance(lengths, int),
        FAST=fast and q.is_cuda and not interpreting(), SINKS=n_sink > 0, DIRECT=direct,
        PREFETCH=prefetch_enabled(q.device, k_store, v_store, bsz * hkv, max_len),
        PF_LINES=32 * num_warps, V_AT_OPERAND=v_at_operand(auto_warps), num_warps=num_warps,
        num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
        **pdl_launch(q.device),
    )
    if direct:
        return out
    return launch_merge(o_part, ml, q, lens if not isinstance(lengths, int) else None, max_len, split_size,
                        n_splits, qk_scale, window, gqa, n_sink, k_rows, v_rows, out)


# A launch whose cache rows [0, max_length) of every sequence and KV head (K + V, scales included) come to at
# most this many bytes prefetches them (`prefetch_enabled`); TANDEM_ATTN_PREFETCH_MB overrides it (0: never).
_PREFETCH_MAX_BYTES = float(os.environ.get("TANDEM_ATTN_PREFETCH_MB", "8")) * 2**20


def prefetch_enabled(device: torch.device, k_store: KVStore, v_store: KVStore, slabs: int,
                     max_length: int) -> bool:
    """Whether split programs ask L2 for their cache rows before waiting for the previous kernel: with PDL
    only (kernels/pdl.py: without it nothing runs before the wait), for launches whose K + V bytes of
    positions [0, max_length) in `slabs` (sequence, KV head) slabs come to at most `_PREFETCH_MAX_BYTES`,
    unless TANDEM_ATTN_PREFETCH is "0" (read at each launch).

    H200, 2026-11-27 (BENCHMARKS.md, GPU run 13): the engine's decode step (PDL, Qwen2.5-1.5B layout, 2 KV
    heads) f16 at depth 16 1159 -> 1149 us, at depth 4096 1265 -> 1249, q4_0 at 4096 1357 -> 1320, and
    with `verify_attention` prefetching the same way the 16-row verify (q4_0, 4096) 1809 -> 1785; the
    kernel alone (`kernels.bench_kv_attention --engine`, cold copies) at 16K positions: q4_0, 1 sequence
    (4.7 MB) 9.8 -> 9.0 us, but f16, 1 sequence (16.8 MB) 11.4 -> 12.6 and 16 sequences 37.5 -> 43.0 (q4_0)
    and 94 -> 120 (f16): past a few MB the requests only crowd the loads that follow."""
    kv_bytes = slabs * max_length * (position_bytes(k_store) + position_bytes(v_store))
    return (pdl_supported(device) and os.environ.get("TANDEM_ATTN_PREFETCH", "1") != "0"
            and kv_bytes <= _PREFETCH_MAX_BYTES)


def v_at_operand(split_warps: int) -> bool:
    """Where the attention kernels dequantize V's tiles for a split whose decode launch has split_warps
    warps (`launch_config`; every launch over that split, decode or verify, asks with the same number, so
    they keep the same bits): in the tensor-core operand layout for the one-warp launches, whose eight
    programs an SM an fp16 tile in shared memory would cut to five; where the bytes are loaded, the fp16
    tile then converted through shared memory, for the others (`kv_blocks._load_halves` AT_OPERAND).
    The two place the products in other slots of the tensor-core instruction, so their outputs differ in
    the last bits (GPU tests). TANDEM_ATTN_V_AT_OPERAND=1 / =0 (read at each launch) puts every launch on
    one of them, for an A/B.

    H200, 2026-11-28 (BENCHMARKS.md, session 17): at load, the engine's four-warp launches take 2-5 %
    less time (q4_0, one sequence at 4K and 16K) and the engine's steps 0.7-1.4 % less; the one-warp
    16-sequence 16K launch takes 6 % more for q4_0 and 61 % more for q8_0."""
    forced = os.environ.get("TANDEM_ATTN_V_AT_OPERAND", "")
    if forced in ("0", "1"):
        return forced == "1"
    return split_warps == 1


def check_attention_args(q: torch.Tensor, k_store: KVStore, v_store: KVStore,
                         max_len: int) -> tuple[int, int, tuple, tuple]:
    """(Hkv, GQA, K store_args, V store_args) after checking q (B, Hq, D) against the stores and max_len
    against their room; the stores' positions must be contiguous."""
    _, hq, dim = q.shape
    check_kernel_head_dim(dim)
    hkv = k_store.qs.shape[1]
    if hq % hkv or k_store.head_dim != dim or v_store.head_dim != dim:
        raise ValueError(f"q {tuple(q.shape)} does not match the stores {k_store.shape} / {v_store.shape}")
    if max_len > k_store.qs.shape[2]:
        raise ValueError(f"length {max_len} exceeds the cache's {k_store.qs.shape[2]} positions")
    ka, va = store_args(k_store), store_args(v_store)
    _check_rows_contiguous(k_store, ka)
    _check_rows_contiguous(v_store, va)
    return hkv, hq // hkv, ka, va


def check_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """The output tensor for queries q (B, Hq, D): `out` checked, or a new one like q."""
    if out is None:
        return torch.empty_like(q)  # (B, Hq, D)
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} must be {tuple(q.shape)} with a contiguous last dim")
    return out


def split_outputs(q: torch.Tensor, n_splits: int, n_sink: int, out: torch.Tensor | None):
    """(direct, out, o_part, ml) of a split launch for queries q (B, Hq, D): with one split and no sinks
    (`direct`) the split kernel writes the output itself and the partials are unused; else o_part
    (B*Hq, S, D) and ml (B*Hq, S, [max, sum]) float32 for the merge."""
    bsz, hq, dim = q.shape
    out = check_out(out, q)
    if n_splits == 1 and n_sink == 0:
        return True, out, out, out
    o_part = torch.empty(bsz * hq, n_splits, dim, dtype=torch.float32, device=q.device)  # (B*Hq, S, D)
    ml = torch.empty(bsz * hq, n_splits, 2, dtype=torch.float32, device=q.device)  # (B*Hq, S, [max, sum])
    return False, out, o_part, ml


def launch_merge(
    o_part: torch.Tensor, ml: torch.Tensor, q: torch.Tensor, lens: torch.Tensor | None, max_len: int,
    split_size: int, n_splits: int, qk_scale: float, window: int | None, gqa: int, n_sink: int,
    k_rows: tuple, v_rows: tuple, out: torch.Tensor | None,
) -> torch.Tensor:
    """Step 2: merge the splits' partials o_part (B*Hq, S, D) / ml (B*Hq, S, 2) and the sinks' partial
    -> out (B, Hq, D). lens: (B,) int32 per-sequence lengths, or None when every sequence has max_len."""
    bsz, hq, dim = q.shape
    out = check_out(out, q)
    block_d = min(dim, 32)
    _decode_reduce_kernel[(bsz * hq, dim // block_d)](
        o_part, ml, out, out.stride(0), out.stride(1), hq, n_splits, lens if lens is not None else q, max_len,
        split_size, q, q.stride(0), q.stride(1), qk_scale, int(window or 0), *k_rows, *v_rows, n_sink,
        D=dim, BLOCK_D=block_d, BLOCK_S=min(128, triton.next_power_of_2(n_splits)),
        PER_SEQ_LENGTH=lens is not None, GQA=gqa, S_PAD=triton.next_power_of_2(max(n_sink, 1)),
        SINKS=n_sink > 0, **pdl_launch(q.device),
    )
    return out
