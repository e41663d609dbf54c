"""Dequantizers of `kernels.qmatmul`: one K-tile of GGUF blocks -> weight values in registers.

A K-tile is NG "groups" of BLOCK_N weight rows (one Q4_0 block, half a Q4_K super-block chunk pair,
half a Q6_K super-block); each group comes as a low half and a high half (the low and high nibbles of
the same bytes) so nibbles are never shuffled into K order; `k_index` gives the K positions.
Two dequantizers: inline PTX on fp16 pairs (CUDA, fp16 activations, FAST_TYPES of qmatmul) and a
portable float32 one (everything else, the interpreter).
VEC (the weight's vector-metadata layout, kernels/qmatmul_layouts.py; Q4_K, Q5_K, Q6_K): the K-quant
block metadata (d, dmin, scales) is loaded as whole 32/128-bit words and its bytes taken apart in
registers, so Triton's pipeliner issues those loads as cp.async a K-tile ahead (a 1- or 2-byte load
stays a plain load that each K-tile waits for). Both ways give the same values bit for bit. Q4_0 /
Q4_1 / Q8_0 pass VEC off: their fp16 d of a tile's 4 groups is already one 8-byte run per row, which
Triton 3.6 pipelines as it is (and the word-wise load made it stage the tile through shared memory).
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
# element's inputs, so it does not matter which elements Triton groups. In the wgmma (4-warp)
# launches the operand layout gives each thread pairs of adjacent values, which arrive as one 16-bit
# shared-memory load (pack=4 there costs byte permutes to glue pairs together). In the mma.sync
# (2-warp) launches each thread's register holds four adjacent bytes (ldmatrix), which pack=2 takes
# apart and glues again (4 PRMT + 2 shifts + 2 ORs per register); Q4_K's fast path takes them four a
# call there (`_ASM_Q4_AFFINE4`, `qmatmul._ptx_pack`: session 17, 495 -> 360 loop instructions).
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


def _q4_affine4_asm() -> str:
    """_ASM_Q4_AFFINE for four elements a call (pack=4): outputs $0 $1 (low values of elements 0-1, 2-3),
    $2 $3 (high); inputs $4 the four bytes, $5 $6 the scales and $7 $8 the offsets of the low values, $9
    $10 / $11 $12 of the high ones. Bytes 0-1 go through the two-byte body, then bytes 2-3."""
    lines = [".reg .b32 t, lo, hi, c;", "mov.b32 c, 0x64006400;"]
    for pair, sel in ((0, "0x4140"), (1, "0x4342")):
        lines += [f"prmt.b32 t, $4, 0, {sel};", *_NIBBLES.strip().splitlines(),
                  "sub.rn.f16x2 lo, lo, c;", "sub.rn.f16x2 hi, hi, c;",
                  f"fma.rn.f16x2 ${pair}, lo, ${5 + pair}, ${7 + pair};",
                  f"fma.rn.f16x2 ${2 + pair}, hi, ${9 + pair}, ${11 + pair};"]
    return "{\n" + "\n".join(lines) + "\n}"


_ASM_Q4_AFFINE4: tl.constexpr = tl.constexpr(_q4_affine4_asm())


@triton.jit
def _asm_q4_affine4(b, s_lo, o_lo, s_hi, o_hi):
    """_asm_q4_affine, four elements a call."""
    return tl.inline_asm_elementwise(_ASM_Q4_AFFINE4, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
                                     [b, s_lo, o_lo, s_hi, o_hi], dtype=(tl.float16, tl.float16),
                                     is_pure=True, pack=4)


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
def _half(word, HIGH: tl.constexpr):
    """The fp16 in the low (or high) 16 bits of int32 words."""
    bits = (word >> 16) & 0xFFFF if HIGH else word & 0xFFFF
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _byte(word, k):
    """Byte k (0 = lowest; an int, or an int tensor broadcast with word) of int32 words, as int32 0..255."""
    return (word >> (8 * k)) & 255


# Vector metadata and the tensor cores (Triton 3.6, seen in the TTGIR of the Q6_K GEMV): Triton moves the
# tensor-core operand layout back from the dot through elementwise ops and views (expand_dims, reshape,
# join, split, trans) to the loads; a value computed from an index (arange, a row parity) on the way
# stopped it, and the dequantized tiles then went to the tensor cores through shared memory (4
# local_alloc per K-tile, +18 KB). So Q6_K's words are taken apart with constant shifts and views only.
# (Q4_K's byte choice by group, `_k_head`, depends on the index as the byte loads' did, and its tile
# reaches the tensor cores in registers either way.)


@triton.jit
def _q6_d(d_ptr, n0, N, gi, g_mask, BLOCK_N: tl.constexpr, NG: tl.constexpr):
    """Q6_K vector layout: fp16 d of super-block gi // 2 for rows n0 .. n0 + BLOCK_N, [BN, NG]. d is
    column-major (element sb of row n at sb * N + n, N even): one 32-bit word holds rows 2i, 2i + 1."""
    i = tl.arange(0, BLOCK_N // 2)
    word_idx = (gi // 2)[:, None] * (N // 2) + (n0 // 2 + i)[None, :]  # [NG, BN / 2]
    mask = g_mask[:, None] & (n0 + 2 * i < N)[None, :]
    word = tl.load(d_ptr.to(tl.pointer_type(tl.int32)) + word_idx, mask=mask, other=0)
    d = tl.join(_half(word, False), _half(word, True)).reshape(NG, BLOCK_N)  # rows in order
    return tl.trans(d)


@triton.jit
def _q6_scales(s_ptr, ss, rows, gi, mask2, FIRST: tl.constexpr, COUNT: tl.constexpr):
    """Q6_K vector layout: int8 scales FIRST .. FIRST + COUNT - 1 (COUNT 2 or 4, within one 32-bit
    word) of the 8 of half super-block gi, as float32 [BN, NG, COUNT], from one word per row and group."""
    # a row's 16 scales per super-block are 16-byte aligned: words 2 gi, 2 gi + 1 are half gi's
    word_idx = (rows[:, None] * (ss // 8) + gi[None, :]) * 2 + FIRST // 4  # [BN, NG]
    word = tl.load(s_ptr.to(tl.pointer_type(tl.int32)) + word_idx, mask=mask2, other=0)
    b: tl.constexpr = FIRST % 4
    if COUNT == 2:
        sc = tl.join(_byte(word, b), _byte(word, b + 1))  # [BN, NG, 2]
    else:  # join order: element 2 j + k of the result is byte 2 j + k
        sc = tl.join(tl.join(_byte(word, 0), _byte(word, 2)), tl.join(_byte(word, 1), _byte(word, 3)))
        sc = sc.reshape(sc.shape[0], sc.shape[1], 4)
    return sc.to(tl.int8).to(tl.float32)


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
    return _k_unpack(b_d, b_m, b_md, sub)


@triton.jit
def _k_unpack(b_d, b_m, b_md, sub):
    """The 6-bit scale and min of sub-block `sub` from its bytes d[sub % 4], m[sub % 4], md[sub % 4]."""
    low = (sub < 4)[None, :]
    sc = tl.where(low, b_d & 63, (b_md & 15) | ((b_d >> 2) & 0x30))
    mn = tl.where(low, b_m & 63, (b_md >> 4) | ((b_m >> 2) & 0x30))
    return sc, mn


@triton.jit
def _k_head(s_ptr, ss, rows, sb, c, mask2, BLOCK_N: tl.constexpr, NG: tl.constexpr):
    """Q4_K/Q5_K vector layout: the 16-byte head of super-block sb (d, dmin, 12 scale bytes as 4 int32
    words) of each row in one load, taken apart in registers -> (sc_lo, mn_lo, sc_hi, mn_hi) int32 of
    sub-blocks 2c and 2c + 1, d, dmin float32; all [BN, NG]."""
    k = tl.arange(0, 4)
    word0 = (rows[:, None] * (ss // 4) + sb[None, :]) * 4  # [BN, NG] first word of each head
    head = tl.load(s_ptr + word0[:, :, None] + k[None, None, :], mask=mask2[:, :, None],
                   other=0)  # [BN, NG, 4] int32
    even, odd = tl.split(head.reshape(BLOCK_N, NG, 2, 2))  # words 0, 2 and words 1, 3
    w_dm, w_m = tl.split(even)  # d | dmin << 16; scale bytes m[0:4] (block bytes 8..11)
    w_d, w_md = tl.split(odd)  # scale bytes d[0:4] (block bytes 4..7); md[0:4] (12..15)
    d = (w_dm & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = ((w_dm >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    sub_lo = 2 * c
    jm = (sub_lo % 4)[None, :]  # byte of sub-block 2c; 2c + 1 is the next one
    sc_lo, mn_lo = _k_unpack(_byte(w_d, jm), _byte(w_m, jm), _byte(w_md, jm), sub_lo)
    sc_hi, mn_hi = _k_unpack(_byte(w_d, jm + 1), _byte(w_m, jm + 1), _byte(w_md, jm + 1), sub_lo + 1)
    return sc_lo, mn_lo, sc_hi, mn_hi, d, dmin


@triton.jit
def _tile_q4_k_q5_k(q_ptr, h_ptr, s_ptr, d_ptr, m_ptr, sq, sh, ss, sd, sm, rows, row_mask, gi, g_mask,
                    HAS_HIGH: tl.constexpr, FAST: tl.constexpr, VEC: tl.constexpr, BLOCK_N: tl.constexpr,
                    NG: tl.constexpr, PRESCALED: tl.constexpr, PTX_PACK: tl.constexpr):
    """Q4_K/Q5_K: group c (0..3) of a super-block = 32 bytes; low nibbles are sub-block 2c, high 2c + 1."""
    j = tl.arange(0, 32)
    mask2 = row_mask[:, None] & g_mask[None, :]  # [BN, NG]
    sb = gi // 4  # super-block of each group  [NG]
    c = gi % 4
    b8 = tl.load(q_ptr + rows[:, None, None] * sq + gi[None, :, None] * 32 + j[None, None, :],
                 mask=mask2[:, :, None], other=0)  # [BN, NG, 32] uint8
    if FAST and PRESCALED:  # Q4_K, fp16 activations: scales precomputed at load (qmatmul_layouts.q4_k_scales)
        return _tile_q4_k_prescaled(b8, d_ptr, sd, rows, gi, mask2, BLOCK_N, NG, PTX_PACK)
    b = b8.to(tl.int32)
    lo = b & 15
    hi = b >> 4
    if HAS_HIGH:  # bit s of qh[j] is the fifth bit of element j of sub-block s
        qh = tl.load(h_ptr + rows[:, None, None] * sh + sb[None, :, None] * 32 + j[None, None, :],
                     mask=mask2[:, :, None], other=0).to(tl.int32)  # [BN, NG, 32]
        shift = (2 * c)[None, :, None]
        lo = lo | (((qh >> shift) & 1) << 4)
        hi = hi | (((qh >> (shift + 1)) & 1) << 4)
    if VEC:
        sc_lo, mn_lo, sc_hi, mn_hi, d, dmin = _k_head(s_ptr, ss, rows, sb, c, mask2, BLOCK_N, NG)
    else:
        sc_lo, mn_lo = _k_scale_min(s_ptr, ss, rows, sb, 2 * c, mask2)
        sc_hi, mn_hi = _k_scale_min(s_ptr, ss, rows, sb, 2 * c + 1, mask2)
        d = tl.load(d_ptr + rows[:, None] * sd + sb[None, :], mask=mask2, other=0.0)
        d = d.to(tl.float32)  # [BN, NG]
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
def _tile_q4_k_prescaled(b8, p_ptr, sp, rows, gi, mask2, BLOCK_N: tl.constexpr, NG: tl.constexpr,
                         PTX_PACK: tl.constexpr):
    """Q4_K fast path from the precomputed fp16 scales (the `d` role of the vector layout): one 8-byte word
    per row and group (scale lo, -offset lo, scale hi, -offset hi), taken apart with constant views so the
    values arrive in the tensor-core operand layout (no conversion through shared memory)."""
    k = tl.arange(0, 4)
    p = tl.load(p_ptr + (rows[:, None] * sp + gi[None, :] * 4)[:, :, None] + k[None, None, :],
                mask=mask2[:, :, None], other=0.0)  # [BN, NG, 4] fp16
    scales, offsets = tl.split(p.reshape(BLOCK_N, NG, 2, 2))  # [BN, NG, 2] each: (lo, hi)
    dl_lo, dl_hi = tl.split(scales)  # [BN, NG]
    ml_lo, ml_hi = tl.split(offsets)
    if PTX_PACK == 4:
        return _asm_q4_affine4(b8, dl_lo[:, :, None], ml_lo[:, :, None], dl_hi[:, :, None], ml_hi[:, :, None])
    return _asm_q4_affine(b8, dl_lo[:, :, None], ml_lo[:, :, None], dl_hi[:, :, None], ml_hi[:, :, None])


@triton.jit
def _tile_q6_k(q_ptr, h_ptr, s_ptr, d_ptr, sq, sh, ss, sd, rows, row_mask, gi, g_mask, n0, N,
               VEC: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr):
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
    if VEC:
        sc_lo = _q6_scales(s_ptr, ss, rows, gi, mask2, 0, 4)  # [BN, NG, 4]
        sc_hi = _q6_scales(s_ptr, ss, rows, gi, mask2, 4, 4)
        d = _q6_d(d_ptr, n0, N, gi, g_mask, BLOCK_N, NG).to(tl.float32)
    else:
        s_base = s_ptr + rows[:, None, None] * ss + gi[None, :, None] * 8 + a[None, None, :]  # [BN, NG, 4]
        sc_lo = tl.load(s_base, mask=mask2[:, :, None], other=0).to(tl.float32)
        sc_hi = tl.load(s_base + 4, mask=mask2[:, :, None], other=0).to(tl.float32)
        d = tl.load(d_ptr + rows[:, None] * sd + (gi // 2)[None, :], mask=mask2, other=0.0).to(tl.float32)
    dl_lo = (d[:, :, None] * sc_lo)[:, :, :, None]  # [BN, NG, 4, 1], exact (11 x 8 bits)
    dl_hi = (d[:, :, None] * sc_hi)[:, :, :, None]
    return dl_lo * _exact_float(lo, 32), dl_hi * _exact_float(hi, 32)


@triton.jit
def tile_q6_k_fast(q_ptr, h_ptr, s_ptr, d_ptr, sq, sh, ss, sd, rows, row_mask, gi, g_mask, n0, N,
                   BLOCK_N: tl.constexpr, NG: tl.constexpr, VEC: tl.constexpr):
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
    # sub-block j // 16 (+ 4 for the high values); d * scale is exact in float32, then rounded to fp16
    if VEC:
        d = _q6_d(d_ptr, n0, N, gi, g_mask, BLOCK_N, NG).to(tl.float32)[:, :, None]  # [BN, NG, 1]
        dl_lo0 = (d * _q6_scales(s_ptr, ss, rows, gi, mask2, 0, 2)).to(tl.float16)[:, :, :, None]
        dl_lo1 = (d * _q6_scales(s_ptr, ss, rows, gi, mask2, 2, 2)).to(tl.float16)[:, :, :, None]
        dl_hi0 = (d * _q6_scales(s_ptr, ss, rows, gi, mask2, 4, 2)).to(tl.float16)[:, :, :, None]
        dl_hi1 = (d * _q6_scales(s_ptr, ss, rows, gi, mask2, 6, 2)).to(tl.float16)[:, :, :, None]
    else:
        s_base = s_ptr + rows[:, None, None] * ss + gi[None, :, None] * 8 + a[None, None, :]  # [BN, NG, 2]
        mask3 = mask2[:, :, None]
        d = tl.load(d_ptr + rows[:, None] * sd + (gi // 2)[None, :], mask=mask2, other=0.0)
        d = d.to(tl.float32)[:, :, None]  # [BN, NG, 1]
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
def dequant_tile(q_ptr, h_ptr, s_ptr, d_ptr, m_ptr, sq, sh, ss, sd, sm, rows, row_mask, gi, g_mask, K, n0, N,
                 QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BKH: tl.constexpr, FAST: tl.constexpr,
                 VEC: tl.constexpr, NG: tl.constexpr, PRESCALED: tl.constexpr = False,
                 PTX_PACK: tl.constexpr = 2):
    """One K-tile -> (w_lo, w_hi), each [BLOCK_N, BKH] float32 (see `_k_index` for their K positions).
    PTX_PACK: quant bytes a PTX call takes on Q4_K's fast path (qmatmul._ptx_pack; the same values)."""
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
                                 g_mask, False, FAST, VEC, BLOCK_N, NG, PRESCALED, PTX_PACK)
    elif QTYPE == 13:  # Q5_K
        lo, hi = _tile_q4_k_q5_k(q_ptr, h_ptr, s_ptr, d_ptr, m_ptr, sq, sh, ss, sd, sm, rows, row_mask, gi,
                                 g_mask, True, False, VEC, BLOCK_N, NG, False, PTX_PACK)
    elif QTYPE == 14:  # Q6_K
        lo, hi = _tile_q6_k(q_ptr, h_ptr, s_ptr, d_ptr, sq, sh, ss, sd, rows, row_mask, gi, g_mask, n0, N,
                            VEC, BLOCK_N, NG)
    else:  # dense
        lo, hi = _tile_dense(q_ptr, sq, rows, row_mask, gi, K)
    return lo.reshape(BLOCK_N, BKH), hi.reshape(BLOCK_N, BKH)


@triton.jit
def k_index(t, NG: tl.constexpr, G: tl.constexpr):
    """K positions of the low-half columns of K-tile t (the high half is these + G): [NG * G]."""
    jj = tl.arange(0, NG * G)
    return (t * NG + jj // G) * (2 * G) + jj % G
