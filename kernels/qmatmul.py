"""Quantized matmul over GGUF weights: y = x @ W.T (+ bias), W kept in its GGUF blocks on the device.

    w = QuantizedWeight.from_gguf(info, "cuda")   # or from_bytes(uint8 bytes, qtype, (N, K), device)
    y = qmatmul(x, w, bias)                       # x (M, K) fp16/bf16 -> y (M, N) same dtype
    y_ref = qmatmul_reference(x, w, bias)         # dequantize -> float32 matmul -> x.dtype

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K are read directly by one Triton kernel, from
the struct-of-arrays layout of `kernels.qmatmul_layouts` (the GGUF bytes, moved, no requantizing).
Q2_K and Q3_K are dequantized once at load to fp16, F16/BF16/F32 are kept as they are; those
"dense" weights use the same kernel for 1..16 rows and cuBLAS (F.linear) above.

The kernel computes y.T = W @ x.T one (BLOCK_N output features) x (BLOCK_M rows) tile per
program: it walks K in tiles, dequantizes the weight tile to x's dtype in registers and feeds
`tl.dot` with float32 accumulation. A K-tile is NG "groups" (one Q4_0 block, half a Q4_K
super-block chunk pair, half a Q6_K super-block); each group's values come as a low half and a
high half (the low and high nibbles of the same bytes), so there are two dots per tile, each
against the x elements that half holds (gathered with the same index map) -- no shuffling of
nibbles into K order. Two dequantizers: inline PTX on fp16 pairs for fp16 activations on CUDA
(Q4_0, Q4_1, Q8_0, Q4_K, Q6_K; `_ASM_Q4_SYM` explains it), a portable float32 one otherwise.

Two launch shapes:
- GEMV (M <= 16: decode, speculative verify): always BLOCK_M = 16 with the rows beyond M masked
  to zero, and a split of K chosen from (N, K) and the device alone. So every M in 1..16 runs the
  same compiled kernel with the same K order, and a tensor-core row's result does not depend on
  the other rows: row i of a 16-row call is bit for bit the 1-row call of x[i]. Split partial sums
  go to a float32 workspace; the last program of a column tile to finish (an atomic counter)
  adds them in split order 0, 1, 2..., so the sum does not depend on which program was last.
- GEMM (M > 16: prefill): 2-D grid of (BLOCK_M, BLOCK_N) tiles, no split; the weight tile is
  dequantized once per BLOCK_M rows.

No host syncs and no data-dependent Python: CUDA-graph capturable (the workspace and output are
torch allocations; the counters live with the weight and are reset to zero by the kernel).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as QT

from engine import quants
from engine.errors import ModelFileError
from kernels.qmatmul_layouts import FIELDS, GROUP_ELEMS, split_fields, to_gguf_bytes

if TYPE_CHECKING:
    from engine.gguf_file import TensorInfo

log = logging.getLogger(__name__)

KERNEL_TYPES = tuple(FIELDS)  # read directly: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K
DENSE_TYPES = (QT.Q2_K, QT.Q3_K, QT.F16, QT.BF16, QT.F32)  # dequantized (or kept) at load
GEMV_ROWS_MAX = 16  # M <= this takes the row-independent GEMV launch
_DENSE = -1  # QTYPE code of a dense (f16/bf16/f32) weight in the kernel
_DENSE_GROUP = 128  # elements per dense "group" (two halves of 64)
_COUNTER_TILE_MIN = 16  # smallest BLOCK_N: one semaphore per tile of at least this many columns
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Inline-PTX dequantization for fp16 activations on CUDA (see _ASM_Q4_SYM). TANDEM_QMATMUL_ASM=0 turns
# it off (the portable float32 path then runs everywhere).
_ASM_ENABLED = os.environ.get("TANDEM_QMATMUL_ASM", "1") != "0"
FAST_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.Q6_K)


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters. For GEMV they depend on (N, K, device) only, never on M (row independence)."""

    block_n: int  # output features per program
    block_m: int  # rows per program (16 for GEMV)
    block_k: int  # K elements per loop step: a multiple of the type's group, groups a power of two
    split_k: int  # requested K splits (GEMV); the launcher rounds to what the K tiles allow
    num_warps: int = 4
    num_stages: int = 2
    fast: bool = True  # inline-PTX dequantization where it applies (False: always the float32 path)


# ---------------------------------------------------------------------------------------------
# The weight


class QuantizedWeight:
    """A GGUF 2-D weight (N out, K in) on a device, in a kernel-friendly layout of the same bytes."""

    def __init__(self, qtype: QT, shape: tuple[int, int], fields: dict[str, torch.Tensor] | None,
                 dense: torch.Tensor | None) -> None:
        self.qtype = QT(qtype)
        self.shape = (int(shape[0]), int(shape[1]))
        self.fields = fields  # role -> (N, per-row) tensor (kernel types), else None
        self.dense = dense  # (N, K) fp16 / bf16 / fp32 (dense types), else None
        some = dense if dense is not None else fields["q"]
        self.device = some.device
        n_counters = triton.cdiv(self.shape[0], _COUNTER_TILE_MIN)
        # One split-K semaphore per column tile; every kernel leaves them at zero.
        self.counters = torch.zeros(n_counters, dtype=torch.int32, device=self.device)  # (N / 16,)
        self.gemv_config = default_gemv_config(self.qtype, self.shape, self.device)

    @property
    def nbytes(self) -> int:
        """Device bytes of the weight itself (the GGUF size for the directly-read types)."""
        if self.dense is not None:
            return self.dense.numel() * self.dense.element_size()
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    @classmethod
    def from_gguf(cls, info: TensorInfo, device: torch.device | str) -> QuantizedWeight:
        if len(info.shape) != 2:
            raise ModelFileError(f"tensor {info.name} has shape {info.shape}; a matmul weight must be 2-D")
        return cls.from_bytes(info.data, info.qtype, info.shape, device)

    @classmethod
    def from_bytes(cls, data: torch.Tensor | np.ndarray, qtype: int, shape: tuple[int, int],
                   device: torch.device | str) -> QuantizedWeight:
        """GGUF bytes of a (N, K) tensor (uint8, on any device) -> a weight on `device`."""
        try:
            qtype = QT(qtype)
        except ValueError:
            raise ModelFileError(f"unknown GGUF tensor type {qtype}; re-download the model file") from None
        if qtype not in KERNEL_TYPES + DENSE_TYPES:
            supported = ", ".join(t.name for t in KERNEL_TYPES + DENSE_TYPES)
            raise ModelFileError(
                f"tensor type {qtype.name} is not supported on the GPU (supported: {supported})")
        shape = (int(shape[0]), int(shape[1]))
        raw = quants.byte_tensor(data)  # (n_bytes,) uint8
        expected = quants.tensor_nbytes(qtype, shape)
        if raw.numel() != expected:
            raise ModelFileError(
                f"{qtype.name} tensor of shape {shape} needs {expected} bytes, has {raw.numel()}")
        raw = raw.to(device)
        if qtype in KERNEL_TYPES:
            return cls(qtype, shape, split_fields(raw, qtype, shape), None)
        if qtype == QT.F16:
            dense = raw.view(torch.float16).reshape(shape).clone()
        elif qtype == QT.BF16:
            dense = raw.view(torch.bfloat16).reshape(shape).clone()
        elif qtype == QT.F32:
            dense = raw.view(torch.float32).reshape(shape).clone()
        else:  # Q2_K, Q3_K: once to fp16 (one rounding of the exact float32 value)
            dense = quants.dequantize(raw, qtype, shape).to(torch.float16)  # (N, K)
        return cls(qtype, shape, None, dense)

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 (N, K): gguf-py's values bit for bit (dense types: as stored)."""
        if self.dense is not None:
            return self.dense.to(torch.float32)
        raw = to_gguf_bytes(self.fields, self.qtype, self.shape)
        return quants.dequantize(raw, self.qtype, self.shape)  # (N, K)

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.qtype.name}, shape={self.shape}, device={self.device})"


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: small, so tiny test shapes still split


def _gemv_tuning(qtype: QT, n: int, k: int, n_sm: int) -> tuple[int, int, int]:
    """(block_n, programs_per_sm, num_stages) for a GEMV of (N, K), from `bench_qmatmul --sweep` on an
    H200 (2026-11-27, fp16 x, M = 1 / 16 us, see kernels/README.md):
    - an LM head (151936 x 1536: thousands of 64-column tiles, no K split): block_n 128 and 3
      stages halve the 16-row x re-reads; Q4_0 93.2/133.8 -> 87.4/97.1, Q4_K 88.6/92.2 -> 82.9/88.0,
      Q8_0 151.6/187.6 -> 148.1/161.5. Q6_K keeps block_n 64 (3 stages: 120.6/126.5 -> 115.1/121.5;
      block_n 128 was 125.1/136.0).
    - K >= 4096 (1536 x 8960): fewer, longer splits, 3 stages; M = 1: Q4_0 13.0 -> 12.3,
      Q8_0 17.8 -> 17.1, Q4_K 15.1 -> 14.5, Q6_K 16.0 -> 15.1.
    - otherwise (8960 x 1536 and smaller): block_n 64, 4 programs per SM, 2 stages was best or
      within 5%.
    """
    if triton.cdiv(n, 64) >= 8 * n_sm:
        return (64 if qtype == QT.Q6_K else 128), 4, 3
    if k >= 4096:
        return 64, 2, 3
    return 64, 4, 2


def default_gemv_config(qtype: QT, shape: tuple[int, int], device: torch.device | str, *,
                        block_n: int | None = None, block_k: int = 128, programs_per_sm: int | None = None,
                        num_warps: int = 4, num_stages: int | None = None) -> KernelConfig:
    """GEMV launch for (N, K): split K until there are about `programs_per_sm` programs per multiprocessor.

    Depends on (qtype, N, K, device) only, never on M. Unset arguments come from `_gemv_tuning`.
    block_k 128: with block_k 256 the float32 path spilled registers for Q6_K (ptxas, sm_90) and the
    fp16 path measured 10-25% slower.
    """
    n, k = shape
    n_sm = _multiprocessors(torch.device(device))
    tuned_n, tuned_pps, tuned_stages = _gemv_tuning(qtype, n, k, n_sm)
    block_n = block_n or tuned_n
    programs_per_sm = programs_per_sm or tuned_pps
    num_stages = num_stages or tuned_stages
    group = GROUP_ELEMS.get(qtype, _DENSE_GROUP)
    block_k = max(group, block_k)
    n_tiles = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split = max(1, min(k_tiles, programs_per_sm * n_sm // n_tiles))
    return KernelConfig(block_n=block_n, block_m=GEMV_ROWS_MAX, block_k=block_k, split_k=split,
                        num_warps=num_warps, num_stages=num_stages)


def default_gemm_config(qtype: QT, m: int) -> KernelConfig:
    group = GROUP_ELEMS.get(qtype, _DENSE_GROUP)
    block_m = 64 if m <= 64 else 128
    return KernelConfig(block_n=128, block_m=block_m, block_k=max(group, 128), split_k=1,
                        num_warps=8 if block_m == 128 else 4, num_stages=3)


# ---------------------------------------------------------------------------------------------
# Torch reference


def qmatmul_reference(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch oracle: dequantize (bit-exact with gguf-py) -> float32 matmul -> x.dtype."""
    weight = w.dequantize()  # (N, K) float32
    y = x.to(torch.float32) @ weight.T  # (M, N)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


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
# outputs $0 (low nibbles), $1 (high), fp16x2; inputs $2 two bytes, $3 fp16 d
_ASM_Q4_SYM: tl.constexpr = tl.constexpr("{\n.reg .b32 t, lo, hi, c;\n" + _BYTES_TO_LANES + _NIBBLES + """
mov.b32 c, 0x64086408;
sub.rn.f16x2 lo, lo, c;
sub.rn.f16x2 hi, hi, c;
mul.rn.f16x2 lo, lo, $3;
mul.rn.f16x2 hi, hi, $3;
mov.b32 $0, lo;
mov.b32 $1, hi;
}""")
# outputs as above; inputs $2 two bytes, $3 scale and $4 offset of the low values, $5 $6 of the high
_ASM_Q4_AFFINE: tl.constexpr = tl.constexpr("{\n.reg .b32 t, lo, hi, c;\n" + _BYTES_TO_LANES + _NIBBLES + """
mov.b32 c, 0x64006400;
sub.rn.f16x2 lo, lo, c;
sub.rn.f16x2 hi, hi, c;
fma.rn.f16x2 lo, lo, $3, $4;
fma.rn.f16x2 hi, hi, $5, $6;
mov.b32 $0, lo;
mov.b32 $1, hi;
}""")
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
mov.b32 c, 0x64206420;
sub.rn.f16x2 lo, lo, c;
sub.rn.f16x2 hi, hi, c;
mul.rn.f16x2 lo, lo, $4;
mul.rn.f16x2 hi, hi, $5;
mov.b32 $0, lo;
mov.b32 $1, hi;
}""")


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
def _tile_q6_k_fast(q_ptr, h_ptr, s_ptr, d_ptr, sq, sh, ss, sd, rows, row_mask, gi, g_mask,
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
def _dequant_tile(q_ptr, h_ptr, s_ptr, d_ptr, m_ptr, sq, sh, ss, sd, sm, rows, row_mask, gi, g_mask, K,
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
def _k_index(t, NG: tl.constexpr, G: tl.constexpr):
    """K positions of the low-half columns of K-tile t (the high half is these + G): [NG * G]."""
    jj = tl.arange(0, NG * G)
    return (t * NG + jj // G) * (2 * G) + jj % G


@triton.jit(do_not_specialize=["M"])
def _qmatmul_kernel(
    x_ptr, stride_xm, y_ptr, stride_ym, bias_ptr,
    q_ptr, h_ptr, s_ptr, d_ptr, m_ptr, sq, sh, ss, sd, sm,
    ws_ptr, cnt_ptr,
    M, N, K, n_groups, n_k_tiles, tiles_per_split, split_k,
    QTYPE: tl.constexpr, G: tl.constexpr, NG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_IN_F32: tl.constexpr, FAST: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    BKH: tl.constexpr = NG * G
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    if EVEN_N:  # an all-true constant mask: the compiler drops it from every load
        n_mask = tl.full([BLOCK_N], 1, tl.int1)
    else:
        n_mask = n < N
    rows = n.to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    m_mask = m < M
    x_rows = x_ptr + m.to(tl.int64)[None, :] * stride_xm  # [1, BM]

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # y.T tile
    t_start = pid_s * tiles_per_split
    t_stop = tl.minimum(t_start + tiles_per_split, n_k_tiles)
    for t in range(t_start, t_stop):
        gi = t * NG + tl.arange(0, NG)  # groups of this tile  [NG]
        if EVEN_K:
            g_mask = tl.full([NG], 1, tl.int1)
        else:
            g_mask = gi < n_groups
        if FAST and QTYPE == 14:  # Q6_K: four quarter tiles (see _tile_q6_k_fast)
            w0, w1, w2, w3 = _tile_q6_k_fast(q_ptr, h_ptr, s_ptr, d_ptr, sq, sh, ss, sd, rows, n_mask, gi,
                                             g_mask, BLOCK_N, NG)  # [BN, NG * 32] each
            jj = tl.arange(0, NG * 32)
            k0 = (t * NG + jj // 32) * 128 + jj % 32  # [NG * 32]
            acc = _dot_x(acc, w0, x_rows, k0, m_mask, K, DOT_IN_F32, EVEN_K)
            acc = _dot_x(acc, w1, x_rows, k0 + 32, m_mask, K, DOT_IN_F32, EVEN_K)
            acc = _dot_x(acc, w2, x_rows, k0 + 64, m_mask, K, DOT_IN_F32, EVEN_K)
            acc = _dot_x(acc, w3, x_rows, k0 + 96, m_mask, K, DOT_IN_F32, EVEN_K)
        else:
            w_lo, w_hi = _dequant_tile(q_ptr, h_ptr, s_ptr, d_ptr, m_ptr, sq, sh, ss, sd, sm, rows, n_mask,
                                       gi, g_mask, K, QTYPE, BLOCK_N, BKH, FAST)  # [BN, BKH] each
            k_lo = _k_index(t, NG, G)  # [BKH]
            acc = _dot_x(acc, w_lo, x_rows, k_lo, m_mask, K, DOT_IN_F32, EVEN_K)
            acc = _dot_x(acc, w_hi, x_rows, k_lo + G, m_mask, K, DOT_IN_F32, EVEN_K)

    if split_k == 1:
        _store_output(acc, y_ptr, stride_ym, bias_ptr, n, n_mask, m, m_mask, HAS_BIAS)
    else:
        # Park this split's partial sums, then the last program of the column tile adds all splits
        # in order 0..split_k-1 (deterministic whichever program finishes last).
        ws_tile = ws_ptr + m[None, :] * N + n[:, None]  # [BN, BM] of a (split_k, BLOCK_M, N) workspace
        tl.store(ws_tile + pid_s * (BLOCK_M * N), acc, mask=n_mask[:, None])
        tl.debug_barrier()  # every thread's stores are issued before the release below
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == split_k - 1:
            total = tl.load(ws_tile, mask=n_mask[:, None], other=0.0, cache_modifier=".cg")
            for s in range(1, split_k):
                total += tl.load(ws_tile + s * (BLOCK_M * N), mask=n_mask[:, None], other=0.0,
                                 cache_modifier=".cg")
            _store_output(total, y_ptr, stride_ym, bias_ptr, n, n_mask, m, m_mask, HAS_BIAS)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)  # ready for the next call (and the next graph replay)


@triton.jit
def _dot_x(acc, w, x_rows, k, m_mask, K, DOT_IN_F32: tl.constexpr, EVEN_K: tl.constexpr):
    """acc [BN, BM] += w [BN, len(k)] @ x[m, k].T, w rounded to x's dtype, float32 accumulation."""
    if EVEN_K:
        x = tl.load(x_rows + k[:, None], mask=m_mask[None, :], other=0.0)  # [len(k), BM]
    else:
        x = tl.load(x_rows + k[:, None], mask=m_mask[None, :] & (k < K)[:, None], other=0.0)
    w = w.to(x.dtype)
    if DOT_IN_F32:  # the interpreter's bf16 dot is broken (Triton 3.9): same values, float32 operands
        return tl.dot(w.to(tl.float32), x.to(tl.float32), acc)
    return tl.dot(w, x, acc)


@triton.jit
def _store_output(acc, y_ptr, stride_ym, bias_ptr, n, n_mask, m, m_mask, HAS_BIAS: tl.constexpr):
    """acc [BN, BM] float32 (+ bias) -> y[m, n] in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    ptr = y_ptr + m.to(tl.int64)[None, :] * stride_ym + n[:, None]
    tl.store(ptr, acc.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Launcher


def _weight_args(w: QuantizedWeight) -> tuple[list, int, int]:
    """(10 pointer/stride args in kernel order q, h, s, d, m, sq, sh, ss, sd, sm; QTYPE code; G)."""
    if w.dense is not None:
        t = w.dense
        return [t, t, t, t, t, t.stride(0), 0, 0, 0, 0], _DENSE, _DENSE_GROUP // 2
    ptrs, strides = [], []
    for role in ("q", "h", "s", "d", "m"):
        t = w.fields.get(role)
        ptrs.append(t if t is not None else w.fields["q"])
        strides.append(t.stride(0) if t is not None else 0)
    return ptrs + strides, int(w.qtype), GROUP_ELEMS[w.qtype] // 2


def _launch(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None,
            cfg: KernelConfig) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    wargs, qtype_code, half = _weight_args(w)
    group = 2 * half
    if cfg.block_k % group or not _is_pow2(cfg.block_k // group):
        raise ValueError(f"block_k {cfg.block_k} must be a power-of-two multiple of the {group}-value group")
    ng = cfg.block_k // group
    n_groups = triton.cdiv(k, group)
    n_k_tiles = triton.cdiv(n_groups, ng)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)  # (M, N)
    n_tiles = triton.cdiv(n, cfg.block_n)
    if cfg.block_m == GEMV_ROWS_MAX and m <= GEMV_ROWS_MAX and cfg.split_k > 1:
        tiles_per_split = triton.cdiv(n_k_tiles, cfg.split_k)
        split = triton.cdiv(n_k_tiles, tiles_per_split)
    else:
        tiles_per_split, split = n_k_tiles, 1
    if split > 1:
        if cfg.block_n < _COUNTER_TILE_MIN:
            raise ValueError(f"split-K needs block_n >= {_COUNTER_TILE_MIN}")
        ws = torch.empty((split, cfg.block_m, n), dtype=torch.float32, device=x.device)  # (S, 16, N)
    else:
        ws = y
    grid = (triton.cdiv(m, cfg.block_m), n_tiles, split)
    _qmatmul_kernel[grid](
        x, x.stride(0), y, y.stride(0), bias if bias is not None else y,
        *wargs, ws, w.counters,
        m, n, k, n_groups, n_k_tiles, tiles_per_split, split,
        QTYPE=qtype_code, G=half, NG=ng, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HAS_BIAS=bias is not None, DOT_IN_F32=_INTERPRETED and x.dtype == torch.bfloat16,
        FAST=cfg.fast and _use_fast_dequant(w, x), EVEN_N=n % cfg.block_n == 0,
        EVEN_K=k % cfg.block_k == 0 and n_groups % ng == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def _use_fast_dequant(w: QuantizedWeight, x: torch.Tensor) -> bool:
    return (_ASM_ENABLED and not _INTERPRETED and x.dtype == torch.float16 and w.qtype in FAST_TYPES
            and x.device.type == "cuda" and torch.version.hip is None)  # the asm is NVIDIA PTX


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def qmatmul(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None, *,
            config: KernelConfig | None = None) -> torch.Tensor:
    """x (M, K) float16/bfloat16 -> (M, N) same dtype, float32 accumulation.

    For M <= 16, row i of the result is bit for bit that of qmatmul(x[i:i+1], w, bias).
    `config` overrides the launch (tests, benchmarks); keep it None in the engine.
    """
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be (M, {w.shape[1]}), got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float16 or bfloat16, got {x.dtype}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device}, the weight on {w.device}")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"bias must be ({w.shape[0]},), got {tuple(bias.shape)}")
    m = x.shape[0]
    if m == 0:
        return x.new_empty((0, w.shape[0]))
    if x.stride(1) != 1:
        x = x.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if config is None:
        if m <= GEMV_ROWS_MAX:
            config = w.gemv_config
        elif w.dense is not None:  # cuBLAS for prefill of dense weights
            weight = w.dense if w.dense.dtype == x.dtype else w.dense.to(x.dtype)
            return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
        else:
            config = default_gemm_config(w.qtype, m)
    return _launch(x, w, bias, config)
