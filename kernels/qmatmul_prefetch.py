"""Getting a GEMV program's weight bytes moving early: an L2 prefetch of its whole slice, and
programmatic dependent launch (PDL) so that prefetch can start while the previous kernel runs.

Why: a decode GEMV is too small to stream. At M = 1 the 8960 x 1536 Q4_K matrix (7.7 MB) took 11.6 us
on an H200 (670 GB/s) with 3-4 programs per SM (ncu: 11-18 % achieved occupancy, warps waiting on
global loads). Each program walks its K-tiles two at a time (cp.async, 2-3 stages), so it waits
for DRAM once per tile and the whole kernel lasts a chain of memory latencies, not a transfer.
`prefetch.global.L2` on every 128-byte line of the program's slice puts all of its bytes in
flight at the start (no registers, no result), and the tile loads that follow find them in L2.

With PDL (sm_90+, `launch_pdl=True` on the launch, `gdc_wait` in the kernel) a GEMV's programs may
be scheduled before the previous kernel in the stream has finished: they issue the prefetch
(weights only: nothing the previous kernel writes), then wait in `gdc_wait` for it to complete and
its memory to be visible, and only then read x or write anything. The weights never change, so
the overlap is safe; every store and every read of activations, workspace or counters stays after
the wait.

The vector-metadata layout (kernels/qmatmul_layouts.py) stores Q6_K's d column-major (element e of
row n at e * N + n): a program's slice of it is one run of BLOCK_N rows per super-block of its span,
prefetched line by line (`_prefetch_columns`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LINE_BYTES = 128
# Which optional fields (kernels/qmatmul_layouts.py roles) each QTYPE code of the kernel has.
_HAS_H = (6, 7, 13, 14)  # Q5_0, Q5_1, Q5_K, Q6_K
_HAS_S = (12, 13, 14)  # Q4_K, Q5_K, Q6_K
_HAS_M = (3, 7, 12, 13)  # Q4_1, Q5_1, Q4_K, Q5_K


def _field_lines(t: torch.Tensor, stride: int, tiles_per_split: int, n_k_tiles: int) -> int:
    """Prefetch addresses per row for one field: 128-byte lines of a split's span, + 1 for the straddle."""
    if stride == 0:
        return 0
    span = triton.cdiv(tiles_per_split * stride, n_k_tiles) + 1  # elements, rounding of both ends
    return triton.next_power_of_2(triton.cdiv(span * t.element_size(), LINE_BYTES) + 1)


def _can_prefetch(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.version.hip is None  # the interpreter has no PTX


def prefetch_lines(wargs: list, tiles_per_split: int, n_k_tiles: int, *, column_d: bool = False
                   ) -> tuple[int, int]:
    """(lines per row of the q field, the most of any other row-major field) for `prefetch_weight_slice`;
    (0, 0) where the kernel cannot prefetch (not CUDA: the interpreter has no PTX). column_d: the d
    field is column-major (counted by `prefetch_column_span`), left out here."""
    tensors, strides = wargs[:5], wargs[5:]
    if not _can_prefetch(tensors[0]):
        return 0, 0
    lines = [0 if column_d and i == 3 else _field_lines(t, st, tiles_per_split, n_k_tiles)
             for i, (t, st) in enumerate(zip(tensors, strides, strict=True))]  # i == 3: the d field
    return lines[0], max(lines[1:] + [1])


def column_span(per_row: int, tiles_per_split: int, n_k_tiles: int) -> int:
    """Element indices (a power of two) a split's K-tiles cover in a field of `per_row` elements per row:
    the span of `_field_lines`, counted in elements."""
    return triton.next_power_of_2(triton.cdiv(tiles_per_split * per_row, n_k_tiles) + 1)


def prefetch_column_span(field: torch.Tensor, tiles_per_split: int, n_k_tiles: int) -> int:
    """`column_span` of a column-major (N, per-row) field for `prefetch_weight_slice`; 0 where the
    kernel cannot prefetch."""
    return column_span(field.shape[1], tiles_per_split, n_k_tiles) if _can_prefetch(field) else 0


_ASM_PREFETCH_L2: tl.constexpr = tl.constexpr("prefetch.global.L2 [$1];\nmov.u32 $0, 0;")


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the line of every address (fire and forget: the result is a dummy 0)."""
    return tl.inline_asm_elementwise(_ASM_PREFETCH_L2, "=r,l", [ptrs], dtype=tl.int32, is_pure=False,
                                     pack=1)


@triton.jit
def _prefetch_field(ptr, stride, rows, row_mask, t_start, t_stop, n_k_tiles, LINES: tl.constexpr):
    """The elements of K-tiles [t_start, t_stop) of each of `rows` of an (N, stride) field array:
    addresses 128 bytes apart from the span's first element, the last one clamped to its end."""
    LINE: tl.constexpr = 128 // (ptr.dtype.element_ty.primitive_bitwidth // 8)  # elements per line
    lo = t_start * stride // n_k_tiles  # first element of the span in each row
    hi = (t_stop * stride + n_k_tiles - 1) // n_k_tiles  # one past its last
    offs = tl.minimum(lo + tl.arange(0, LINES) * LINE, hi - 1)  # [LINES]
    ptrs = ptr + rows[:, None] * stride + offs[None, :]  # [BN, LINES]
    prefetch_l2(tl.where(row_mask[:, None], ptrs, ptr))


@triton.jit
def _prefetch_columns(ptr, per_row, n0, N, t_start, t_stop, n_k_tiles, COLS: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """The elements of K-tiles [t_start, t_stop) of rows [n0, n0 + BLOCK_N) of a column-major field
    (element e of row n at ptr + e * N + n): for each element index of the span (clamped to its
    last), addresses 128 bytes apart along the run of rows, the last clamped to the run's last row."""
    ELEM: tl.constexpr = ptr.dtype.element_ty.primitive_bitwidth // 8
    LINE: tl.constexpr = 128 // ELEM  # elements per line
    RUN_LINES: tl.constexpr = 2 * ((BLOCK_N * ELEM + 127) // 128)  # >= lines of a run + 1 (straddle)
    lo = t_start * per_row // n_k_tiles
    hi = (t_stop * per_row + n_k_tiles - 1) // n_k_tiles
    e = tl.minimum(lo + tl.arange(0, COLS), hi - 1)  # [COLS]
    r = tl.minimum(n0 + tl.arange(0, RUN_LINES) * LINE, tl.minimum(n0 + BLOCK_N, N) - 1)  # [RUN_LINES]
    prefetch_l2(ptr + e.to(tl.int64)[None, :] * N + r[:, None])


@triton.jit
def prefetch_weight_slice(q_ptr, h_ptr, s_ptr, d_ptr, m_ptr, sq, sh, ss, sd, sm, rows, row_mask,
                          t_start, t_stop, n_k_tiles, QTYPE: tl.constexpr, PF_LINES: tl.constexpr,
                          PF_META_LINES: tl.constexpr, VEC_META: tl.constexpr, n0, N,
                          PF_META_COLS: tl.constexpr, BLOCK_N: tl.constexpr, PRESCALED: tl.constexpr = False):
    """L2 prefetch of every field's bytes that this program's K-tiles [t_start, t_stop) of rows
    [n0, n0 + BLOCK_N) will read. VEC_META: the vector-metadata layout (kernels/qmatmul_layouts.py),
    where Q4_K / Q5_K keep d and dmin in `s` (no m field; Q4_K's d field, if any, holds precomputed
    scales) and Q6_K's d is column-major. PRESCALED:
    Q4_K's fast path, which reads its precomputed scales (the `d` role, qmatmul_layouts.q4_k_scales)
    instead of `s`."""
    _prefetch_field(q_ptr, sq, rows, row_mask, t_start, t_stop, n_k_tiles, PF_LINES)
    K_HEAD: tl.constexpr = VEC_META and (QTYPE == 12 or QTYPE == 13)
    if VEC_META and QTYPE == 14:
        if PF_META_COLS > 0:
            _prefetch_columns(d_ptr, sd, n0, N, t_start, t_stop, n_k_tiles, PF_META_COLS, BLOCK_N)
    elif QTYPE >= 0 and not K_HEAD:  # quantized: the block scales
        _prefetch_field(d_ptr, sd, rows, row_mask, t_start, t_stop, n_k_tiles, PF_META_LINES)
    if QTYPE == 6 or QTYPE == 7 or QTYPE == 13 or QTYPE == 14:
        _prefetch_field(h_ptr, sh, rows, row_mask, t_start, t_stop, n_k_tiles, PF_META_LINES)
    if PRESCALED:
        _prefetch_field(d_ptr, sd, rows, row_mask, t_start, t_stop, n_k_tiles, PF_META_LINES)
    elif QTYPE == 12 or QTYPE == 13 or QTYPE == 14:
        _prefetch_field(s_ptr, ss, rows, row_mask, t_start, t_stop, n_k_tiles, PF_META_LINES)
    if QTYPE == 3 or QTYPE == 7 or ((QTYPE == 12 or QTYPE == 13) and not K_HEAD):
        _prefetch_field(m_ptr, sm, rows, row_mask, t_start, t_stop, n_k_tiles, PF_META_LINES)
