"""kernels.argmax.argmax_rows against torch.argmax on the float32 logits (argmax_reference)."""

import pytest
import torch

from kernels.argmax import BLOCK, argmax_reference, argmax_rows
from tests.kernels._util import DEVICE, gpu


def _logits(rows, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, n, generator=gen) * 4).to(torch.float16).to(DEVICE)  # (R, V)


@pytest.mark.parametrize("rows,n", [(1, 3 * BLOCK + 77), (4, BLOCK), (3, 100)])
def test_argmax_rows_equal_torch(rows, n):
    x = _logits(rows, n, n)
    wide = torch.full((rows, n), float("nan"), device=DEVICE)
    got = argmax_rows(x, wide)
    want_wide, want = argmax_reference(x)
    assert torch.equal(wide, want_wide)
    assert torch.equal(got, want)


def test_ties_go_to_the_first_index_across_blocks():
    # the maximum held at one column of block 0's end, in block 1 and in block 2: the first wins; then
    # only in blocks 1 and 2; a row whose maximum is the last column
    n = 3 * BLOCK
    x = torch.zeros(3, n, dtype=torch.float16, device=DEVICE)
    x[0, [BLOCK - 1, BLOCK + 5, 2 * BLOCK]] = 7.0
    x[1, [BLOCK + 5, BLOCK + 9, 2 * BLOCK + 1]] = 7.0
    x[2, n - 1] = 1.0
    assert argmax_rows(x).tolist() == argmax_reference(x)[1].tolist() == [BLOCK - 1, BLOCK + 5, n - 1]
    flat = torch.full((1, n), -2.0, dtype=torch.float16, device=DEVICE)  # every column ties: index 0
    assert argmax_rows(flat).tolist() == [0]


def test_nan_is_below_every_number():
    x = _logits(1, 500, 3)
    x[0, 10] = float("nan")
    assert int(argmax_rows(x)) == int(torch.nan_to_num(x.float(), nan=-float("inf")).argmax())


@gpu
def test_argmax_rows_vocabulary_size_gpu():
    x = _logits(16, 151936, 1)
    wide = torch.empty(16, 151936, device=DEVICE)
    got = argmax_rows(x, wide)
    want_wide, want = argmax_reference(x)
    assert torch.equal(wide, want_wide) and torch.equal(got, want)
