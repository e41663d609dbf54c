"""A GEMV's output handed on as its K-split partial sums, added up by the kernel that reads it.

A decode GEMV (kernels.qmatmul, M <= 16) splits K over several programs per column tile. Adding their
partial sums inside the GEMV costs each program a chain of memory round trips after its last K-tile:
store the partials, a GPU-wide fence, an atomic on the tile's counter, a barrier to learn whether it
was last, then (the last one) read every split back and store y. ncu on an H200 (fused gate/up
17920 x 1536 Q4_K, M = 1): 22 % of the GEMV's warp stall samples sit in that tail.

With `qmatmul(x, w, bias, split_output=True)` the GEMV stores its partials and stops; the next kernel,
which reads y anyway and already waits for the GEMV to finish (programmatic dependent launch), adds
them while loading:

    y = qmatmul(h, w, split_output=True)      # SplitOutput, (M, N)
    out = gated_activation(y.columns(0, F), y.columns(F, 2 * F), "silu")   # the consumer takes either form

The value is bit for bit what the GEMV would have stored: float32 partials added in split order
0, 1, 2..., the bias added, rounded to y's dtype once (`SplitOutput.value` is the torch reference and
the test oracle). Consumers: kernels.layer_ops.add_rms_norm (delta), gated_activation, and
kernels.rope_kv_write.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class SplitOutput:
    """y (rows, N) = round_to(dtype, ws[0, m, n] + ws[1, m, n] + ... + bias[n]) for m < rows.

    ws: (S, R, N_total) float32 partial sums of a K-split GEMV (R >= rows; rows past `rows` unwritten)
    or a column slice of one; bias: (N,) of the same columns, or None."""

    ws: torch.Tensor
    bias: torch.Tensor | None
    rows: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.ws.shape[2]

    @property
    def device(self) -> torch.device:
        return self.ws.device

    @property
    def splits(self) -> int:
        return self.ws.shape[0]

    def columns(self, start: int, stop: int) -> SplitOutput:
        """Columns [start, stop) (a view, as a column slice of y would be)."""
        bias = None if self.bias is None else self.bias[start:stop]
        return SplitOutput(self.ws[:, :, start:stop], bias, self.rows, self.dtype)

    def split(self, sizes: list[int], dim: int = -1) -> list[SplitOutput]:
        """Consecutive column blocks of the given widths, as y.split(sizes, dim=-1) (columns only)."""
        if dim not in (-1, 1):
            raise ValueError("a SplitOutput splits along its columns only")
        out, start = [], 0
        for size in sizes:
            out.append(self.columns(start, start + size))
            start += size
        return out

    def value(self) -> torch.Tensor:
        """Torch reference: (rows, N) in `dtype`, the splits added in order 0, 1, ... in float32, rounded
        to nearest even. On CUDA the kernels give these bits; Triton's interpreter rounds float32 to bf16
        by truncation, so there a bf16 SplitOutput's readers agree with the GEMV's own bf16 output, not
        with this."""
        total = self.ws[0, : self.rows].clone()  # (rows, N) float32
        for s in range(1, self.splits):
            total += self.ws[s, : self.rows]
        if self.bias is not None:
            total += self.bias.to(torch.float32)
        return total.to(self.dtype)


def input_args(x: torch.Tensor | SplitOutput) -> tuple[torch.Tensor, int, int, int, torch.Tensor | None]:
    """A consumer kernel's view of an input that is a tensor (T, N) with unit column stride or a
    SplitOutput: (pointer tensor, row stride, split stride, splits (0 = a plain tensor), bias or None)."""
    if isinstance(x, SplitOutput):
        if x.ws.stride(2) != 1 or x.ws.dtype != torch.float32:
            raise ValueError("a SplitOutput's partials must be float32 with contiguous columns")
        if x.bias is not None and x.bias.stride(0) != 1:
            raise ValueError("a SplitOutput's bias must be contiguous")
        return x.ws, x.ws.stride(1), x.ws.stride(0), x.splits, x.bias
    if x.stride(-1) != 1:
        raise ValueError(f"an input of shape {tuple(x.shape)} needs contiguous columns")
    return x, x.stride(0), 0, 0, None


def value_of(x: torch.Tensor | SplitOutput) -> torch.Tensor:
    """The tensor an input stands for (torch references take either form)."""
    return x.value() if isinstance(x, SplitOutput) else x


@triton.jit
def load_input(ptr, offsets, mask, split_stride, bias_ptr, cols, SPLITS: tl.constexpr, BIAS: tl.constexpr,
               DTYPE: tl.constexpr):
    """Load an input at `offsets` (row offset + column, from `input_args`' row stride): a plain tensor
    (SPLITS 0: as stored) or a SplitOutput (its splits added in order in float32, + bias[cols], rounded
    to DTYPE: what the GEMV would have stored). Masked lanes are 0."""
    if SPLITS == 0:
        value = tl.load(ptr + offsets, mask=mask, other=0.0)
    else:  # (a constexpr branch: one return, as the compiler wants one type)
        total = tl.load(ptr + offsets, mask=mask, other=0.0)
        for s in tl.static_range(1, SPLITS):
            total += tl.load(ptr + s * split_stride + offsets, mask=mask, other=0.0)
        if BIAS:
            total += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        value = total.to(DTYPE)
    return value


_TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dtype_constexpr(x: torch.Tensor | SplitOutput):
    """The Triton dtype of an input (its consumer's DTYPE constexpr: what a SplitOutput rounds to; unused
    for a plain tensor). Readers whose inputs must share one dtype check that and pass either."""
    return _TRITON_DTYPES.get(x.dtype, tl.float16)
