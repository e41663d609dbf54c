"""Triton building blocks shared by the KV-cache kernels: quantize-and-store a tile of rows, load and
dequantize a tile of cached rows, and the in-register Walsh–Hadamard butterfly.

Numerics follow `engine.kv_quant` (itself bit-exact with gguf-py): float32, IEEE division
(`div_rn`), gguf-py's roundf. Launchers of the write kernels pass `enable_fp_fusion=False` so that
`x * id + 8.5` is not contracted into an FMA on the GPU (that would change rounding at ties).

KV type codes (constexpr `KV_TYPE`): 0 f16, 1 bf16, 2 q8_0, 3 q4_0, 4 q4_1 (`engine.kv_quant.KV_TYPES`).

Attention sinks (engine/kv_cache.py): a quantized K or V side may keep f16 copies of its first S
positions, a (B, Hkv, S, D) float16 tensor per side; the attention kernels then read positions < S of
that side from the copies (prefill: `_sink_rows`; decode: its merge kernel) and the reference does the
same (`attend_with_sinks_reference`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from engine.errors import SettingsError
from engine.kv_quant import KVStore, attend_quantized, attention_mask, dequantize, kv_type
from kernels.qmatmul_prefetch import prefetch_l2

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


def sink_args(sink: torch.Tensor | None, store: KVStore, dummy: torch.Tensor) -> tuple:
    """(sink, stride_b, stride_h) of a (B, Hkv, S, D) float16 sink tensor for a launcher, checked against
    its store; (dummy, 0, 0) when the side keeps no sinks."""
    if sink is None:
        return dummy, 0, 0
    b, h = store.qs.shape[:2]
    if (sink.dim() != 4 or sink.shape[:2] != (b, h) or sink.shape[3] != store.head_dim
            or sink.dtype != torch.float16 or sink.stride(3) != 1 or sink.stride(2) != store.head_dim):
        raise ValueError(f"sinks {tuple(sink.shape)} {sink.dtype} must be ({b}, {h}, S, {store.head_dim}) "
                         "float16 with contiguous (S, D) slabs")
    return sink, sink.stride(0), sink.stride(1)


def attend_with_sinks_reference(
    q: torch.Tensor, k_store: KVStore, v_store: KVStore, start_pos: int, *, scale: float | None = None,
    window: int | None = None, k_sink: torch.Tensor | None = None, v_sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """`engine.kv_quant.attend_quantized` with attention sinks: positions below S of a side with a sink
    tensor (B, Hkv, S, D) float16 are read from it instead of its store, as engine.kv_cache.KVCache reads
    them. q: (B, Hq, T, D) at [start_pos, start_pos + T) -> (B, Hq, T, D)."""
    if k_sink is None and v_sink is None:
        return attend_quantized(q, k_store, v_store, start_pos, scale=scale, window=window)
    _, hq, t, dim = q.shape
    n_keys = start_pos + t
    k = dequantize(k_store.narrow(2, 0, n_keys)).clone()  # (B, Hkv, L, D) float32, never a view of a store
    v = dequantize(v_store.narrow(2, 0, n_keys)).clone()
    for x, sink in ((k, k_sink), (v, v_sink)):
        if sink is not None:
            n = min(sink.shape[2], n_keys)
            x[:, :, :n] = sink[:, :, :n].to(torch.float32)
    group = hq // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.to(torch.float32), k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1),
        attn_mask=attention_mask(start_pos, t, n_keys, window, q.device),
        scale=scale if scale is not None else dim**-0.5,
    )  # (B, Hq, T, D)
    return out.to(q.dtype)


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


@triton.jit
def _sink_rows(x, sink_ptr, pos, n_sink, cols, D: tl.constexpr):
    """Rows of a tile x [N, D] (as `_load_rows` returns it, columns `cols`) at positions pos [N] < n_sink
    replaced by their f16 copies in a contiguous (S, D) sink slab."""
    is_sink = (pos < n_sink)[:, None]
    sink = tl.load(sink_ptr + pos.to(tl.int64)[:, None] * D + cols[None, :], mask=is_sink, other=0.0)
    return tl.where(is_sink, sink, x)


def empty_store_like(store: KVStore) -> KVStore:
    return KVStore(
        store.kv_type,
        torch.zeros_like(store.qs),
        None if store.d is None else torch.zeros_like(store.d),
        None if store.m is None else torch.zeros_like(store.m),
    )


# ---- dequantization in halves (decode attention) ----------------------------------------------------
#
# `_load_halves` returns a tile as two [N, D/2] fp16 halves without moving any value between
# columns: `lo` holds elements 32b + j and `hi` elements 32b + 16 + j (j < 16) of each 32-block b,
# which for q4 are the low and high nibbles of the same bytes. The attention dots run once per half
# (Q gathered through `_half_cols`), so no nibble is shuffled into element order.
#
# On CUDA (FAST) q4/q8 bytes become fp16 with inline PTX, four elements per call (pack=4: four bytes
# in one 32-bit register as loaded, fp16 pairs in f16x2 registers): `prmt` spreads two bytes into
# 16-bit lanes; OR-ing 0x6400 onto a lane holding x < 1024 gives the fp16 1024 + x, so
#   low nibble:  (t & 0x000F) | 0x6400 = 1024 + n,       n - 8 = that - 1032 (one sub, exact)
#   high nibble: (t & 0x00F0) | 0x6400 = 1024 + 16 n,    n - 8 = that / 16 - 72 (one fma, exact)
# and one `mul.rn` by the fp16 scale rounds once: round_fp16(d * (n - 8)), the value the portable path
# computes (q4_1: n exactly, then one fma with d and m). q8_0: 0x64 above each byte (xor 0x80 for the
# sign) = 1024 + 128 + q, minus 1152 = q. Which four elements share a call does not matter: every
# output depends only on its own element's inputs.


def _ptx_q4(affine: bool) -> str:
    """Four q4 bytes -> four low-nibble values ($0, $1) and four high-nibble values ($2, $3), f16x2 each.

    Inputs: $4 the four bytes, $5 $6 the f16x2 scales of elements (0, 1) and (2, 3); q4_1 also
    $7 $8 the mins. q4_0: d * (n - 8); q4_1: d * n + m (one fma)."""
    lo_off, hi_off = ("0x64006400", "0xD400D400") if affine else ("0x64086408", "0xD480D480")
    lines = [".reg .b32 t, lo, hi, c, c16, c1k;", "mov.b32 c16, 0x2C002C00;", f"mov.b32 c1k, {lo_off};",
             f"mov.b32 c, {hi_off};"]
    for pair, sel in ((0, "0x4140"), (1, "0x4342")):
        scale, mn = f"${5 + pair}", f"${7 + pair}"
        lines += [
            f"prmt.b32 t, $4, 0, {sel};",
            "lop3.b32 lo, t, 0x000F000F, 0x64006400, 0xEA;",
            "lop3.b32 hi, t, 0x00F000F0, 0x64006400, 0xEA;",
            "sub.rn.f16x2 lo, lo, c1k;",
            "fma.rn.f16x2 hi, hi, c16, c;",
        ]
        if affine:
            lines += [f"fma.rn.f16x2 ${pair}, lo, {scale}, {mn};",
                      f"fma.rn.f16x2 ${2 + pair}, hi, {scale}, {mn};"]
        else:
            lines += [f"mul.rn.f16x2 ${pair}, lo, {scale};", f"mul.rn.f16x2 ${2 + pair}, hi, {scale};"]
    return "{\n" + "\n".join(lines) + "\n}"


_PTX_Q4_0: tl.constexpr = tl.constexpr(_ptx_q4(False))
_PTX_Q4_1: tl.constexpr = tl.constexpr(_ptx_q4(True))
# outputs $0 $1: four q8_0 values (f16x2 each); inputs $2 four int8, $3 $4 f16x2 scales
_PTX_Q8_0: tl.constexpr = tl.constexpr("""{
.reg .b32 w, t, c;
xor.b32 w, $2, 0x80808080;
mov.b32 c, 0x64806480;
prmt.b32 t, w, 0x64646464, 0x4140;
sub.rn.f16x2 t, t, c;
mul.rn.f16x2 $0, t, $3;
prmt.b32 t, w, 0x64646464, 0x4342;
sub.rn.f16x2 t, t, c;
mul.rn.f16x2 $1, t, $4;
}""")


@triton.jit
def _half_cols(D: tl.constexpr, HI: tl.constexpr):
    """Element index (along head_dim) of each column of the lo (HI=0) or hi (HI=1) half: [D/2]."""
    c = tl.arange(0, D // 2)
    return (c // 16) * 32 + c % 16 + 16 * HI


@triton.jit
def _load_run(ptr, offs, n_valid, MASKED: tl.constexpr, other):
    """ptr[offs] where offs < n_valid (MASKED) or everywhere (not MASKED: no mask is compiled)."""
    if MASKED:
        return tl.load(ptr + offs, mask=offs < n_valid, other=other)
    return tl.load(ptr + offs)


@triton.jit
def _load_block_scales(ptr, n0, end, N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr):
    """The fp16 scale (or min) of each column of a half tile of rows [n0, n0 + N) (rows >= end: 0):
    [N, D/2]. The tile's N * D/32 scales are contiguous, so they are loaded as one run."""
    NB: tl.constexpr = D // 32
    x = _load_run(ptr, n0 * NB + tl.arange(0, N * NB), end * NB, MASKED, 0.0)
    x = tl.reshape(x, (N, NB))
    return tl.reshape(tl.broadcast_to(x[:, :, None], (N, NB, 16)), (N, D // 2))


@triton.jit
def prefetch_rows(
    qs_ptr, d_ptr, m_ptr,  # a (sequence, head) slab of a store, as `_load_halves` takes it
    start, end, D: tl.constexpr, KV_TYPE: tl.constexpr, LINES: tl.constexpr,
):
    """Ask L2 for rows [start, end) of a slab, every field (values, scales, q4_1 minima): their bytes are
    one contiguous run per field, requested LINES 128-byte lines at a time. A hint: nothing is read into
    registers, and no fault for what is not in the slab's store (the caller keeps [start, end) inside it)."""
    if KV_TYPE < 2:  # f16 / bf16: D two-byte values a row, 64 a line
        _prefetch_run(qs_ptr, start * D, end * D, 64, LINES)
    else:
        ROW: tl.constexpr = D if KV_TYPE == 2 else D // 2  # q8_0: D bytes; q4: D / 2 bytes
        _prefetch_run(qs_ptr, start * ROW, end * ROW, 128, LINES)
        _prefetch_run(d_ptr, start * (D // 32), end * (D // 32), 64, LINES)  # fp16 scales
        if KV_TYPE == 4:  # q4_1 minima
            _prefetch_run(m_ptr, start * (D // 32), end * (D // 32), 64, LINES)


@triton.jit
def _prefetch_run(ptr, lo, hi, LINE: tl.constexpr, LINES: tl.constexpr):
    """prefetch.global.L2 of elements [lo, hi) of ptr, one address per LINE elements (128 bytes)."""
    for off in range(lo, hi, LINE * LINES):
        idx = off + tl.arange(0, LINES) * LINE  # [LINES]
        prefetch_l2(ptr + tl.where(idx < hi, idx, lo))


@triton.jit
def _load_halves(
    qs_ptr, d_ptr, m_ptr,  # a (sequence, head) slab of a store: rows of D values / D/2 bytes, D/32 scales
    n0, end,  # rows [n0, n0 + N) of the slab; with MASKED, rows >= end are loaded as 0
    N: tl.constexpr, D: tl.constexpr, KV_TYPE: tl.constexpr, FAST: tl.constexpr, MASKED: tl.constexpr,
    AT_OPERAND: tl.constexpr = True,
):
    """Load N cached rows -> (lo, hi), each [N, D/2] fp16 in `_half_cols` order.

    Values are those of `_load_rows`: round_fp16(d * q) for q8_0/q4_0, fp16(d * q + m) for q4_1.
    Rows are contiguous in the slab (the caller checks the strides).
    AT_OPERAND (FAST only; where the values are computed, not what they are): True marks the inline PTX
    pure, so Triton moves it past the conversion into the tensor-core operand layout and converts the raw
    bytes (right for K, whose operand pairs adjacent bytes of a row: ldmatrix); False keeps it where the
    bytes were loaded and the fp16 tile goes through shared memory (right for V, whose operand pairs two
    rows: raw bytes would take single-byte shared-memory loads and byte permutes; kernels/README.md). The
    two give other last bits; `decode_attention.v_at_operand` picks V's place per split.
    """
    r = n0 + tl.arange(0, N)[:, None]  # [N, 1] row of each tile row
    c = tl.arange(0, D // 2)[None, :]
    e_lo = (c // 16) * 32 + c % 16  # [1, D/2] element index of each lo column; hi = e_lo + 16
    if KV_TYPE < 2:  # f16 / bf16; an offset o is in row o // D, so o < end * D masks rows >= end
        lo = _load_run(qs_ptr, r * D + e_lo, end * D, MASKED, 0.0).to(tl.float16)
        hi = _load_run(qs_ptr, r * D + 16 + e_lo, end * D, MASKED, 0.0).to(tl.float16)
    else:
        d = _load_block_scales(d_ptr, n0, end, N, D, MASKED)  # [N, D/2] fp16
        if KV_TYPE == 2:  # q8_0
            q_lo = _load_run(qs_ptr, r * D + e_lo, end * D, MASKED, 0)  # [N, D/2] int8
            q_hi = _load_run(qs_ptr, r * D + 16 + e_lo, end * D, MASKED, 0)
            if FAST:
                lo = tl.inline_asm_elementwise(_PTX_Q8_0, "=r,=r,r,r,r", [q_lo, d], dtype=tl.float16,
                                               is_pure=AT_OPERAND, pack=4)
                hi = tl.inline_asm_elementwise(_PTX_Q8_0, "=r,=r,r,r,r", [q_hi, d], dtype=tl.float16,
                                               is_pure=AT_OPERAND, pack=4)
            else:
                lo = q_lo.to(tl.float16) * d
                hi = q_hi.to(tl.float16) * d
        else:  # q4: byte 16b + j holds element 32b + j (low nibble) and 32b + 16 + j (high)
            byte = _load_run(qs_ptr, r * (D // 2) + c, end * (D // 2), MASKED, 0)  # [N, D/2] uint8
            if KV_TYPE == 3:
                if FAST:
                    lo, hi = tl.inline_asm_elementwise(_PTX_Q4_0, "=r,=r,=r,=r,r,r,r", [byte, d],
                                                       dtype=(tl.float16, tl.float16), is_pure=AT_OPERAND,
                                                       pack=4)
                else:
                    lo = ((byte & 0x0F).to(tl.int8) - 8).to(tl.float16) * d
                    hi = ((byte >> 4).to(tl.int8) - 8).to(tl.float16) * d
            else:
                mn = _load_block_scales(m_ptr, n0, end, N, D, MASKED)  # [N, D/2] fp16
                if FAST:
                    lo, hi = tl.inline_asm_elementwise(_PTX_Q4_1, "=r,=r,=r,=r,r,r,r,r,r", [byte, d, mn],
                                                       dtype=(tl.float16, tl.float16), is_pure=AT_OPERAND,
                                                       pack=4)
                else:
                    lo = d * (byte & 0x0F).to(tl.float16) + mn
                    hi = d * (byte >> 4).to(tl.float16) + mn
    return lo, hi
