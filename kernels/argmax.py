"""Greedy picks of a step's logits: the first index of each row's maximum, with the float32 copy of the
logits written on the way.

A decode step's LM head leaves float16 logits (R, V); the step graph used to widen them to float32 (one
torch copy kernel) and take `torch.argmax` (a one-pass reduction: 7.8 us for V = 151936 on an H200), two
launches without programmatic dependent launch. Here step 1 (`_argmax_blocks_kernel`, one program per
BLOCK values of a row) reads each value once, writes its float32 copy and its block's maximum and first
index of it; step 2 (`_argmax_merge_kernel`, one program per row) takes the first block holding the row's
maximum. Both launch with PDL (kernels/pdl.py).

Picks equal torch.argmax for finite logits, ties included (the first index wins in a block, and the first
block among blocks). A row holding NaN: torch picks its first NaN; here NaN compares as below every number
(the row's maximum among the numbers is picked; a row of NaN only gives 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_launch, wait_for_previous

BLOCK = 4096  # values per program of step 1: 38 programs per row for V = 151936
MERGE_BLOCK_MAX = 1024  # step 2 holds all of a row's block maxima at once: V up to 4M


def argmax_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (R, V) float16 -> (x as float32, the first index of each row's maximum (R,) int64)."""
    wide = x.to(torch.float32)
    return wide, wide.argmax(-1)


@triton.jit
def _argmax_blocks_kernel(
    x_ptr, stride_x, wide_ptr, stride_w, max_ptr, idx_ptr, n, n_blocks,
    BLOCK: tl.constexpr, WIDE: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)
    blk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    cols = blk * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    inside = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=float("-inf")).to(tl.float32)
    if WIDE:
        tl.store(wide_ptr + row * stride_w + cols, x, mask=inside)
    x = tl.where(x == x, x, float("-inf"))  # NaN below every number
    best = tl.max(x, axis=0)
    first = tl.min(tl.where(x == best, cols, n), axis=0)  # the first index holding the maximum
    tl.store(max_ptr + row * n_blocks + blk, best)
    tl.store(idx_ptr + row * n_blocks + blk, first)


@triton.jit
def _argmax_merge_kernel(
    max_ptr, idx_ptr, n_blocks, out_ptr, BLOCKS: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    b = tl.arange(0, BLOCKS)
    seen = b < n_blocks
    best = tl.load(max_ptr + row * n_blocks + b, mask=seen, other=float("-inf"))  # [BLOCKS]
    idx = tl.load(idx_ptr + row * n_blocks + b, mask=seen, other=0)
    top = tl.max(best, axis=0)
    first_block = tl.min(tl.where(seen & (best == top), b, BLOCKS), axis=0)
    pick = tl.sum(tl.where(b == first_block, idx, 0), axis=0)  # blocks cover increasing columns
    tl.store(out_ptr + row, pick.to(tl.int64))


def argmax_rows(
    x: torch.Tensor, wide: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x: (R, V) float16 or float32 with contiguous rows -> the first index of each row's maximum, (R,)
    int64 (into `out` if given). wide: an (R, V) float32 tensor that receives x as float32, or None."""
    rows, n = x.shape
    if x.stride(-1) != 1 or (wide is not None and (wide.shape != x.shape or wide.stride(-1) != 1)):
        raise ValueError("argmax_rows needs contiguous rows (and a float32 copy of x's shape)")
    n_blocks = triton.cdiv(n, BLOCK)
    if n_blocks > MERGE_BLOCK_MAX:
        raise ValueError(f"argmax_rows takes rows of up to {MERGE_BLOCK_MAX * BLOCK} values, not {n}")
    out = torch.empty(rows, dtype=torch.int64, device=x.device) if out is None else out
    best = torch.empty(rows, n_blocks, dtype=torch.float32, device=x.device)  # (R, blocks)
    first = torch.empty(rows, n_blocks, dtype=torch.int32, device=x.device)
    _argmax_blocks_kernel[(n_blocks, rows)](
        x, x.stride(0), x if wide is None else wide, 0 if wide is None else wide.stride(0), best, first,
        n, n_blocks, BLOCK=BLOCK, WIDE=wide is not None, num_warps=8, **pdl_launch(x.device),
    )
    _argmax_merge_kernel[(rows,)](
        best, first, n_blocks, out, BLOCKS=max(16, triton.next_power_of_2(n_blocks)), num_warps=1,
        **pdl_launch(x.device),
    )
    return out
