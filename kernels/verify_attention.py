"""Speculative verify attention: R query rows over ONE sequence's cache, each tile of K/V read once.

A verify step asks R rows (positions p, p + 1, ..., one per draft token) to attend over the same cache,
row r over positions [0, lengths[r]). `decode_attention` can do it as R sequences sharing the store
(stride 0), but then every row's programs read and dequantize every K/V tile again: at depth 4096 that
attention took 30.5 us a layer for 16 rows against 10.0 for one (f16, H200,
kernels/bench_verify_attention.py; BENCHMARKS.md, GPU run 5). Here a program takes several (row, query head)
pairs of one (KV head, split), pair p being row p // GQA, head p % GQA (no padding heads), loads and
dequantizes each tile once and runs the pairs through the tensor cores in one of two forms (`choose_form`
picks by the launch's size and the cache types):
- tile: TILE_ROWS pairs as the rows of one 2-D tile, the decode kernel's tile with more rows, whose warps
  (the decode's launch: 4 at the engine's split sizes) share each K/V tile's dequantization and dots as the
  decode's do; best while the grid fits the GPU at once
  (4K caches: q4_0, 16 rows, 11.9 us a call against 15.2 for the form it replaced, session 14);
- packed: 16 pairs a warp, up to WARPS_PER_PROGRAM warps, as one 3-D (batched) dot, each warp a whole tile's
  work for its pairs; best for long unquantized caches, where there are more programs than run at once.

Bit for bit a decode. Row r must come out exactly as `decode_attention` computes the single query at
lengths[r] (greedy speculative decoding is lossless only then). What keeps it so:
- the same splits (`split_size`, the cache's), the same tiles (`block_n`, starting at the split start,
  or at the sink count for split 0), the same scale folding and fp16 rounding of Q, P, K and V;
- every product and sum goes through the same tensor-core instruction (mma m16n8k16: 3-D dots are never
  wgmma, nor are 2-D ones of 32 rows; 64 would be) accumulated along K in the same order, and a tile row's
  result does not depend on the other rows of the tile (which pairs share a tile or a warp changes no bit);
  the softmax sum as well (`decode_attention.row_sums`: a dot with ones, because a tl.sum's order depends
  on the warp layout, which differs between the decode tile, the 32-row tile and the 3-D batch);
- a tile past row r's end (another row of the program is longer) is masked to -inf for row r: its
  max stays, alpha is exp2(0) = 1, its P is exactly 0, so l and the output get exact zeros added;
  positions of a tile between row r's end and the longest row's end are real, finite cache values
  (written by this step), times P = 0.
Tested against `decode_attention` row by row (interpreter in CI, real shapes on the GPU).

No sliding window (rows would start their tiles at different positions), and only the shapes checked
bit-equal on the GPU (`applies`: up to 16 query heads per KV head, head_dim up to 128); the rest keep
`decode_attention`'s rows-as-sequences form, as does a launch within one split (see `verify_attention`). The
merge is `decode_attention`'s second kernel.

q: (R, Hq, D) in K's basis; stores: one cache, (1, Hkv, P, X) or the rows' view of it (R, Hkv, P, X) with
batch stride 0 (as engine.cuda_kv_cache builds them); sinks likewise, or None.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from engine.kv_quant import KVStore, kv_type
from kernels.decode_attention import (
    attend_tile,
    check_attention_args,
    decode_attention,
    launch_config,
    launch_merge,
    position_bytes,
    prefetch_enabled,
    row_sums,
    sink_sources,
    sm_count,
    split_outputs,
    v_at_operand,
)
from kernels.kv_blocks import LOG2E, _half_cols, _load_halves, interpreting, prefetch_rows
from kernels.pdl import pdl_launch, wait_for_previous

FORMS = ("tile", "packed")
TILE_ROWS = 32  # pairs a program in the tile form: a 32-row 2-D tile (64 rows would compile to wgmma)
WARPS_PER_PROGRAM = 4  # at most, packed: a warp takes 16 (row, query head) pairs
# The shapes checked bit-equal to the decode on the GPU (16-row head groups, head_dim up to 128). Larger ones
# compile (a 64-row decode tile could become wgmma, which a 3-D dot never is) but spill and are unverified.
MAX_GQA = 16
MAX_HEAD_DIM = 128


def shape_supported(gqa: int, head_dim: int) -> bool:
    """Whether this attention shape is one `verify_attention` was checked bit-equal on."""
    return gqa <= MAX_GQA and head_dim <= MAX_HEAD_DIM


def packs_heads(n_splits: int, hkv: int, device: torch.device) -> bool:
    """Whether a launch has at least as many (split, KV head) slabs as the GPU has multiprocessors (long
    caches: more programs than run at once). Without a GPU (the interpreter): no."""
    sms = sm_count(device)
    return sms is not None and n_splits * hkv >= sms


def choose_form(n_splits: int, hkv: int, device: torch.device, quantized: bool) -> str:
    """The form of a launch: "packed" for an unquantized cache (f16/bf16 K or V) where `packs_heads`, else
    "tile"; TANDEM_VERIFY_FORM, when it names a form, overrides it (for A/Bs: read at each launch, so the
    engine reads it when it captures a step).

    H200, 16 rows, us a call (`kernels.bench_verify_attention`, session 14), tile / packed: at 68 slabs (4K
    cache) q4_0 11.9 / 16.7 (session 11's packed), f16 12.3; at 132 (8K) q4_0 17.5 / 17.1, f16 17.8 / 15.4;
    at 260 (16K) q4_0 24.3 / 28.2, q8_0 30.7 / 31.5, f16 29.4 / 26.7. The engine's 16-row verify step at
    depth 4096 with tile instead of the form before it (a warp per row, 3-D): q4_0 1734 -> 1622 us, f16
    1620 -> 1578."""
    form = os.environ.get("TANDEM_VERIFY_FORM")
    if form in FORMS:
        return form
    return "packed" if not quantized and packs_heads(n_splits, hkv, device) else "tile"


def applies(n_rows: int, gqa: int, head_dim: int, window: int | None) -> bool:
    """Whether `verify_attention` takes these rows (else: decode_attention, one sequence per row)."""
    return n_rows > 1 and not window and shape_supported(gqa, head_dim)


@triton.jit
def _slab(
    kq_ptr, kd_ptr, km_ptr, stride_kh, stride_ksh, vq_ptr, vd_ptr, vm_ptr, stride_vh, stride_vsh, hkv,
    split_start, lens_ptr, n_rows, length_all, split_size,
    D: tl.constexpr, K_TYPE: tl.constexpr, V_TYPE: tl.constexpr, PREFETCH: tl.constexpr,
    PF_LINES: tl.constexpr, ROWS_MAX: tl.constexpr, PDL: tl.constexpr,
):
    """The split kernels' start: this KV head's slab of each store (the rows share sequence 0); as
    decode_attention's split kernel, the split's rows asked of L2 before the PDL wait, once per (split, KV
    head) (the first pair block asks); then the wait for the kernel before (kernels/pdl.py)."""
    kq = kq_ptr + hkv * stride_kh
    kd = kd_ptr + hkv * stride_ksh
    km = km_ptr + hkv * stride_ksh
    vq = vq_ptr + hkv * stride_vh
    vd = vd_ptr + hkv * stride_vsh
    vm = vm_ptr + hkv * stride_vsh
    if PREFETCH:
        if tl.program_id(2) == 0:
            every = tl.arange(0, ROWS_MAX)
            pf_length = tl.max(tl.load(lens_ptr + every, mask=every < n_rows, other=0), axis=0)
            pf_end = tl.minimum(tl.minimum(split_start + split_size, pf_length), length_all)
            prefetch_rows(kq, kd, km, split_start, pf_end, D, K_TYPE, PF_LINES)
            prefetch_rows(vq, vd, vm, split_start, pf_end, D, V_TYPE, PF_LINES)
    wait_for_previous(PDL)
    return kq, kd, km, vq, vd, vm


@triton.jit
def _attend_packed_tile(
    q_lo, q_hi, m_i, l_acc, acc_lo, acc_hi, kq, kd, km, vq, vd, vm, n0, pair_end, tile_end,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, K_TYPE: tl.constexpr,
    V_TYPE: tl.constexpr, FAST: tl.constexpr, MASKED: tl.constexpr, V_AT_OPERAND: tl.constexpr,
):
    """`decode_attention.attend_tile` for BLOCK_W x 16 (row, head) pairs at once: cache rows
    [n0, n0 + BLOCK_N), loads masked at tile_end (MASKED), positions >= pair_end absent for each pair
    (pair_end [BW, 16]). q_* [BW, 16, D/2] fp16, m_i [BW, 16],
    l_acc [BW, 16, 16], acc_* [BW, 16, D/2] fp32."""
    DH: tl.constexpr = D // 2
    k_lo, k_hi = _load_halves(kq, kd, km, n0, tile_end, BLOCK_N, D, K_TYPE, FAST, MASKED)  # [BN, D/2] each
    s = tl.dot(q_lo, tl.broadcast_to(tl.trans(k_lo)[None, :, :], (BLOCK_W, DH, BLOCK_N)))
    s = tl.dot(q_hi, tl.broadcast_to(tl.trans(k_hi)[None, :, :], (BLOCK_W, DH, BLOCK_N)), s)  # [BW, 16, BN]
    seen = (n0 + tl.arange(0, BLOCK_N))[None, None, :] < pair_end[:, :, None]  # [BW, 16 or 1, BN]
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=2))
    alpha = tl.exp2(m_i - m_new)  # [BW, 16]
    p16 = tl.exp2(s - m_new[:, :, None]).to(tl.float16)
    l_acc = row_sums(p16, l_acc * alpha[:, :, None], BLOCK_N, BLOCK_W)
    v_lo, v_hi = _load_halves(vq, vd, vm, n0, tile_end, BLOCK_N, D, V_TYPE, FAST, MASKED,  # [BN, D/2] each
                              V_AT_OPERAND)
    a = alpha[:, :, None]
    acc_lo = tl.dot(p16, tl.broadcast_to(v_lo[None, :, :], (BLOCK_W, BLOCK_N, DH)), acc_lo * a)
    acc_hi = tl.dot(p16, tl.broadcast_to(v_hi[None, :, :], (BLOCK_W, BLOCK_N, DH)), acc_hi * a)
    return m_new, l_acc, acc_lo, acc_hi


@triton.jit
def _tile_split_kernel(
    q_ptr, stride_qr, stride_qh,
    kq_ptr, kd_ptr, km_ptr, stride_kh, stride_ksh,
    vq_ptr, vd_ptr, vm_ptr, stride_vh, stride_vsh,
    lens_ptr, n_rows, length_all, o_ptr, ml_ptr,
    qk_scale, split_size, n_splits, HKV, n_sink,
    D: tl.constexpr, GQA: tl.constexpr, BLOCK_N: tl.constexpr, TILE: tl.constexpr,
    K_TYPE: tl.constexpr, V_TYPE: tl.constexpr, FAST: tl.constexpr, SINKS: tl.constexpr, PDL: tl.constexpr,
    PREFETCH: tl.constexpr, PF_LINES: tl.constexpr, ROWS_MAX: tl.constexpr, V_AT_OPERAND: tl.constexpr,
):
    """The "tile" form: TILE (row, query head) pairs of one (split, KV head) as the rows of one 2-D tile, so
    the program's warps share each tile's work as the decode kernel's warps do."""
    pid_s = tl.program_id(0)
    hkv = tl.program_id(1)
    kq, kd, km, vq, vd, vm = _slab(
        kq_ptr, kd_ptr, km_ptr, stride_kh, stride_ksh, vq_ptr, vd_ptr, vm_ptr, stride_vh, stride_vsh, hkv,
        pid_s * split_size, lens_ptr, n_rows, length_all, split_size, D, K_TYPE, V_TYPE, PREFETCH, PF_LINES,
        ROWS_MAX, PDL)
    pair = tl.program_id(2) * TILE + tl.arange(0, TILE)  # [T] pair p: row p // GQA, head p % GQA
    r = pair // GQA
    head = pair % GQA
    p_mask = r < n_rows
    heads = hkv * GQA + head
    length = tl.load(lens_ptr + r, mask=p_mask, other=0)  # [T]
    split_start = pid_s * split_size
    if split_start >= tl.max(length, axis=0):
        return  # past every row's end: the merge never reads these splits
    cols_lo = _half_cols(D, 0)
    cols_hi = _half_cols(D, 1)
    q_rows = q_ptr + (r.to(tl.int64) * stride_qr + heads * stride_qh)[:, None]  # [T, 1]
    q_lo = tl.load(q_rows + cols_lo[None, :], mask=p_mask[:, None], other=0.0).to(tl.float32)
    q_hi = tl.load(q_rows + cols_hi[None, :], mask=p_mask[:, None], other=0.0).to(tl.float32)
    q_lo = (q_lo * qk_scale).to(tl.float16)  # [T, D/2], softmax scale and log2(e) folded in
    q_hi = (q_hi * qk_scale).to(tl.float16)

    start = split_start
    if SINKS:
        start = tl.maximum(start, n_sink)  # positions < n_sink: the merge reads their f16 copies
    pair_end = tl.minimum(split_start + split_size, length)  # [T]
    tile_end = tl.max(pair_end, axis=0)

    m_i = tl.full((TILE,), -1.0e30, tl.float32)
    l_acc = tl.zeros((TILE, 16), tl.float32)
    acc_lo = tl.zeros((TILE, D // 2), tl.float32)
    acc_hi = tl.zeros((TILE, D // 2), tl.float32)
    n_full = start + (tl.maximum(tile_end - start, 0) // BLOCK_N) * BLOCK_N
    for n0 in range(start, n_full, BLOCK_N):
        m_i, l_acc, acc_lo, acc_hi = attend_tile(  # the decode's tile step, each pair masked at its end
            q_lo, q_hi, m_i, l_acc, acc_lo, acc_hi, kq, kd, km, vq, vd, vm, n0, tile_end, pair_end[:, None],
            D, BLOCK_N, K_TYPE, V_TYPE, FAST, False, True, V_AT_OPERAND)
    if n_full < tile_end:
        m_i, l_acc, acc_lo, acc_hi = attend_tile(
            q_lo, q_hi, m_i, l_acc, acc_lo, acc_hi, kq, kd, km, vq, vd, vm, n_full, tile_end,
            pair_end[:, None], D, BLOCK_N, K_TYPE, V_TYPE, FAST, True, True, V_AT_OPERAND)

    part = (r * (HKV * GQA) + heads).to(tl.int64) * n_splits + pid_s  # [T]
    tl.store(o_ptr + part[:, None] * D + cols_lo[None, :], acc_lo, mask=p_mask[:, None])
    tl.store(o_ptr + part[:, None] * D + cols_hi[None, :], acc_hi, mask=p_mask[:, None])
    tl.store(ml_ptr + part * 2, m_i, mask=p_mask)
    tl.store(ml_ptr + part * 2 + 1, tl.max(l_acc, axis=1), mask=p_mask)


@triton.jit
def _packed_split_kernel(
    q_ptr, stride_qr, stride_qh,
    kq_ptr, kd_ptr, km_ptr, stride_kh, stride_ksh,
    vq_ptr, vd_ptr, vm_ptr, stride_vh, stride_vsh,
    lens_ptr, n_rows, length_all, o_ptr, ml_ptr,
    qk_scale, split_size, n_splits, HKV, n_sink,
    D: tl.constexpr, GQA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    K_TYPE: tl.constexpr, V_TYPE: tl.constexpr, FAST: tl.constexpr, SINKS: tl.constexpr, PDL: tl.constexpr,
    PREFETCH: tl.constexpr, PF_LINES: tl.constexpr, ROWS_MAX: tl.constexpr, V_AT_OPERAND: tl.constexpr,
):
    """The "packed" form: BLOCK_W warps, 16 (row, query head) pairs each, as one 3-D (batched) dot."""
    pid_s = tl.program_id(0)
    hkv = tl.program_id(1)
    kq, kd, km, vq, vd, vm = _slab(
        kq_ptr, kd_ptr, km_ptr, stride_kh, stride_ksh, vq_ptr, vd_ptr, vm_ptr, stride_vh, stride_vsh, hkv,
        pid_s * split_size, lens_ptr, n_rows, length_all, split_size, D, K_TYPE, V_TYPE, PREFETCH, PF_LINES,
        ROWS_MAX, PDL)
    # The (row, query head) pairs of this program, 16 a warp: the 16 rows of each warp's tensor-core tile;
    # pair p is row p // GQA, head p % GQA.
    pair = tl.program_id(2) * (BLOCK_W * 16) + tl.arange(0, BLOCK_W)[:, None] * 16 + tl.arange(0, 16)[None, :]
    r = pair // GQA  # [BW, 16]
    head = pair % GQA  # [BW, 16]
    p_mask = r < n_rows
    heads = hkv * GQA + head  # query head of each pair
    length = tl.load(lens_ptr + r, mask=p_mask, other=0)  # [BW, 16]
    split_start = pid_s * split_size
    if split_start >= tl.max(tl.max(length, axis=1), axis=0):
        return  # past every row's end: the merge never reads these splits
    cols_lo = _half_cols(D, 0)  # [D/2], as in decode_attention
    cols_hi = _half_cols(D, 1)
    q_rows = q_ptr + (r.to(tl.int64) * stride_qr + heads * stride_qh)[:, :, None]  # [BW, 16, 1]
    q_mask = p_mask[:, :, None]
    q_lo = tl.load(q_rows + cols_lo[None, None, :], mask=q_mask, other=0.0).to(tl.float32)
    q_hi = tl.load(q_rows + cols_hi[None, None, :], mask=q_mask, other=0.0).to(tl.float32)
    q_lo = (q_lo * qk_scale).to(tl.float16)  # [BW, 16, D/2], softmax scale and log2(e) folded in
    q_hi = (q_hi * qk_scale).to(tl.float16)

    start = split_start
    if SINKS:
        start = tl.maximum(start, n_sink)  # positions < n_sink: the merge reads their f16 copies
    pair_end = tl.minimum(split_start + split_size, length)  # as length
    tile_end = tl.max(tl.max(pair_end, axis=1), axis=0)

    m_i = tl.full((BLOCK_W, 16), -1.0e30, tl.float32)
    l_acc = tl.zeros((BLOCK_W, 16, 16), tl.float32)
    acc_lo = tl.zeros((BLOCK_W, 16, D // 2), tl.float32)
    acc_hi = tl.zeros((BLOCK_W, 16, D // 2), tl.float32)
    n_full = start + (tl.maximum(tile_end - start, 0) // BLOCK_N) * BLOCK_N
    for n0 in range(start, n_full, BLOCK_N):
        m_i, l_acc, acc_lo, acc_hi = _attend_packed_tile(
            q_lo, q_hi, m_i, l_acc, acc_lo, acc_hi, kq, kd, km, vq, vd, vm, n0, pair_end, tile_end,
            D, BLOCK_N, BLOCK_W, K_TYPE, V_TYPE, FAST, False, V_AT_OPERAND)
    if n_full < tile_end:
        m_i, l_acc, acc_lo, acc_hi = _attend_packed_tile(
            q_lo, q_hi, m_i, l_acc, acc_lo, acc_hi, kq, kd, km, vq, vd, vm, n_full, pair_end, tile_end,
            D, BLOCK_N, BLOCK_W, K_TYPE, V_TYPE, FAST, True, V_AT_OPERAND)

    o_mask = p_mask[:, :, None]
    part = (r * (HKV * GQA) + heads).to(tl.int64) * n_splits + pid_s  # [BW, 16]
    tl.store(o_ptr + part[:, :, None] * D + cols_lo[None, None, :], acc_lo, mask=o_mask)
    tl.store(o_ptr + part[:, :, None] * D + cols_hi[None, None, :], acc_hi, mask=o_mask)
    tl.store(ml_ptr + part * 2, m_i, mask=p_mask)
    tl.store(ml_ptr + part * 2 + 1, tl.max(l_acc, axis=2), mask=p_mask)


def verify_attention(
    q: torch.Tensor, k_store: KVStore, v_store: KVStore, lengths: torch.Tensor, *, max_length: int,
    split_size: int, scale: float | None = None, block_n: int = 64, warps_per_program: int | None = None,
    fast: bool = True, out: torch.Tensor | None = None, k_sink: torch.Tensor | None = None,
    v_sink: torch.Tensor | None = None, form: str | None = None, tile_rows: int | None = None,
) -> torch.Tensor:
    """Row r of q (R, Hq, D) attends to positions [0, lengths[r]) of one cache -> (R, Hq, D), equal bit for
    bit to `decode_attention` of that row with the same split_size and block_n. The stores (and sinks) are
    that cache as (1, Hkv, P, X) or already seen as R rows sharing it (batch stride 0). lengths: (R,) int32
    on q's device (0: a padding row, output 0); max_length bounds them (no host read). form: how programs
    take the (row, query head) pairs (None: `choose_form`): "tile", tile_rows of them (16 or 32, default
    TILE_ROWS) a program in one 2-D tile, with the decode kernel's warps and stages; "packed", 16 a warp and
    warps_per_program warps a program at most (a power of two, default WARPS_PER_PROGRAM).
    Other arguments as decode_attention (no window); `applies` says which shapes this path is for.

    A launch within one split (max_length <= split_size: the engine's short steps, the first 128 positions
    on an H200) runs `decode_attention` with the rows as sequences instead: its programs, one per (row, KV
    head), are 4x as many and re-read at most one split each. H200, random-weight Qwen2.5-1.5B layout, depth
    1, `profile_decode_gpu --pdl --ab TANDEM_VERIFY_ATTENTION`, us a step with this kernel / the decode's:
    q4_0 16 rows 1559 / 1434, 4 rows 1389 / 1302, f16 16 rows 1331 / 1290; at depth 4096 (34 splits) this
    kernel wins, 1749 / 1858 and 1640 / 2005 (BENCHMARKS.md, session 12)."""
    n_rows, hq, dim = q.shape
    k_store, v_store, k_sink, v_sink = (
        x.shared_by(n_rows) if isinstance(x, KVStore) and x.qs.shape[0] == 1
        else x.expand(n_rows, *x.shape[1:]) if isinstance(x, torch.Tensor) and x.shape[0] == 1 else x
        for x in (k_store, v_store, k_sink, v_sink))
    for name, t in (("K store", k_store.qs), ("V store", v_store.qs), ("K sink", k_sink), ("V sink", v_sink)):
        if t is not None and (t.shape[0] != n_rows or (n_rows > 1 and t.stride(0) != 0)):
            raise ValueError(f"verify_attention needs the {n_rows} rows to share one cache: the {name} is "
                             f"{tuple(t.shape)} with batch stride {t.stride(0)}")
    hkv, gqa, ka, va = check_attention_args(q, k_store, v_store, max_length)
    if not shape_supported(gqa, dim):
        raise ValueError(f"verify_attention takes up to {MAX_GQA} query heads per KV head and head_dim up to "
                         f"{MAX_HEAD_DIM}, not {gqa} and {dim}")
    if split_size % block_n or block_n < 32:
        raise ValueError(f"split_size {split_size} must be a multiple of block_n {block_n} (>= 32)")
    wpp = warps_per_program
    if wpp is not None and (wpp < 1 or wpp & (wpp - 1)):
        raise ValueError(f"warps_per_program must be a power of two, got {warps_per_program}")
    lens = lengths.to(device=q.device, dtype=torch.int32)
    if q.stride(-1) != 1:
        q = q.contiguous()
    n_splits = max(1, triton.cdiv(max_length, split_size))
    if n_splits == 1:  # within one split: the decode kernel, a row a sequence (the same bits), is faster
        return decode_attention(q, k_store, v_store, lens, scale=scale, max_length=max_length,
                                split_size=split_size, block_n=block_n, fast=fast, out=out, k_sink=k_sink,
                                v_sink=v_sink)
    quantized = kv_type(k_store.kv_type).quantized and kv_type(v_store.kv_type).quantized
    form = form or choose_form(n_splits, hkv, q.device, quantized)
    if form not in FORMS:
        raise ValueError(f"verify_attention form must be one of {FORMS}, got {form!r}")
    tile = tile_rows or TILE_ROWS
    if tile not in (16, 32):
        raise ValueError(f"tile_rows must be 16 or 32, got {tile_rows}")
    qk_scale = (scale if scale is not None else dim**-0.5) * LOG2E
    n_sink, k_rows, v_rows = sink_sources(k_store, v_store, k_sink, v_sink, q)
    _, out, o_part, ml = split_outputs(q, n_splits, n_sink, out)  # two splits or more: partials, a merge
    prefetch = prefetch_enabled(q.device, k_store, v_store, hkv, max_length)  # the rows share the slabs
    fast = fast and q.is_cuda and not interpreting()
    rows_max = max(16, triton.next_power_of_2(n_rows))
    n_pairs = n_rows * gqa
    tile_bytes = block_n * (position_bytes(k_store) + position_bytes(v_store))
    num_warps, num_stages = launch_config(split_size, block_n, tile_bytes)  # the decode's, for this split
    v_at = v_at_operand(num_warps)  # as the decode over this split (the same bits)
    if form == "tile":  # (row, query head) pairs of a KV head, `tile` a program in one 2-D tile
        tile = min(tile, max(16, triton.next_power_of_2(n_pairs)))
        _tile_split_kernel[(n_splits, hkv, triton.cdiv(n_pairs, tile))](
            q, q.stride(0), q.stride(1), *ka[:3], ka[4], ka[7], *va[:3], va[4], va[7], lens, n_rows,
            max_length, o_part, ml, qk_scale, split_size, n_splits, hkv, n_sink,
            D=dim, GQA=gqa, BLOCK_N=block_n, TILE=tile, K_TYPE=ka[9], V_TYPE=va[9], FAST=fast,
            SINKS=n_sink > 0, PREFETCH=prefetch, PF_LINES=32 * num_warps, ROWS_MAX=rows_max,
            V_AT_OPERAND=v_at, num_warps=num_warps, num_stages=num_stages, **pdl_launch(q.device),
        )
        return launch_merge(o_part, ml, q, lens, max_length, split_size, n_splits, qk_scale, None, gqa,
                            n_sink, k_rows, v_rows, out)
    # packed: (row, query head) pairs of a KV head, 16 a warp, warps_per_program warps a program
    block_w = min(wpp or WARPS_PER_PROGRAM, triton.next_power_of_2(triton.cdiv(n_pairs, 16)))
    _packed_split_kernel[(n_splits, hkv, triton.cdiv(n_pairs, 16 * block_w))](
        q, q.stride(0), q.stride(1), *ka[:3], ka[4], ka[7], *va[:3], va[4], va[7], lens, n_rows, max_length,
        o_part, ml, qk_scale, split_size, n_splits, hkv, n_sink,
        D=dim, GQA=gqa, BLOCK_N=block_n, BLOCK_W=block_w,
        K_TYPE=ka[9], V_TYPE=va[9],
        FAST=fast, SINKS=n_sink > 0, num_warps=block_w, num_stages=2,
        PREFETCH=prefetch, PF_LINES=32 * block_w, ROWS_MAX=rows_max, V_AT_OPERAND=v_at,
        **pdl_launch(q.device),
    )
    return launch_merge(o_part, ml, q, lens, max_length, split_size, n_splits, qk_scale, None, gqa, n_sink,
                        k_rows, v_rows, out)


