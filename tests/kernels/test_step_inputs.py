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
    following = torch.full((4,), -5, dtype=torch.int64, device=DEVICE)
    x, lengths = step_inputs(inputs, table, scale, following)
    want_x, want_lengths, want_following = step_inputs_reference(inputs, table, scale)
    assert torch.equal(x, want_x) and torch.equal(lengths, want_lengths)
    assert torch.equal(following, want_following)
    assert lengths.tolist() == [13, 14, 15, 0]
    x2, _ = step_inputs(inputs, table, scale)  # without the next positions
    assert torch.equal(x2, want_x)
