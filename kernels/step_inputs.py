"""The first launch of a captured step: the rows' embeddings, their attention lengths and the positions
of the step that follows, from the step's [tokens; positions] buffer.

In torch that was five small kernels at the head of every step graph (the embedding gather, its
widening to float32, positions + 1, its cast to int32, and positions + 1 again for the next step's
inputs), none of them chained by programmatic dependent launch. Here one program per row does all of
it (kernels/pdl.py: the add + RMSNorm launch behind it overlaps its tail). The values are torch's: the
float16 row widened to float32, times the embedding scale as a float32 multiply when there is one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_launch, wait_for_previous


def step_inputs_reference(
    inputs: torch.Tensor, table: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """inputs: (2, R) int64 [token ids; positions (-1: padding)], table: (V, D) float16 -> (x (R, D)
    float32 = table[tokens] * scale, lengths (R,) int32 = positions + 1, positions + 1 (R,) int64)."""
    x = table.index_select(0, inputs[0]).to(torch.float32)
    if scale != 1.0:
        x = x * scale
    following = inputs[1] + 1
    return x, following.to(torch.int32), following


@triton.jit
def _step_inputs_kernel(
    inputs_ptr, rows, table_ptr, stride_t, x_ptr, stride_x, lengths_ptr, next_ptr, scale, D,
    BLOCK_D: tl.constexpr, SCALED: tl.constexpr, HAS_NEXT: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)
    r = tl.program_id(0)
    token = tl.load(inputs_ptr + r)
    following = tl.load(inputs_ptr + rows + r) + 1
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    x = tl.load(table_ptr + token * stride_t + cols, mask=inside).to(tl.float32)  # [BLOCK_D]
    if SCALED:
        x = x * scale
    tl.store(x_ptr + r.to(tl.int64) * stride_x + cols, x, mask=inside)
    tl.store(lengths_ptr + r, following.to(tl.int32))
    if HAS_NEXT:
        tl.store(next_ptr + r, following)


def step_inputs(
    inputs: torch.Tensor, table: torch.Tensor, scale: float, next_positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel of `step_inputs_reference`: returns (x (R, D) float32, lengths (R,) int32) and writes
    positions + 1 into next_positions ((R,) int64) when given. The launcher reads nothing from the device
    (a captured step calls it)."""
    rows = inputs.shape[1]
    if inputs.dtype != torch.int64 or not inputs.is_contiguous() or table.stride(-1) != 1:
        raise ValueError("step_inputs takes a contiguous (2, R) int64 buffer and a table of contiguous rows")
    dim = table.shape[1]
    x = torch.empty(rows, dim, dtype=torch.float32, device=inputs.device)  # (R, D)
    lengths = torch.empty(rows, dtype=torch.int32, device=inputs.device)  # (R,)
    _step_inputs_kernel[(rows,)](
        inputs, rows, table, table.stride(0), x, x.stride(0), lengths,
        lengths if next_positions is None else next_positions, float(scale), dim,
        BLOCK_D=triton.next_power_of_2(dim), SCALED=scale != 1.0, HAS_NEXT=next_positions is not None,
        num_warps=4, **pdl_launch(inputs.device),
    )
    return x, lengths
