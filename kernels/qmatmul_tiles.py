"""Dequantizers of `kernels.qmatmul`: one K-tile of GGUF blocks -> weight values in registers.

A K-tile is NG "groups" of BLOCK_N weight rows (one Q4_0 block, half a Q4_K super-block chunk pair,
half a Q6_K super-block); each group comes as a low half and a high half (the low and high nibbles of
the same bytes) so nibbles are never shuffled into K order; `k_index` gives the K positions.
Two dequantizers: inline PTX on fp16 pairs (CUDA, fp16 activations, FAST_TYPES of qmatmul) and a
portable float32 one (everything else, the interpreter).
"""

from __future__ import annotations

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# Fast path (CUDA, fp16 activations): inline PTX that turns pairs of quant bytes into fp16 pairs.
#
# `prmt` with 0x64 bytes builds the fp16 bit pattern 0x64XX = 1024 + XX for each byte XX < 256
# (exact); subtracting 1024 + offset is exact too, so (q - offset) is exact in fp16 and the one
# `mul.rn` by the fp16 scale rounds once: round_fp16(d * (q - 8)), the same value as rounding
# gguf-py's float32 weight to fp16 (that product is exact in float32). Q4_1/Q4_K: one `fma.rn`
# of the exact q with the fp16 scale and offset (for Q4_K d * sc and dmin * m are rounded to fp16
# first: an absolute error of 2^-12 of the sub-block's scale, below the fp16 rounding of the
# weights themselves). Q6_K and Q8_0 the same way (q - 32, or the int8 byte ^ 0x80 - 128).
#
# Two elements per call (pack=2): u8/i8 inputs arrive in one 32-bit register (bytes 0 and 1),
# fp16 inputs and outputs as one f16x2 register each; every output depends only on its own
# element's inputs, so it does not matter which two elements Triton groups. The tensor-core
# operand layout gives each thread pairs of adjacent values, which arrive as one 16-bit
# shared-memory load (pack=4 cost ~1.5 extra PRMT per weight to glue pairs together).
# Measured with ptxas (sm_90), GEMV loop instructions per weight and thread, float32 path -> this
# one: Q4_0 7.3 -> 4.0, Q6_K 12.0 -> 6.4. The kernel is instruction-bound, not memory-bound.
# `t` = the two bytes in 16-bit lanes.
_BYTES_TO_LANES = "prmt.b32 t, $2, 0, 0x4140;\n"
# 1024 + low nibble, 1024 + high nibble in each lane
_NIBBLES = """
lop3.b32 lo, t, 0x000F000F, 0x64006400, 0xEA;
shr.u32 hi, t, 4;
lop3.b32 hi, hi, 0x000F000F, 0x64006400, 0xEA;
"""


def _to_values(bias: str, scale_lo: str, scale_hi: str) -> str:
    """The common tail: the lo / hi lanes hold 1024 + q; subtract the fp16 pair `bias` (1024 + offset,
    exact), run `scale_lo` / `scale_hi` (the fp16x2 mul or fma that scales each), write them to $0, $1."""
    return (f"mov.b32 c, {bias};\nsub.rn.f16x2 lo, lo, c;\nsub.rn.f16x2 hi, hi, c;\n"
            f"{scale_lo};\n{scale_hi};\nmov.b32 $0, lo;\nmov.b32 $1, hi;\n}}")


# outputs $0 (low nibbles), $1 (high), fp16x2; inputs $2 two bytes, $3 fp16 d
_ASM_Q4_SYM: tl.constexpr = tl.constexpr(
    "{\n.reg .b32 t, lo, hi, c;\n" + _BYTES_TO_LANES + _NIBBLES + "\n"
    + _to_values("0x64086408", "mul.rn.f16x2 lo, lo, $3", "mul.rn.f16x2 hi, hi, $3"))
# outputs as above; inputs $2 two bytes, $3 scale and $4 offset of the low values, $5 $6 of the high
_ASM_Q4_AFFINE: tl.constexpr = tl.constexpr(
    "{\n.reg .b32 t, lo, hi, c;\n" + _BYTES_TO_LANES + _NIBBLES + "\n"
    + _to_values("0x64006400", "fma.rn.f16x2 lo, lo, $3, $4", "fma.rn.f16x2 hi, hi, $5, $6"))
# output $0; inputs $1 two int8, $2 fp16 d. 0x64 | (byte ^ 0x80) = 1024 + q + 128.
_ASM_Q8: tl.constexpr = tl.constexpr("""{
.reg .b32 t, c;
prmt.b32 t, $1, 0x64646464, 0x4140;
xor.b32 t, t, 0x00800080;
mov.b32 c, 0x64806480;
sub.rn.f16x2 t, t, c;
mul.rn.f16x2 $0, t, $2;
}""")


def _q6_asm(part: int) -> str:
    """Q6_K, bytes j of part 0 (j < 32) or 1 (j >= 32) of a half super-block: the low values take
    the qh bits at shift 0 / 2, the high values at 4 / 6, moved to bits 4..5 of each lane.
    Outputs $0 (low), $1 (high); inputs $2 two ql bytes, $3 two qh bytes, $4 / $5 fp16 d * scale."""
    if part == 0:
        high_bits = "shl.b32 hl, u, 4;\nmov.b32 hh, u;\n"
    else:
        high_bits = "shl.b32 hl, u, 2;\nshr.u32 hh, u, 2;\n"
    return ("{\n.reg .b32 t, u, hl, hh, lo, hi, c;\n" + _BYTES_TO_LANES + "prmt.b32 u, $3, 0, 0x4140;\n"
            + high_bits + """
lop3.b32 hl, hl, 0x00300030, 0x64006400, 0xEA;
lop3.b32 hh, hh, 0x00300030, 0x64006400, 0xEA;
lop3.b32 lo, t, 0x000F000F, hl, 0xEA;
shr.u32 hi, t, 4;
lop3.b32 hi, hi, 0x000F000F, hh, 0xEA;
""" + _to_values("0x64206420", "mul.rn.f16x2 lo, lo, $4", "mul.rn.f16x2 hi, hi, $5"))


_ASM_Q6_PART0: tl.constexpr = tl.constexpr(_q6_asm(0))
_ASM_Q6_PART1: tl.constexpr = tl.constexpr(_q6_asm(1))


@triton.jit
def _asm_q4_sym(b, d):
    """u8 nibble pairs, fp16 d -> fp16 (d * (lo - 8), d * (hi - 8))."""
    return tl.inline_asm_elementwise(_ASM_Q4_SYM, "=r,=r,r,r", [b, d],
                                     dtype=(tl.float16, tl.float16), is_pure=True, pack=2)


@triton.jit
def _asm_q4_affine(b, s_lo, o_lo, s_hi, o_hi):
    """u8 nibble pairs -> fp16 (lo * s_lo + o_lo, hi * s_hi + o_hi), one rounding each."""
    return tl.inline_asm_elementwise(_ASM_Q4_AFFINE, "=r,=r,r,r,r,r,r", [b, s_lo, o_lo, s_hi, o_hi],
                                     dtype=(tl.float16, tl.float16), is_pure=True, pack=2)


@triton.jit
def _asm_q8(b, d):
    """int8 q, fp16 d -> fp16 d * q."""
    return tl.inline_asm_elementwise(_ASM_Q8, "=r,r,r", [b, d], dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _asm_q6(ql, qh, d_lo, d_hi, ASM: tl.constexpr):
    """Q6_K ql / qh bytes, fp16 d * scale of the low and high values -> fp16 (low, high)."""
    return tl.inline_asm_elementwise(ASM, "=r,=r,r,r,r,r", [ql, qh, d_lo, d_hi],
                                     dtype=(tl.float16, tl.float16), is_pure=True, pack=2)


# ---------------------------------------------------------------------------------------------
# Triton: dequantize one K-tile of BLOCK_N weight rows into a low-half and a high-half tile
# (float32 on the portable path, fp16 on the fast path)


@triton.jit
def _exact_float(q, OFFSET: tl.constexpr):
    """int32 0 <= q < 2**22 -> float32 (q - OFFSET), exact, without the slow int->float convert.

    The float whose bits are 0x4B000000 | q is 2**23 + q.
    """
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def _tile_q4_q5(q_ptr, h_ptr, d_ptr, m_ptr, sq, sh, sd, sm, rows, row_mask, gi, g_mask,
                HAS_MIN: tl.constexpr, HAS_HIGH: tl.constexpr, FAST: tl.constexpr):
    """Q4_0/Q4_1/Q5_0/Q5_1: group = one 32-block; byte j's low nibble is element j, high j + 16."""
    j = tl.arange(0, 16)
    mask2 = row_mask[:, None] & g_mask[None, :]  # [BN, NG]
    b8 = tl.load(q_ptr + rows[:, None, None] * sq + gi[None, :, None] * 16 + j[None, None, :],
                 mask=mask2[:, :, None], other=0)  # [BN, NG, 16] uint8
    if FAST:  # Q4_0 / Q4_1 with fp16 activations
        d16 = tl.load(d_ptr + rows[:, None] * sd + gi[None, :], mask=mask2, other=0.0)[:, :, None]
        if HAS_MIN:
            m16 = tl.load(m_ptr + rows[:, None] * sm + gi[None, :], mask=mask2, other=0.0)[:, :, None]
            w_lo, w_hi = _asm_q4_affine(b8, d16, m16, d16, m16)
        else:
            w_lo, w_hi = _asm_q4_sym(b8, d16)
    else:
        w_lo, w_hi = _q4_q5_f32(b8.to(tl.int32), h_ptr, d_ptr, m_ptr, sh, sd, sm, rows, gi, mask2, j,
                                HAS_MIN, HAS_HIGH)
    return w_lo, w_hi


@triton.jit
def _q4_q5_f32(b, h_ptr, d_ptr, m_ptr, sh, sd, sm, rows, gi, mask2, j, HAS_MIN: tl.constexpr,
               HAS_HIGH: tl.constexpr):
    """The portable float32 dequantization of `_tile_q4_q5` (interpreter, bf16, Q5_0/Q5_1)."""
    lo = b & 15
    hi = b >> 4
    if HAS_HIGH:  # bit j of the block's u32 is element j's fifth bit
        qh = tl.load(h_ptr + rows[:, None] * sh + gi[None, :], mask=mask2, other=0)[:, :, None]  # [BN, NG, 1]
        lo = lo | (((qh >> j[None, None, :]) & 1) << 4)
        hi = hi | (((qh >> (j[None, None, :] + 16)) & 1) << 4)
    d = tl.load(d_ptr + rows[:, None] * sd + gi[None, :], mask=mask2, other=0.0).to(tl.float32)[:, :, None]
    if HAS_MIN:  # d * q + m
        mn = tl.load(m_ptr + rows[:, None] * sm + gi[None, :], mask=mask2, other=0.0)
        mn = mn.to(tl.float32)[:, :, None]
        w_lo = d * _exact_float(lo, 0) + mn
        w_hi = d * _exact_float(hi, 0) + mn
    else:  # d * (q - 8), or d * (q - 16) with the fifth bit
        offset: tl.constexpr = 16 if HAS_HIGH else 8
        w_lo = d * _exact_float(lo, offset)
        w_hi = d * _exact_float(hi, offset)
    return w_lo, w_hi


@triton.jit
def _tile_q8_0(q_ptr, d_ptr, sq, sd, rows, row_mask, gi, g_mask, FAST: tl.constexpr):
    """Q8_0: group = one 32-block, low half = its first 16 int8 values, high half the last 16."""
    j = tl.arange(0, 16)
    mask2 = row_mask[:, None] & g_mask[None, :]  # [BN, NG]
    ptr = q_ptr + rows[:, None, None] * sq + gi[None, :, None] * 32 + j[None, None, :]
    lo8 = tl.load(ptr, mask=mask2[:, :, None], other=0)  # [BN, NG, 16] int8
    hi8 = tl.load(ptr + 16, mask=mask2[:, :, None], other=0)
    d16 = tl.load(d_ptr + rows[:, None] * sd + gi[None, :], mask=mask2, other=0.0)[:, :, None]  # [BN, NG, 1]
    if FAST:
        w_lo = _asm_q8(lo8, d16)
        w_hi = _asm_q8(hi8, d16)
    else:
        d = d16.to(tl.float32)
        w_lo = d * _exact_float(lo8.to(tl.int32) + 128, 128)
        w_hi = d * _exact_float(hi8.to(tl.int32) + 128, 128)
    return w_lo, w_hi


@triton.jit
def _k_scale_min(s_ptr, ss, rows, sb, sub, mask2):
    """Q4_K/Q5_K: the 6-bit scale and min of sub-block `sub` (0..7) of super-block `sb`: [BN, NG] int32.

    12 bytes: d[0:4], m[4:8], md[8:12]; sub < 4: d[sub] & 63, m[sub] & 63;
    sub >= 4: (md & 15) | (d >> 6) << 4, (md >> 4) | (m >> 6) << 4 with d, m, md at sub - 4.
    """
    base = s_ptr + rows[:, None] * ss + sb[None, :] * 12  # [BN, NG]
    jm = (sub % 4)[None, :]
    b_d = tl.load(base + jm, mask=mask2, other=0).to(tl.int32)
    b_m = tl.load(base + 4 + jm, mask=mask2, other=0).to(tl.int32)
    b_md = tl.load(base + 8 + jm, mask=mask2, other=0).to(tl.int32)
    low = (sub < 4)[None, :]
    sc = tl.where(low, b_d & 63, (b_md & 15) | ((b_d >> 2) & 0x30))
    mn = tl.where(low, b_m & 63, (b_md >> 4) | ((b_m >> 2) & 0x30))
    return sc, mn


@triton.jit
def _tile_q4_k_q5_k(q_ptr, h_ptr, s_ptr, d_ptr, m_ptr, sq, sh, ss, sd, sm, rows, row_mask, gi, g_mask,
                    HAS_HIGH: tl.constexpr, FAST: tl.constexpr):
    """Q4_K/Q5_K: group c (0..3) of a super-block = 32 bytes; low nibbles are sub-block 2c, high 2c + 1."""
    j = tl.arange(0, 32)
    mask2 = row_mask[:, None] & g_mask[None, :]  # [BN, NG]
    sb = gi // 4  # super-block of each group  [NG]
    c = gi % 4
    b8 = tl.load(q_ptr + rows[:, None, None] * sq + gi[None, :, None] * 32 + j[None, None, :],
                 mask=mask2[:, :, None], other=0)  # [BN, NG, 32] uint8
    b = b8.to(tl.int32)
    lo = b & 15
    hi = b >> 4
    if HAS_HIGH:  # bit s of qh[j] is the fifth bit of element j of sub-block s
        qh = tl.load(h_ptr + rows[:, None, None] * sh + sb[None, :, None] * 32 + j[None, None, :],
                     mask=mask2[:, :, None], other=0).to(tl.int32)  # [BN, NG, 32]
        shift = (2 * c)[None, :, None]
        lo = lo | (((qh >> shift) & 1) << 4)
        hi = hi | (((qh >> (shift + 1)) & 1) << 4)
    sc_lo, mn_lo = _k_scale_min(s_ptr, ss, rows, sb, 2 * c, mask2)
    sc_hi, mn_hi = _k_scale_min(s_ptr, ss, rows, sb, 2 * c + 1, mask2)
    d = tl.load(d_ptr + rows[:, None] * sd + sb[None, :], mask=mask2, other=0.0).to(tl.float32)  # [BN, NG]
    dmin = tl.load(m_ptr + rows[:, None] * sm + sb[None, :], mask=mask2, other=0.0).to(tl.float32)
    # d * sc and dmin * m are exact in float32 (11 x 6 bits), as in the reference.
    dl_lo = (d * sc_lo.to(tl.float32))[:, :, None]
    dl_hi = (d * sc_hi.to(tl.float32))[:, :, None]
    ml_lo = (dmin * mn_lo.to(tl.float32))[:, :, None]
    ml_hi = (dmin * mn_hi.to(tl.float32))[:, :, None]
    if FAST:  # Q4_K with fp16 activations
        w_lo, w_hi = _asm_q4_affine(b8, dl_lo.to(tl.float16), (-ml_lo).to(tl.float16), dl_hi.to(tl.float16),
                                    (-ml_hi).to(tl.float16))
    else:
        w_lo = dl_lo * _exact_float(lo, 0) - ml_lo
        w_hi = dl_hi * _exact_float(hi, 0) - ml_hi
    return w_lo, w_hi


@triton.jit
def _tile_q6_k(q_ptr, h_ptr, s_ptr, d_ptr, sq, sh, ss, sd, rows, row_mask, gi, g_mask):
    """Q6_K: group = half a super-block (128 values): ql byte j (0..63) holds element j (low nibble)
    and 64 + j (high); their top 2 bits are in qh[j % 32] at shifts 2 * (j // 32) and 4 + that.
    Sub-blocks of 16 have an int8 scale each: a [BN, NG, 4, 16] tile per half."""
    a = tl.arange(0, 4)
    e = tl.arange(0, 16)
    jj = a[:, None] * 16 + e[None, :]  # [4, 16] byte j
    mask2 = row_mask[:, None] & g_mask[None, :]  # [BN, NG]
    mask4 = mask2[:, :, None, None]
    ql = tl.load(q_ptr + rows[:, None, None, None] * sq + gi[None, :, None, None] * 64 + jj[None, None, :, :],
                 mask=mask4, other=0).to(tl.int32)  # [BN, NG, 4, 16]
    qh_j = (a % 2)[:, None] * 16 + e[None, :]  # [4, 16] j % 32
    qh_ptr = h_ptr + rows[:, None, None, None] * sh + gi[None, :, None, None] * 32 + qh_j[None, None, :, :]
    qh = tl.load(qh_ptr, mask=mask4, other=0).to(tl.int32)  # [BN, NG, 4, 16]
    shift = (2 * (a // 2))[None, None, :, None]
    lo = (ql & 15) | (((qh >> shift) & 3) << 4)
    hi = (ql >> 4) | (((qh >> (shift + 4)) & 3) << 4)
    s_base = s_ptr + rows[:, None, None] * ss + gi[None, :, None] * 8 + a[None, None, :]  # [BN, NG, 4]
    sc_lo = tl.load(s_base, mask=mask2[:, :, None], other=0).to(tl.float32)
    sc_hi = tl.load(s_base + 4, mask=mask2[:, :, None], other=0).to(tl.float32)
    d = tl.load(d_ptr + rows[:, None] * sd + (gi // 2)[None, :], mask=mask2, other=0.0).to(tl.float32)
    dl_lo = (d[:, :, None] * sc_lo)[:, :, :, None]  # [BN, NG, 4, 1], exact (11 x 8 bits)
    dl_hi = (d[:, :, None] * sc_hi)[:, :, :, None]
    return dl_lo * _exact_float(lo, 32), dl_hi * _exact_float(hi, 32)


@triton.jit
def tile_q6_k_fast(q_ptr, h_ptr, s_ptr, d_ptr, sq, sh, ss, sd, rows, row_mask, gi, g_mask,
                    BLOCK_N: tl.constexpr, NG: tl.constexpr):
    """Q6_K for fp16 activations: the half super-block's 64 ql bytes as part 0 (j < 32) and part 1
    (j >= 32), so each asm call has constant qh shifts. Four [BN, NG * 32] tiles at K offsets
    0, 32 (low values of parts 0 and 1), 64, 96 (high values) within each 128-group."""
    a = tl.arange(0, 2)
    e = tl.arange(0, 16)
    jj = a[:, None] * 16 + e[None, :]  # [2, 16] byte j of part 0 (part 1: j + 32); also the qh byte
    mask2 = row_mask[:, None] & g_mask[None, :]  # [BN, NG]
    mask4 = mask2[:, :, None, None]
    q_base = q_ptr + rows[:, None, None, None] * sq + gi[None, :, None, None] * 64 + jj[None, None, :, :]
    ql0 = tl.load(q_base, mask=mask4, other=0)  # [BN, NG, 2, 16] uint8
    ql1 = tl.load(q_base + 32, mask=mask4, other=0)
    qh = tl.load(h_ptr + rows[:, None, None, None] * sh + gi[None, :, None, None] * 32 + jj[None, None, :, :],
                 mask=mask4, other=0)
    s_base = s_ptr + rows[:, None, None] * ss + gi[None, :, None] * 8 + a[None, None, :]  # [BN, NG, 2]
    mask3 = mask2[:, :, None]
    d = tl.load(d_ptr + rows[:, None] * sd + (gi // 2)[None, :], mask=mask2, other=0.0)
    d = d.to(tl.float32)[:, :, None]  # [BN, NG, 1]
    # sub-block j // 16 (+ 4 for the high values); d * scale is exact in float32, then rounded to fp16
    dl_lo0 = (d * tl.load(s_base, mask=mask3, other=0).to(tl.float32)).to(tl.float16)[:, :, :, None]
    dl_lo1 = (d * tl.load(s_base + 2, mask=mask3, other=0).to(tl.float32)).to(tl.float16)[:, :, :, None]
    dl_hi0 = (d * tl.load(s_base + 4, mask=mask3, other=0).to(tl.float32)).to(tl.float16)[:, :, :, None]
    dl_hi1 = (d * tl.load(s_base + 6, mask=mask3, other=0).to(tl.float32)).to(tl.float16)[:, :, :, None]
    lo0, hi0 = _asm_q6(ql0, qh, dl_lo0, dl_hi0, _ASM_Q6_PART0)
    lo1, hi1 = _asm_q6(ql1, qh, dl_lo1, dl_hi1, _ASM_Q6_PART1)
    BK4: tl.constexpr = NG * 32
    return (lo0.reshape(BLOCK_N, BK4), lo1.reshape(BLOCK_N, BK4), hi0.reshape(BLOCK_N, BK4),
            hi1.reshape(BLOCK_N, BK4))


@triton.jit
def _tile_dense(q_ptr, sq, rows, row_mask, gi, K):
    """f16/bf16/f32 rows: group = 128 consecutive elements, halves of 64."""
    j = tl.arange(0, 64)
    k_lo = gi[:, None] * 128 + j[None, :]  # [NG, 64]
    mask = row_mask[:, None, None] & (k_lo < K)[None, :, :]
    ptr = q_ptr + rows[:, None, None] * sq + k_lo[None, :, :]
    lo = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)  # [BN, NG, 64]
    hi = tl.load(ptr + 64, mask=mask & (k_lo + 64 < K)[None, :, :], other=0.0).to(tl.float32)
    return lo, hi


@triton.jit
def dequant_tile(q_ptr, h_ptr, s_ptr, d_ptr, m_ptr, sq, sh, ss, sd, sm, rows, row_mask, gi, g_mask, K,
                  QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BKH: tl.constexpr, FAST: tl.constexpr):
    """One K-tile -> (w_lo, w_hi), each [BLOCK_N, BKH] float32 (see `_k_index` for their K positions)."""
    if QTYPE == 2:  # Q4_0
        lo, hi = _tile_q4_q5(q_ptr, h_ptr, d_ptr, m_ptr, sq, sh, sd, sm, rows, row_mask, gi, g_mask,
                             False, False, FAST)
    elif QTYPE == 3:  # Q4_1
        lo, hi = _tile_q4_q5(q_ptr, h_ptr, d_ptr, m_ptr, sq, sh, sd, sm, rows, row_mask, gi, g_mask,
                             True, False, FAST)
    elif QTYPE == 6:  # Q5_0
        lo, hi = _tile_q4_q5(q_ptr, h_ptr, d_ptr, m_ptr, sq, sh, sd, sm, rows, row_mask, gi, g_mask,
                             False, True, False)
    elif QTYPE == 7:  # Q5_1
        lo, hi = _tile_q4_q5(q_ptr, h_ptr, d_ptr, m_ptr, sq, sh, sd, sm, rows, row_mask, gi, g_mask,
                             True, True, False)
    elif QTYPE == 8:  # Q8_0
        lo, hi = _tile_q8_0(q_ptr, d_ptr, sq, sd, rows, row_mask, gi, g_mask, FAST)
    elif QTYPE == 12:  # Q4_K
        lo, hi = _tile_q4_k_q5_k(q_ptr, h_ptr, s_ptr, d_ptr, m_ptr, sq, sh, ss, sd, sm, rows, row_mask, gi,
                                 g_mask, False, FAST)
    elif QTYPE == 13:  # Q5_K
        lo, hi = _tile_q4_k_q5_k(q_ptr, h_ptr, s_ptr, d_ptr, m_ptr, sq, sh, ss, sd, sm, rows, row_mask, gi,
                                 g_mask, True, False)
    elif QTYPE == 14:  # Q6_K
        lo, hi = _tile_q6_k(q_ptr, h_ptr, s_ptr, d_ptr, sq, sh, ss, sd, rows, row_mask, gi, g_mask)
    else:  # dense
        lo, hi = _tile_dense(q_ptr, sq, rows, row_mask, gi, K)
    return lo.reshape(BLOCK_N, BKH), hi.reshape(BLOCK_N, BKH)


@triton.jit
def k_index(t, NG: tl.constexpr, G: tl.constexpr):
    """K positions of the low-half columns of K-tile t (the high half is these + G): [NG * G]."""
    jj = tl.arange(0, NG * G)
    return (t * NG + jj // G) * (2 * G) + jj % G
