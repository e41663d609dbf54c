"""kernels.step_inputs against step_inputs_reference (torch's gather, widening and position arithmetic)."""

import pytest
import torch

from kernels.step_inputs import step_inputs, step_inputs_reference
from tests.kernels._util import DEVICE


@pytest.mark.parametrize("scale", [1.0, 25.3], ids=["unscaled", "gemma-scale"])
def test_step_inputs_equal_torch(scale):
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(50, 96, generator=gen).to(DEVICE, torch.float16)  # (V, D), D not a power of 2
    # [tokens; positions], the last row padding
    inputs = torch.tensor([[7, 49, 0, 3], [12, 13, 14, -1]], dtype=torch.int64, device=DEVICE)
    x, lengths, positions = step_inputs(inputs, table, scale)
    want_x, want_lengths, want_positions = step_inputs_reference(inputs.clone(), table, scale)
    assert torch.equal(x, want_x) and torch.equal(lengths, want_lengths)
    assert torch.equal(positions, want_positions) and positions.data_ptr() == inputs[1].data_ptr()
    assert lengths.tolist() == [13, 14, 15, 0]
    assert inputs[1].tolist() == [12, 13, 14, -1]  # not advanced


@pytest.mark.parametrize("scale", [1.0, 25.3], ids=["unscaled", "gemma-scale"])
def test_step_inputs_advance_in_place(scale):
    """advance: the step's positions come out as a copy and the buffer holds the next step's positions,
    as the reference leaves its own buffer; the tokens row is untouched."""
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(50, 96, generator=gen).to(DEVICE, torch.float16)  # (V, D)
    inputs = torch.tensor([[7, 49], [40, -1]], dtype=torch.int64, device=DEVICE)
    reference_inputs = inputs.clone()
    x, lengths, positions = step_inputs(inputs, table, scale, advance=True)
    want_x, want_lengths, want_positions = step_inputs_reference(reference_inputs, table, scale, advance=True)
    assert torch.equal(x, want_x) and torch.equal(lengths, want_lengths)
    assert positions.tolist() == want_positions.tolist() == [40, -1]
    assert positions.data_ptr() != inputs[1].data_ptr()
    assert inputs.tolist() == reference_inputs.tolist() == [[7, 49], [41, 0]]
