"""Quantized matmul over GGUF weights: y = x @ W.T (+ bias), W kept in its GGUF blocks on the device.

    w = QuantizedWeight.from_gguf(info, "cuda")   # or from_bytes(uint8 bytes, qtype, (N, K), device)
    y = qmatmul(x, w, bias)                       # x (M, K) fp16/bf16 -> y (M, N) same dtype
    y_ref = qmatmul_reference(x, w, bias)         # dequantize -> float32 matmul -> x.dtype

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K are read directly by one Triton kernel, from
the struct-of-arrays layout of `kernels.qmatmul_layouts` (the GGUF bytes, moved, no requantizing;
its vector-metadata variant unless TANDEM_QMATMUL_VECTOR_META=0, see `_VECTOR_META`, where Q4_K also keeps
its sub-block scales precomputed in fp16 for the fast path, `_Q4K_SCALES`).
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
- GEMV (M <= 16: decode, speculative verify): 16 rows a program with the rows beyond M masked to
  zero (as one 16-row tensor-core tile, or for 2-warp launches as one or two 8-row tiles on the same
  dequantized weight tile: `_row_tiles`), and a split of K chosen from (N, K) and the device alone.
  So every row of every M in 1..16 goes through the same product in the same K order, and a
  tensor-core row's result does not depend on the other rows: row i of a 16-row call is bit for bit
  the 1-row call of x[i]. Split partial sums
  go to a float32 workspace; the last program of a column tile to finish (an atomic counter)
  adds them in split order 0, 1, 2..., so the sum does not depend on which program was last.
- GEMM (M > 16: prefill): 2-D grid of (BLOCK_M, BLOCK_N) tiles, no split; the weight tile is
  dequantized once per BLOCK_M rows.
A program is `_matmul_tile` of its (row tile, column tile, K split); `qmatmul_pair` runs two weights of one
input and one GEMV launch shape (different types: Q/K in Q4_K and V in Q6_K in half of Qwen2.5-1.5B
Q4_K_M's layers) as one launch, each column tile the program of its own weight's launch, so the same bits.
H200, the decode step at depth 16 (f16 cache): 1193 -> 1166 us; 16-row verify at 4096: 1667 -> 1635.

No host syncs and no data-dependent Python: CUDA-graph capturable (the workspace and output are
torch allocations; the counters live with the weight and are reset to zero by the kernel).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as QT

from engine import quants
from engine.errors import ModelFileError
from kernels.pdl import pdl_supported, wait_for_previous
from kernels.qmatmul_layouts import (
    FIELDS,
    GROUP_ELEMS,
    q4_k_scales,
    split_fields,
    to_gguf_bytes,
    vector_layout_fits,
)
from kernels.qmatmul_prefetch import prefetch_column_span, prefetch_lines, prefetch_weight_slice
from kernels.qmatmul_tiles import dequant_tile, k_index, tile_q6_k_fast
from kernels.split_output import SplitOutput

if TYPE_CHECKING:
    from engine.gguf_file import TensorInfo

log = logging.getLogger(__name__)

KERNEL_TYPES = tuple(FIELDS)  # read directly: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K
DENSE_TYPES = (QT.Q2_K, QT.Q3_K, QT.F16, QT.BF16, QT.F32)  # dequantized (or kept) at load
GEMV_ROWS_MAX = 16  # M <= this takes the row-independent GEMV launch
GEMV_ROW_TILE = 8  # the narrow tile of a GEMV program (KernelConfig.row_tile, see _row_tiles)
_DENSE = -1  # QTYPE code of a dense (f16/bf16/f32) weight in the kernel
_DENSE_GROUP = 128  # elements per dense "group" (two halves of 64)
_COUNTER_TILE_MIN = 16  # smallest BLOCK_N: one semaphore per tile of at least this many columns
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Inline-PTX dequantization for fp16 activations on CUDA (see _ASM_Q4_SYM). TANDEM_QMATMUL_ASM=0 turns
# it off (the portable float32 path then runs everywhere).
_ASM_ENABLED = os.environ.get("TANDEM_QMATMUL_ASM", "1") != "0"
FAST_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.Q6_K)
# GEMV weights up to this size prefetch their slices to L2 first (kernels/qmatmul_prefetch.py, measured
# there); TANDEM_QMATMUL_PREFETCH_MB overrides it (0: never).
_PREFETCH_MAX_BYTES = float(os.environ.get("TANDEM_QMATMUL_PREFETCH_MB", "4")) * 2**20
# K-quant block metadata (Q4_K / Q5_K / Q6_K d, dmin, scales) laid out and loaded as whole 32- or 128-bit
# words, which Triton pipelines as cp.async ahead of the K-tile (kernels/qmatmul_layouts.py,
# qmatmul_tiles.py); =0 gives the layout and byte loads of before (each K-tile waited for them). Read at
# import; a weight's layout is fixed when it is built (`QuantizedWeight.from_bytes(..., vector_meta=...)`),
# the kernel follows it.
_VECTOR_META = os.environ.get("TANDEM_QMATMUL_VECTOR_META", "1") != "0"
# Q4_K weights in the vector layout also keep their sub-block scales precomputed in fp16 for the fast
# dequantizer (kernels/qmatmul_layouts.q4_k_scales: same bits, no per-tile conversion through shared memory);
# =0 leaves them out and the kernel computes them from the scale bytes as before (A/B). Read at import.
_Q4K_SCALES = os.environ.get("TANDEM_QMATMUL_Q4K_SCALES", "1") != "0"


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
    prefetch: bool = False  # ask L2 for the program's whole weight slice first (kernels/qmatmul_prefetch.py)
    pdl: bool = False  # launch as a programmatic dependent of the previous kernel (CUDA sm_90+)
    row_tile: int = GEMV_ROWS_MAX  # GEMV (block_m 16): rows of one tensor-core tile, 16 or 8 (`_row_tiles`)


# ---------------------------------------------------------------------------------------------
# The weight


class QuantizedWeight:
    """A GGUF 2-D weight (N out, K in) on a device, in a kernel-friendly layout of the same bytes."""

    def __init__(self, qtype: QT, shape: tuple[int, int], fields: dict[str, torch.Tensor] | None,
                 dense: torch.Tensor | None, vector_meta: bool = False) -> None:
        self.qtype = QT(qtype)
        self.shape = (int(shape[0]), int(shape[1]))
        self.fields = fields  # role -> (N, per-row) tensor (kernel types), else None
        self.vector_meta = vector_meta and fields is not None  # the layout of `fields`
        # Q4_K with its fp16 sub-block scales precomputed (the `d` role of the vector layout)
        self.prescaled = self.vector_meta and self.qtype == QT.Q4_K and "d" in fields
        self.dense = dense  # (N, K) fp16 / bf16 / fp32 (dense types), else None
        some = dense if dense is not None else fields["q"]
        self.device = some.device
        n_counters = triton.cdiv(self.shape[0], _COUNTER_TILE_MIN)
        # One split-K semaphore per column tile; every kernel leaves them at zero.
        self.counters = torch.zeros(n_counters, dtype=torch.int32, device=self.device)  # (N / 16,)
        self.gemv_config = default_gemv_config(self.qtype, self.shape, self.device)

    @property
    def nbytes(self) -> int:
        """Device bytes of the weight itself (the GGUF size for the directly-read types, + 32 bytes a
        super-block for a Q4_K weight with precomputed scales)."""
        if self.dense is not None:
            return self.dense.numel() * self.dense.element_size()
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    @property
    def gemv_bytes(self) -> int:
        """Bytes a fp16 GEMV of this weight reads on CUDA: `nbytes`, but for a Q4_K weight with precomputed
        scales the quants and those scales only (its 16-byte block heads are left unread)."""
        if self.prescaled:
            return sum(self.fields[r].numel() * self.fields[r].element_size() for r in ("q", "d"))
        return self.nbytes

    @classmethod
    def from_gguf(cls, info: TensorInfo, device: torch.device | str) -> QuantizedWeight:
        if len(info.shape) != 2:
            raise ModelFileError(f"tensor {info.name} has shape {info.shape}; a matmul weight must be 2-D")
        return cls.from_bytes(info.data, info.qtype, info.shape, device)

    @classmethod
    def from_bytes(cls, data: torch.Tensor | np.ndarray, qtype: int, shape: tuple[int, int],
                   device: torch.device | str, *, vector_meta: bool | None = None,
                   q4k_scales: bool | None = None) -> QuantizedWeight:
        """GGUF bytes of a (N, K) tensor (uint8, on any device) -> a weight on `device`.

        vector_meta: which layout of kernels.qmatmul_layouts (None: `_VECTOR_META`, the environment's);
        a weight the vector layout does not fit (Q6_K with odd N) keeps the plain one.
        q4k_scales: whether a vector-layout Q4_K weight also keeps its precomputed fp16 sub-block scales
        (None: `_Q4K_SCALES`, the environment's).
        """
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
            vector_meta = _VECTOR_META if vector_meta is None else vector_meta
            vector_meta = vector_meta and vector_layout_fits(qtype, shape)
            fields = split_fields(raw, qtype, shape, vector_meta=vector_meta)
            if vector_meta and qtype == QT.Q4_K and (_Q4K_SCALES if q4k_scales is None else q4k_scales):
                fields["d"] = q4_k_scales(raw, shape)  # the fast dequantizer's scales, precomputed
            return cls(qtype, shape, fields, None, vector_meta)
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
        meta = ", vector_meta" if self.vector_meta else ""
        return f"QuantizedWeight({self.qtype.name}, shape={self.shape}, device={self.device}{meta})"


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: small, so tiny test shapes still split


def _gemv_tuning(qtype: QT, n: int, k: int, n_sm: int) -> tuple[int, int, int, int]:
    """(block_n, programs_per_sm, num_stages, num_warps) for a GEMV of (N, K), from `bench_qmatmul --sweep`
    on an H200 (2026-11-27, fp16 x, M = 1 / 16 us, see kernels/README.md):
    - an LM head (151936 x 1536: thousands of 64-column tiles, no K split): block_n 128 and 3
      stages halve the 16-row x re-reads; Q4_0 93.2/133.8 -> 87.4/97.1, Q4_K 88.6/92.2 -> 82.9/88.0,
      Q8_0 151.6/187.6 -> 148.1/161.5. Q6_K keeps block_n 64 (3 stages: 120.6/126.5 -> 115.1/121.5;
      block_n 128 was 125.1/136.0).
    - K >= 4096 (1536 x 8960): fewer, longer splits, 3 stages; M = 1: Q4_0 13.0 -> 12.3,
      Q8_0 17.8 -> 17.1, Q4_K 15.1 -> 14.5, Q6_K 16.0 -> 15.1.
    - 2-8 column tiles per SM (the fused gate/up, 17920 x 1536): 4 programs per SM left K unsplit,
      each program walking all 12 K-tiles; 8 per SM (K split in 3): Q4_K 20.9/21.8 -> 16.3/17.4 us
      (session 4, PDL on; block_n 128 16.9/18.1, 12 per SM 17.8/19.9).
    - otherwise (8960 x 1536 and smaller): block_n 64, 4 programs per SM, 2 stages was best or
      within 5% (8 per SM: Q4_K 8960 x 1536 11.1 -> 9.9 us but Q4_0 10.7 -> 12.0).
    - session 6, with the K-splits left to the reader (kernels/split_output.py; `--sweep-gemv
      --split-output`, then the engine's decode step with the variants swapped in, `python3 -m
      tests.tools.tune_decode_gpu --set gemv-warps`): Q4_K in the two long shapes (fused gate/up,
      FFN-down 1536 x 8960) takes 2 warps (mma.sync instead of one warpgroup's wgmma, whose 8 waits a
      K-tile the SASS shows) and 8 programs an SM: GEMV alone gate/up 16.25 -> 14.20 us, FFN-down
      9.94 -> 8.53 (M = 1); decode step -1.3 % and -1.1 % each, both -1.7 % (f16, depth 4096; q4_0
      alike), 16-row verify -8 % / -7 % (against a noisy baseline: 2063 and 1858 us in its two passes).
      Q6_K's FFN-down stayed best as it was (10.21 us; 2 warps 17.4). With Q4_K's scales precomputed
      (`_Q4K_SCALES`) the same variants were run again: these defaults stayed the best for one row.
    """
    n_tiles = triton.cdiv(n, 64)
    if n_tiles >= 8 * n_sm:
        return (64 if qtype == QT.Q6_K else 128), 4, 3, 4
    if k >= 4096:
        return (64, 8, 2, 2) if qtype == QT.Q4_K else (64, 2, 3, 4)
    if n_tiles >= 2 * n_sm:
        return (64, 8, 2, 2) if qtype == QT.Q4_K else (64, 8, 2, 4)
    return 64, 4, 2, 4


def default_gemv_config(qtype: QT, shape: tuple[int, int], device: torch.device | str, *,
                        block_n: int | None = None, block_k: int = 128, programs_per_sm: int | None = None,
                        num_warps: int | None = None, num_stages: int | None = None,
                        row_tile: int | None = None) -> KernelConfig:
    """GEMV launch for (N, K): split K until there are about `programs_per_sm` programs per multiprocessor.

    Depends on (qtype, N, K, device) only, never on M. Unset arguments come from `_gemv_tuning`.
    block_k 128: with block_k 256 the float32 path spilled registers for Q6_K (ptxas, sm_90) and the
    fp16 path measured 10-25% slower.
    row_tile: 8-row tensor-core tiles for 2-warp launches (mma.sync, whose instruction is 8 rows wide), one
    16-row tile for the others (wgmma, where two 8-row products cost more than one of 16). H200, session
    16 (`profile_decode_gpu --pdl --ab`, us a step, f16 cache): decode at depth 2048 1214 -> 1186, 16-row
    verify at 4096 1588 -> 1584; 8-row tiles for every launch (TANDEM_GEMV_NARROW_ALL=1) gave 1173 and 1624.
    """
    n, k = shape
    n_sm = _multiprocessors(torch.device(device))
    tuned_n, tuned_pps, tuned_stages, tuned_warps = _gemv_tuning(qtype, n, k, n_sm)
    num_warps = num_warps or tuned_warps
    block_n = block_n or tuned_n
    programs_per_sm = programs_per_sm or tuned_pps
    num_stages = num_stages or tuned_stages
    group = GROUP_ELEMS.get(qtype, _DENSE_GROUP)
    block_k = max(group, block_k)
    n_tiles = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split = max(1, min(k_tiles, programs_per_sm * n_sm // n_tiles))
    prefetch = qtype in KERNEL_TYPES and quants.tensor_nbytes(qtype, shape) <= _PREFETCH_MAX_BYTES
    row_tile = row_tile or (GEMV_ROW_TILE if num_warps == 2 else GEMV_ROWS_MAX)
    return KernelConfig(block_n=block_n, block_m=GEMV_ROWS_MAX, block_k=block_k, split_k=split,
                        num_warps=num_warps, num_stages=num_stages, prefetch=prefetch, pdl=True,
                        row_tile=row_tile)


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



@triton.jit(do_not_specialize=["M"])
def _qmatmul_kernel(
    x_ptr, stride_xm, y_ptr, stride_ym, bias_ptr,
    q_ptr, h_ptr, s_ptr, d_ptr, m_ptr, sq, sh, ss, sd, sm,
    ws_ptr, cnt_ptr,
    M, N, K, n_groups, n_k_tiles, tiles_per_split,
    SPLIT_K: tl.constexpr, QTYPE: tl.constexpr, G: tl.constexpr, NG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_IN_F32: tl.constexpr, FAST: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    PF_LINES: tl.constexpr, PF_META_LINES: tl.constexpr, PF_META_COLS: tl.constexpr, USE_GDC: tl.constexpr,
    VEC_META: tl.constexpr, DEFER: tl.constexpr, PRESCALED: tl.constexpr, ROW_TILES: tl.constexpr,
    WS_ROWS: tl.constexpr, PTX_PACK: tl.constexpr,
):
    _matmul_tile(
        tl.program_id(0), tl.program_id(1), tl.program_id(2), x_ptr, stride_xm, y_ptr, stride_ym, bias_ptr,
        q_ptr, h_ptr, s_ptr, d_ptr, m_ptr, sq, sh, ss, sd, sm, ws_ptr, cnt_ptr,
        M, N, K, n_groups, n_k_tiles, tiles_per_split,
        SPLIT_K, QTYPE, G, NG, BLOCK_M, BLOCK_N, HAS_BIAS, DOT_IN_F32, FAST, EVEN_N, EVEN_K,
        PF_LINES, PF_META_LINES, PF_META_COLS, USE_GDC, VEC_META, DEFER, PRESCALED, ROW_TILES, WS_ROWS,
        PTX_PACK,
    )


@triton.jit(do_not_specialize=["M"])
def _qmatmul_pair_kernel(
    x_ptr, stride_xm,
    a_q, a_h, a_s, a_d, a_m, a_sq, a_sh, a_ss, a_sd, a_sm, a_ws,
    a_N, a_n_groups, a_n_k_tiles, a_tiles_per_split,
    b_q, b_h, b_s, b_d, b_m, b_sq, b_sh, b_ss, b_sd, b_sm, b_ws,
    b_N, b_n_groups, b_n_k_tiles, b_tiles_per_split,
    M, K,
    A_TILES: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_IN_F32: tl.constexpr, USE_GDC: tl.constexpr, ROW_TILES: tl.constexpr, WS_ROWS: tl.constexpr,
    PTX_PACK: tl.constexpr,
    A_QTYPE: tl.constexpr, A_G: tl.constexpr, A_NG: tl.constexpr, A_FAST: tl.constexpr,
    A_EVEN_N: tl.constexpr, A_EVEN_K: tl.constexpr, A_PF_LINES: tl.constexpr, A_PF_META_LINES: tl.constexpr,
    A_PF_META_COLS: tl.constexpr, A_VEC_META: tl.constexpr, A_PRESCALED: tl.constexpr,
    B_QTYPE: tl.constexpr, B_G: tl.constexpr, B_NG: tl.constexpr, B_FAST: tl.constexpr,
    B_EVEN_N: tl.constexpr, B_EVEN_K: tl.constexpr, B_PF_LINES: tl.constexpr, B_PF_META_LINES: tl.constexpr,
    B_PF_META_COLS: tl.constexpr, B_VEC_META: tl.constexpr, B_PRESCALED: tl.constexpr,
):
    """Two GEMVs of one input in one launch (`qmatmul_pair`): column tiles [0, A_TILES) are weight A's,
    the rest weight B's; each program runs exactly the single-weight kernel's split-output program."""
    pid_n = tl.program_id(1)
    if pid_n < A_TILES:
        _matmul_tile(
            tl.program_id(0), pid_n, tl.program_id(2), x_ptr, stride_xm, a_ws, a_N, a_ws,
            a_q, a_h, a_s, a_d, a_m, a_sq, a_sh, a_ss, a_sd, a_sm, a_ws, a_ws,
            M, a_N, K, a_n_groups, a_n_k_tiles, a_tiles_per_split,
            SPLIT_K, A_QTYPE, A_G, A_NG, BLOCK_M, BLOCK_N, False, DOT_IN_F32, A_FAST, A_EVEN_N, A_EVEN_K,
            A_PF_LINES, A_PF_META_LINES, A_PF_META_COLS, USE_GDC, A_VEC_META, True, A_PRESCALED,
            ROW_TILES, WS_ROWS, PTX_PACK,
        )
    else:
        _matmul_tile(
            tl.program_id(0), pid_n - A_TILES, tl.program_id(2), x_ptr, stride_xm, b_ws, b_N, b_ws,
            b_q, b_h, b_s, b_d, b_m, b_sq, b_sh, b_ss, b_sd, b_sm, b_ws, b_ws,
            M, b_N, K, b_n_groups, b_n_k_tiles, b_tiles_per_split,
            SPLIT_K, B_QTYPE, B_G, B_NG, BLOCK_M, BLOCK_N, False, DOT_IN_F32, B_FAST, B_EVEN_N, B_EVEN_K,
            B_PF_LINES, B_PF_META_LINES, B_PF_META_COLS, USE_GDC, B_VEC_META, True, B_PRESCALED,
            ROW_TILES, WS_ROWS, PTX_PACK,
        )


@triton.jit
def _matmul_tile(
    pid_m, pid_n, pid_s, x_ptr, stride_xm, y_ptr, stride_ym, bias_ptr,
    q_ptr, h_ptr, s_ptr, d_ptr, m_ptr, sq, sh, ss, sd, sm,
    ws_ptr, cnt_ptr,
    M, N, K, n_groups, n_k_tiles, tiles_per_split,
    SPLIT_K: tl.constexpr, QTYPE: tl.constexpr, G: tl.constexpr, NG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_IN_F32: tl.constexpr, FAST: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    PF_LINES: tl.constexpr, PF_META_LINES: tl.constexpr, PF_META_COLS: tl.constexpr, USE_GDC: tl.constexpr,
    VEC_META: tl.constexpr, DEFER: tl.constexpr, PRESCALED: tl.constexpr, ROW_TILES: tl.constexpr,
    WS_ROWS: tl.constexpr, PTX_PACK: tl.constexpr,
):
    """The program (pid_m, pid_n, pid_s) of a matmul: rows pid_m * ROW_TILES * BLOCK_M + [0, ROW_TILES *
    BLOCK_M) (ROW_TILES tiles of BLOCK_M rows, each its own tensor-core product on the same dequantized
    weight tile), column tile pid_n, K split pid_s. WS_ROWS: rows a split takes in the workspace."""
    BKH: tl.constexpr = NG * G
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    if EVEN_N:  # an all-true constant mask: the compiler drops it from every load
        n_mask = tl.full([BLOCK_N], 1, tl.int1)
    else:
        n_mask = n < N
    rows = n.to(tl.int64)
    t_start = pid_s * tiles_per_split
    t_stop = tl.minimum(t_start + tiles_per_split, n_k_tiles)
    if PF_LINES > 0:  # the whole weight slice of this program in flight at once (see prefetch_weight_slice)
        prefetch_weight_slice(q_ptr, h_ptr, s_ptr, d_ptr, m_ptr, sq, sh, ss, sd, sm, rows, n_mask,
                              t_start, t_stop, n_k_tiles, QTYPE, PF_LINES, PF_META_LINES, VEC_META,
                              pid_n * BLOCK_N, N, PF_META_COLS, BLOCK_N, FAST and PRESCALED)
    wait_for_previous(USE_GDC)  # launched as a programmatic dependent: nothing above reads x or writes
    m = pid_m * (BLOCK_M * ROW_TILES) + tl.arange(0, BLOCK_M)  # [BM] the first row tile
    m_mask = m < M
    x_rows = x_ptr + m.to(tl.int64)[None, :] * stride_xm  # [1, BM]
    m2 = m + BLOCK_M  # the second row tile (ROW_TILES 2)
    m2_mask = m2 < M
    x_rows2 = x_ptr + m2.to(tl.int64)[None, :] * stride_xm

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # y.T tile
    acc2 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # y.T tile of the second row tile
    for t in range(t_start, t_stop):
        gi = t * NG + tl.arange(0, NG)  # groups of this tile  [NG]
        if EVEN_K:
            g_mask = tl.full([NG], 1, tl.int1)
        else:
            g_mask = gi < n_groups
        if FAST and QTYPE == 14:  # Q6_K: four quarter tiles (see _tile_q6_k_fast)
            w0, w1, w2, w3 = tile_q6_k_fast(q_ptr, h_ptr, s_ptr, d_ptr, sq, sh, ss, sd, rows, n_mask, gi,
                                            g_mask, pid_n * BLOCK_N, N, BLOCK_N, NG,
                                            VEC_META)  # [BN, NG * 32] each
            jj = tl.arange(0, NG * 32)
            k0 = (t * NG + jj // 32) * 128 + jj % 32  # [NG * 32]
            acc = _dot_x(acc, w0, x_rows, k0, m_mask, K, DOT_IN_F32, EVEN_K)
            acc = _dot_x(acc, w1, x_rows, k0 + 32, m_mask, K, DOT_IN_F32, EVEN_K)
            acc = _dot_x(acc, w2, x_rows, k0 + 64, m_mask, K, DOT_IN_F32, EVEN_K)
            acc = _dot_x(acc, w3, x_rows, k0 + 96, m_mask, K, DOT_IN_F32, EVEN_K)
            if ROW_TILES == 2:
                acc2 = _dot_x(acc2, w0, x_rows2, k0, m2_mask, K, DOT_IN_F32, EVEN_K)
                acc2 = _dot_x(acc2, w1, x_rows2, k0 + 32, m2_mask, K, DOT_IN_F32, EVEN_K)
                acc2 = _dot_x(acc2, w2, x_rows2, k0 + 64, m2_mask, K, DOT_IN_F32, EVEN_K)
                acc2 = _dot_x(acc2, w3, x_rows2, k0 + 96, m2_mask, K, DOT_IN_F32, EVEN_K)
        else:
            w_lo, w_hi = dequant_tile(q_ptr, h_ptr, s_ptr, d_ptr, m_ptr, sq, sh, ss, sd, sm, rows, n_mask,
                                      gi, g_mask, K, pid_n * BLOCK_N, N, QTYPE, BLOCK_N, BKH, FAST, VEC_META,
                                      NG, PRESCALED, PTX_PACK)  # [BN, BKH] each
            k_lo = k_index(t, NG, G)  # [BKH]
            acc = _dot_x(acc, w_lo, x_rows, k_lo, m_mask, K, DOT_IN_F32, EVEN_K)
            acc = _dot_x(acc, w_hi, x_rows, k_lo + G, m_mask, K, DOT_IN_F32, EVEN_K)
            if ROW_TILES == 2:
                acc2 = _dot_x(acc2, w_lo, x_rows2, k_lo, m2_mask, K, DOT_IN_F32, EVEN_K)
                acc2 = _dot_x(acc2, w_hi, x_rows2, k_lo + G, m2_mask, K, DOT_IN_F32, EVEN_K)

    if DEFER:  # the reader adds the splits (kernels/split_output.py): park this split's sums, done
        _park_split(acc, ws_ptr, m, m_mask, n, n_mask, N, pid_s, WS_ROWS)
        if ROW_TILES == 2:
            _park_split(acc2, ws_ptr, m2, m2_mask, n, n_mask, N, pid_s, WS_ROWS)
    elif SPLIT_K == 1:
        _store_output(acc, y_ptr, stride_ym, bias_ptr, n, n_mask, m, m_mask, HAS_BIAS)
        if ROW_TILES == 2:
            _store_output(acc2, y_ptr, stride_ym, bias_ptr, n, n_mask, m2, m2_mask, HAS_BIAS)
    else:
        # Park this split's partial sums, then the last program of the column tile adds all splits
        # in order 0..SPLIT_K-1 (deterministic whichever program finishes last).
        _park_split(acc, ws_ptr, m, m_mask, n, n_mask, N, pid_s, WS_ROWS)
        if ROW_TILES == 2:
            _park_split(acc2, ws_ptr, m2, m2_mask, n, n_mask, N, pid_s, WS_ROWS)
        tl.debug_barrier()  # every thread's stores are issued before the release below
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:
            _add_splits(ws_ptr, y_ptr, stride_ym, bias_ptr, m, m_mask, n, n_mask, N, SPLIT_K, WS_ROWS,
                        HAS_BIAS)
            if ROW_TILES == 2:
                _add_splits(ws_ptr, y_ptr, stride_ym, bias_ptr, m2, m2_mask, n, n_mask, N, SPLIT_K, WS_ROWS,
                            HAS_BIAS)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)  # ready for the next call (and the next graph replay)


@triton.jit
def _park_split(acc, ws_ptr, m, m_mask, n, n_mask, N, pid_s, WS_ROWS: tl.constexpr):
    """Store split pid_s's partial sums acc [BN, BM] of rows m in a (SPLIT_K, WS_ROWS, N) workspace
    (padding rows are neither written nor read)."""
    ws_tile = ws_ptr + m[None, :] * N + n[:, None]  # [BN, BM]
    tl.store(ws_tile + pid_s * (WS_ROWS * N), acc, mask=n_mask[:, None] & m_mask[None, :])


@triton.jit
def _add_splits(ws_ptr, y_ptr, stride_ym, bias_ptr, m, m_mask, n, n_mask, N, SPLIT_K: tl.constexpr,
                WS_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y[m, n] = the splits' partial sums added in order 0..SPLIT_K-1 (+ bias). The loop is unrolled so
    the loads are all in flight at once (a rolled loop waited for each)."""
    ws_tile = ws_ptr + m[None, :] * N + n[:, None]  # [BN, BM]
    ws_mask = n_mask[:, None] & m_mask[None, :]
    total = tl.load(ws_tile, mask=ws_mask, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLIT_K):
        total += tl.load(ws_tile + s * (WS_ROWS * N), mask=ws_mask, other=0.0, cache_modifier=".cg")
    _store_output(total, y_ptr, stride_ym, bias_ptr, n, n_mask, m, m_mask, HAS_BIAS)


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
    """(10 pointer/stride args in kernel order q, h, s, d, m, sq, sh, ss, sd, sm; QTYPE code; G).
    A field's stride is its elements per row: its row stride, or for a column-major field (Q6_K's d in
    the vector layout, addressed e * N + n by the kernel) what the prefetch counts its span with."""
    if w.dense is not None:
        t = w.dense
        return [t, t, t, t, t, t.stride(0), 0, 0, 0, 0], _DENSE, _DENSE_GROUP // 2
    ptrs, strides = [], []
    for role in ("q", "h", "s", "d", "m"):
        t = w.fields.get(role)
        ptrs.append(t if t is not None else w.fields["q"])
        strides.append(t.shape[1] if t is not None else 0)
    return ptrs + strides, int(w.qtype), GROUP_ELEMS[w.qtype] // 2


@dataclass(frozen=True)
class _Plan:
    """How one weight's matmul launches for an input x: the kernel's weight arguments, sizes and flags."""

    wargs: list  # q, h, s, d, m pointers and their strides (_weight_args)
    n: int
    n_groups: int
    n_k_tiles: int
    tiles_per_split: int
    split: int
    n_tiles: int
    flags: dict  # the weight's compile-time arguments: QTYPE, G, NG, FAST, EVEN_N, EVEN_K, PF_*, VEC_META,
    # PRESCALED


def _plan(x: torch.Tensor, w: QuantizedWeight, cfg: KernelConfig, defer: bool) -> _Plan:
    m, k = x.shape
    n = w.shape[0]
    wargs, qtype_code, half = _weight_args(w)
    group = 2 * half
    if cfg.block_k % group or not _is_pow2(cfg.block_k // group):
        raise ValueError(f"block_k {cfg.block_k} must be a power-of-two multiple of the {group}-value group")
    ng = cfg.block_k // group
    n_groups = triton.cdiv(k, group)
    n_k_tiles = triton.cdiv(n_groups, ng)
    gemv = cfg.block_m == GEMV_ROWS_MAX and m <= GEMV_ROWS_MAX
    if defer and not gemv:
        raise ValueError("split_output needs the GEMV launch (M <= 16, block_m 16)")
    if gemv and cfg.split_k > 1:
        tiles_per_split = triton.cdiv(n_k_tiles, cfg.split_k)
        split = triton.cdiv(n_k_tiles, tiles_per_split)
    else:
        tiles_per_split, split = n_k_tiles, 1
    if split > 1 and not defer and cfg.block_n < _COUNTER_TILE_MIN:
        raise ValueError(f"split-K needs block_n >= {_COUNTER_TILE_MIN}")
    pf_lines, pf_meta_lines, pf_meta_cols = 0, 0, 0
    if cfg.prefetch:
        column_d = w.vector_meta and w.qtype == QT.Q6_K  # d column-major (kernels/qmatmul_layouts.py)
        pf_lines, pf_meta_lines = prefetch_lines(wargs, tiles_per_split, n_k_tiles, column_d=column_d)
        pf_meta_cols = prefetch_column_span(w.fields["d"], tiles_per_split, n_k_tiles) if column_d else 0
    flags = dict(
        QTYPE=qtype_code, G=half, NG=ng, FAST=cfg.fast and _use_fast_dequant(w, x),
        EVEN_N=n % cfg.block_n == 0, EVEN_K=k % cfg.block_k == 0 and n_groups % ng == 0,
        PF_LINES=pf_lines, PF_META_LINES=pf_meta_lines, PF_META_COLS=pf_meta_cols, VEC_META=w.vector_meta,
        PRESCALED=w.prescaled,
    )
    return _Plan(wargs, n, n_groups, n_k_tiles, tiles_per_split, split, triton.cdiv(n, cfg.block_n), flags)


def _launch(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None,
            cfg: KernelConfig, defer: bool = False) -> torch.Tensor | SplitOutput:
    m, k = x.shape
    plan = _plan(x, w, cfg, defer)
    n, split = plan.n, plan.split
    y = None if defer else torch.empty((m, n), dtype=x.dtype, device=x.device)  # (M, N)
    if split > 1 or defer:
        ws = torch.empty((split, cfg.block_m, n), dtype=torch.float32, device=x.device)  # (S, 16, N)
    else:
        ws = y
    y_arg = ws if defer else y  # the kernel's y pointer (unread when deferred)
    gdc = cfg.pdl and pdl_supported(x.device)
    block_m, row_tiles = _row_tiles(cfg, m)
    grid = (triton.cdiv(m, block_m * row_tiles), plan.n_tiles, split)
    _qmatmul_kernel[grid](
        x, x.stride(0), y_arg, n, bias if bias is not None else y_arg,
        *plan.wargs, ws, w.counters,
        m, n, k, plan.n_groups, plan.n_k_tiles, plan.tiles_per_split,
        SPLIT_K=split, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        HAS_BIAS=bias is not None, DOT_IN_F32=_INTERPRETED and x.dtype == torch.bfloat16,
        USE_GDC=gdc, DEFER=defer, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **plan.flags,
        ROW_TILES=row_tiles, WS_ROWS=cfg.block_m, PTX_PACK=_ptx_pack(cfg),
        **({"launch_pdl": True} if gdc else {}),
    )
    return SplitOutput(ws, bias, m, x.dtype) if defer else y


def _row_tiles(cfg: KernelConfig, m: int) -> tuple[int, int]:
    """(rows of a tensor-core tile, tiles a program) for m rows. A GEMV launch (block_m 16, m <= 16) takes
    cfg.row_tile-row tiles, two on the same dequantized weight tile for 9..16 rows when that is 8: every
    row of a weight goes through the same product whatever m (an 8-row tile gives other bits than a 16-row
    one), so row i of an m-row call keeps the bits of the 1-row call. TANDEM_GEMV_WIDE_TILE=1 /
    TANDEM_GEMV_NARROW_ALL=1 make every launch's tile 16 / 8 rows (read at each launch: A/Bs)."""
    if cfg.block_m != GEMV_ROWS_MAX or m > GEMV_ROWS_MAX:
        return cfg.block_m, 1
    if os.environ.get("TANDEM_GEMV_WIDE_TILE") == "1":
        tile = GEMV_ROWS_MAX
    elif os.environ.get("TANDEM_GEMV_NARROW_ALL") == "1":
        tile = GEMV_ROW_TILE
    else:
        tile = cfg.row_tile
    return tile, 1 if m <= tile else GEMV_ROWS_MAX // tile


def _ptx_pack(cfg: KernelConfig) -> int:
    """Quant bytes one inline-PTX call of the Q4_K fast path dequantizes (kernels/qmatmul_tiles.py): 4 in
    launches of fewer than 4 warps (mma.sync, whose operand registers each hold four adjacent bytes: two a
    call make the compiler take them apart and glue pairs again), 2 in the others (wgmma, where four a call
    cost byte permutes instead). Loop instructions a K-tile, sm_90 with Triton 3.6: the 2-warp 17920 x 1536
    launch 495 -> 360, the 4-warp 2048 x 1536 one 238 -> 294. The values are the same either way (each
    output depends on its own element's inputs), so the bits are. TANDEM_GEMV_TWO_BYTE_PTX=1 (read at each
    launch) gives every launch two bytes a call, as before session 17, for an A/B."""
    if os.environ.get("TANDEM_GEMV_TWO_BYTE_PTX") == "1":
        return 2
    return 4 if cfg.num_warps < 4 else 2


def pair_config(a: QuantizedWeight, b: QuantizedWeight) -> KernelConfig | None:
    """The launch two weights' GEMVs share in `qmatmul_pair`, or None when their GEMV launches differ in
    anything but the weight (block sizes, warps, stages, PDL, the K split)."""
    ca, cb = a.gemv_config, b.gemv_config
    if a.shape[1] != b.shape[1] or replace(ca, prefetch=False) != replace(cb, prefetch=False):
        return None
    return ca


def qmatmul_pair(
    x: torch.Tensor, a: QuantizedWeight, b: QuantizedWeight, bias_a: torch.Tensor | None = None,
    bias_b: torch.Tensor | None = None,
) -> tuple[SplitOutput, SplitOutput]:
    """`qmatmul(x, a, bias_a, split_output=True)` and the same for b in one launch (M <= 16; `pair_config`
    must accept the two): each weight's programs are those of its own launch, so are the bits. Meant for
    weights of different types read by one kernel (Q/K in Q4_K and V in Q6_K: kernels.rope_kv_write)."""
    m, k = x.shape
    cfg = pair_config(a, b)
    if cfg is None or m > GEMV_ROWS_MAX or b.shape[1] != k or a.shape[1] != k:
        raise ValueError("qmatmul_pair needs two weights of one width with the same GEMV launch, M <= 16")
    if x.dtype not in (torch.float16, torch.bfloat16) or x.device != a.device or x.device != b.device:
        raise ValueError("x must be float16/bfloat16 on the weights' device")
    if x.stride(1) != 1:
        x = x.contiguous()
    pa, pb = _plan(x, a, a.gemv_config, True), _plan(x, b, b.gemv_config, True)
    if pa.split != pb.split:
        raise ValueError(f"qmatmul_pair: the two weights split K in {pa.split} and {pb.split}")
    ws = [torch.empty((p.split, cfg.block_m, p.n), dtype=torch.float32, device=x.device) for p in (pa, pb)]
    gdc = cfg.pdl and pdl_supported(x.device)
    flags = {f"A_{key}": v for key, v in pa.flags.items()} | {f"B_{key}": v for key, v in pb.flags.items()}
    block_m, row_tiles = _row_tiles(cfg, m)
    _qmatmul_pair_kernel[(1, pa.n_tiles + pb.n_tiles, pa.split)](
        x, x.stride(0),
        *pa.wargs, ws[0], pa.n, pa.n_groups, pa.n_k_tiles, pa.tiles_per_split,
        *pb.wargs, ws[1], pb.n, pb.n_groups, pb.n_k_tiles, pb.tiles_per_split,
        m, k, A_TILES=pa.n_tiles, SPLIT_K=pa.split, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        DOT_IN_F32=_INTERPRETED and x.dtype == torch.bfloat16, USE_GDC=gdc, ROW_TILES=row_tiles,
        WS_ROWS=cfg.block_m, PTX_PACK=_ptx_pack(cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **flags,
        **({"launch_pdl": True} if gdc else {}),
    )
    return SplitOutput(ws[0], bias_a, m, x.dtype), SplitOutput(ws[1], bias_b, m, x.dtype)


def _use_fast_dequant(w: QuantizedWeight, x: torch.Tensor) -> bool:
    return (_ASM_ENABLED and not _INTERPRETED and x.dtype == torch.float16 and w.qtype in FAST_TYPES
            and x.device.type == "cuda" and torch.version.hip is None)  # the asm is NVIDIA PTX


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def qmatmul(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None, *,
            config: KernelConfig | None = None, split_output: bool = False) -> torch.Tensor | SplitOutput:
    """x (M, K) float16/bfloat16 -> (M, N) same dtype, float32 accumulation.

    For M <= 16, row i of the result is bit for bit that of qmatmul(x[i:i+1], w, bias).
    `config` overrides the launch (tests, benchmarks); keep it None in the engine.
    split_output: for M <= 16 return the K-split partial sums as a SplitOutput (kernels/split_output.py)
    for a reader that adds them (the same bits); for larger M (or no GEMV) a tensor as usual.
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
            return _launch(x, w, bias, w.gemv_config, defer=split_output)
        elif w.dense is not None:  # cuBLAS for prefill of dense weights
            weight = w.dense if w.dense.dtype == x.dtype else w.dense.to(x.dtype)
            return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
        else:
            config = default_gemm_config(w.qtype, m)
    return _launch(x, w, bias, config, defer=split_output and m <= GEMV_ROWS_MAX)
