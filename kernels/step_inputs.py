"""The first launch of a captured step: the rows' embeddings, their attention lengths and their positions,
from the step's [tokens; positions] buffer, which it can advance in place to the next step's positions.

In torch that was five small kernels at the head of every step graph (the embedding gather, its
widening to float32, positions + 1, its cast to int32, and positions + 1 again for the next step's
inputs), none of them chained by programmatic dependent launch. Here one program per row does all of
it (kernels/pdl.py: the add + RMSNorm launch behind it overlaps its tail). The values are torch's: the
float16 row widened to float32, times the embedding scale as a float32 multiply when there is one.

`advance`: the 1-row decode graph feeds itself (engine/cuda_graphs.py): the launch copies the positions out
for the step's own kernels and writes positions + 1 over them in the buffer, and the step's pick lands in
the buffer's token row, so the next replay finds its inputs in place with no copy between the two graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_launch, wait_for_previous


def step_positions(inputs: torch.Tensor, advance: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs: (2, R) int64 [token ids; positions (-1: padding)] -> (lengths (R,) int32 = positions + 1,
    positions (R,) int64). advance: positions is a copy and inputs[1] becomes positions + 1 (in place).
    The torch path of the engine's steps and the reference below."""
    positions = inputs[1].clone() if advance else inputs[1]
    if advance:
        inputs[1] += 1
    return (positions + 1).to(torch.int32), positions


def step_inputs_reference(
    inputs: torch.Tensor, table: torch.Tensor, scale: float, advance: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """inputs: (2, R) int64 [token ids; positions (-1: padding)], table: (V, D) float16 -> (x (R, D)
    float32 = table[tokens] * scale, lengths, positions as `step_positions`)."""
    x = table.index_select(0, inputs[0]).to(torch.float32)
    if scale != 1.0:
        x = x * scale
    return x, *step_positions(inputs, advance)


@triton.jit
def _step_inputs_kernel(
    inputs_ptr, rows, table_ptr, stride_t, x_ptr, stride_x, lengths_ptr, positions_ptr, scale, D,
    BLOCK_D: tl.constexpr, SCALED: tl.constexpr, ADVANCE: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)
    r = tl.program_id(0)
    token = tl.load(inputs_ptr + r)
    position = tl.load(inputs_ptr + rows + r)
    following = position + 1
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    x = tl.load(table_ptr + token * stride_t + cols, mask=inside).to(tl.float32)  # [BLOCK_D]
    if SCALED:
        x = x * scale
    tl.store(x_ptr + r.to(tl.int64) * stride_x + cols, x, mask=inside)
    tl.store(lengths_ptr + r, following.to(tl.int32))
    if ADVANCE:  # this program alone reads and writes row r's position
        tl.store(positions_ptr + r, position)
        tl.store(inputs_ptr + rows + r, following)


def step_inputs(
    inputs: torch.Tensor, table: torch.Tensor, scale: float, advance: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel of `step_inputs_reference`: (x (R, D) float32, lengths (R,) int32, positions (R,) int64);
    with advance the positions are a copy and inputs[1] holds positions + 1 afterwards. The launcher reads
    nothing from the device (a captured step calls it)."""
    rows = inputs.shape[1]
    if inputs.dtype != torch.int64 or not inputs.is_contiguous() or table.stride(-1) != 1:
        raise ValueError("step_inputs takes a contiguous (2, R) int64 buffer and a table of contiguous rows")
    dim = table.shape[1]
    x = torch.empty(rows, dim, dtype=torch.float32, device=inputs.device)  # (R, D)
    lengths = torch.empty(rows, dtype=torch.int32, device=inputs.device)  # (R,)
    positions = torch.empty(rows, dtype=torch.int64, device=inputs.device) if advance else inputs[1]
    _step_inputs_kernel[(rows,)](
        inputs, rows, table, table.stride(0), x, x.stride(0), lengths, positions, float(scale), dim,
        BLOCK_D=triton.next_power_of_2(dim), SCALED=scale != 1.0, ADVANCE=advance,
        num_warps=4, **pdl_launch(inputs.device),
    )
    return x, lengths, positions
