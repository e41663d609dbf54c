"""Linear layers over GGUF weights on CPU: `make_linear(info, bias)` -> (..., in) -> (..., out) float32.

Three CPU modes (`CPU_LINEAR_MODES`), chosen per call; see tests/tools/bench_linear.py for figures:

- "dense" (default): dequantize once to float32, `F.linear` (oneDNN/MKL). Exact: the weights are
  gguf-py's bit for bit. Costs 4 bytes per weight in memory and bandwidth, so decode is slow.
- "int4": the lossless int4 repack (`engine.int4_repack`) through torch's float32 int4 op. Exact
  to float32 rounding at ~5 bits per weight, but torch 2.13 runs that op as a scalar loop on CPU:
  several times slower than "dense". Kept because it is the exactness reference for "int4-bf16".
- "int4-bf16": the same repack through the op's vectorized bfloat16 kernel. Inputs, scales and
  outputs are rounded to bfloat16: relative RMS error ~3e-3 per layer output (measured on real
  Qwen2.5-Coder-1.5B weights; quantizing the activations to Q8_0 as llama.cpp's CPU path does gave
  ~7e-3). 1.23 GB instead of 6.2 GB for that model; at 1 row 1.6-1.8x faster than "dense" (whole-
  model sweep and LM head, 2 threads, on a heavily shared 2-core machine), slower than "dense" at
  512 rows. Not lossless. From `DENSE_FROM_ROWS` rows on (prefill chunks) every type switches to an
  exact dequantize (from the memory-mapped GGUF bytes) + float32 F.linear: Qwen2.5-Coder-1.5B pp512
  went from 46 to 57 tok/s (BENCHMARKS.md, run 6). Blocks of up to 16 rows (decode, speculative
  verify) always take the int4 kernel, whose rows are independent of the block size bit for bit.
  The LM head in this mode re-scores each row's near-top logits in float32 (engine/lm_head.py), so a
  greedy pick is not decided by bfloat16 rounding.

Types without an int4 repacking (Q2_K, Q3_K, Q5_K, F16, BF16, F32) always use "dense".

On CUDA every weight stays in its GGUF blocks on the device and goes through `kernels.qmatmul`
(`GpuLinear`, which can also hold several weights that share an input, their rows concatenated, so
Q/K/V or gate/up of one type cost one launch). qmatmul's rows of a block of up to 16 are bitwise
independent of the block size (one GEMV kernel for 1..16 rows, every type), so speculative
verification stays exactly equal to decoding.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.api import VERIFY_ROWS_MAX
from engine.errors import ModelFileError
from engine.gguf_file import TensorInfo
from engine.int4_repack import INT4_TYPES, PackedInt4, int4_matmul, repack_int4
from engine.quants import dequantize

if TYPE_CHECKING:
    from kernels.split_output import SplitOutput

logger = logging.getLogger(__name__)

CPU_LINEAR_MODES = ("dense", "int4", "int4-bf16")
DEFAULT_CPU_LINEAR_MODE = "dense"


class DenseLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = weight  # (out_features, in_features) float32
        self.bias = bias  # (out_features,) or None
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if 1 < x2.shape[0] <= VERIFY_ROWS_MAX:
            # BLAS picks another kernel (another summation order) for 2+ rows than for 1, so a
            # speculative verify block would not reproduce single-token decoding bit for bit.
            rows = [
                torch.nn.functional.linear(x2[i : i + 1], self.weight, self.bias) for i in range(x2.shape[0])
            ]
            return torch.cat(rows).reshape(*lead, self.out_features)
        return torch.nn.functional.linear(x, self.weight, self.bias)  # (..., out_features)


# From this many rows on (prefill chunks), an int4 weight is dequantized from the memory-mapped GGUF
# bytes for the call and multiplied densely in float32 instead. Measured on the idle 2-core machine,
# whole Qwen2.5-Coder-1.5B, pp512: 46 tok/s with the bf16 int4 op for every type, 57 tok/s with this.
DENSE_FROM_ROWS = 128


class Int4Linear(torch.nn.Module):
    """A GGUF weight repacked for `_weight_int4pack_mm_for_cpu`; computes in the packed dtype."""

    def __init__(
        self, weight: PackedInt4, info: TensorInfo, bias: torch.Tensor | None, dense_from_rows: int | None
    ) -> None:
        super().__init__()
        self.weight = weight
        self.info = info  # the GGUF bytes (a memory-map view: no copy), for large batches
        self.bias = bias  # (out_features,) float32 or None
        self.in_features = int(info.shape[1])
        self.out_features = weight.out_features
        self.dense_from_rows = dense_from_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.dense_from_rows is not None and x2.shape[0] >= self.dense_from_rows:
            w = dequantize(self.info.data, self.info.qtype, self.info.shape)  # (N, K) float32, exact
            y = torch.nn.functional.linear(x2.to(torch.float32), w)  # (M, N)
        else:
            y = int4_matmul(x2, self.weight).to(torch.float32)  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)  # (..., N)


class GpuLinear(torch.nn.Module):
    """`x @ W.T (+ bias)` on CUDA for one or more GGUF weights of one type sharing an input.

    `matmul` is the engine's path: (M, K) float16/bfloat16 -> (M, sum of out_features) same dtype, the
    weights' outputs side by side (`split` cuts them apart as views). `forward` is the drop-in form of
    the CPU modules: (..., K) float -> (..., N) float32, computed in `compute_dtype`.
    """

    def __init__(
        self,
        infos: list[TensorInfo],
        biases: list[torch.Tensor | None] | None = None,
        device: str | torch.device = "cuda",
        compute_dtype: torch.dtype = torch.float16,
    ) -> None:
        from kernels.qmatmul import QuantizedWeight

        super().__init__()
        first = infos[0]
        for info in infos:
            if len(info.shape) != 2:
                raise ModelFileError(f"{info.name}: a linear weight must be 2-D, got shape {info.shape}")
            if info.qtype != first.qtype or info.shape[1] != first.shape[1]:
                raise ValueError(f"{info.name} cannot share a matmul with {first.name}: type or width differ")
        self.out_splits = [int(info.shape[0]) for info in infos]
        self.in_features, self.out_features = int(first.shape[1]), sum(self.out_splits)
        data = first.data if len(infos) == 1 else np.concatenate([np.asarray(i.data) for i in infos])
        shape = (self.out_features, self.in_features)
        self.weight = QuantizedWeight.from_bytes(data, first.qtype, shape, device)
        biases = biases or [None] * len(infos)
        self.bias = None
        if any(b is not None for b in biases):
            parts = [
                torch.zeros(n) if b is None else b.reshape(-1).to("cpu", torch.float32)
                for b, n in zip(biases, self.out_splits, strict=True)
            ]
            self.bias = torch.cat(parts).to(device)  # (N,) float32
        self.compute_dtype = compute_dtype

    def matmul(self, x: torch.Tensor, split_output: bool = False) -> torch.Tensor | SplitOutput:
        """x: (M, K) bfloat16/float16 -> (M, N) same dtype; with split_output and M <= 16 a
        kernels.split_output.SplitOutput of it instead (for a kernel that adds the K splits itself)."""
        from kernels.qmatmul import qmatmul

        return qmatmul(x, self.weight, self.bias, split_output=split_output)

    def split(self, y: torch.Tensor | SplitOutput) -> list[torch.Tensor | SplitOutput]:
        """(M, N) tensor or SplitOutput -> one (M, out_features) view per weight."""
        return list(y.split(self.out_splits, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)  # (M, K)
        return self.matmul(x2).to(torch.float32).reshape(*lead, self.out_features)  # (..., N)


def group_by_type(infos: list[TensorInfo]) -> list[list[TensorInfo]]:
    """Consecutive weights of one type and width, grouped so each group is one GpuLinear (one launch)."""
    groups: list[list[TensorInfo]] = []
    for info in infos:
        last = groups[-1][-1] if groups else None
        if last is not None and last.qtype == info.qtype and last.shape[1:] == info.shape[1:]:
            groups[-1].append(info)
        else:
            groups.append([info])
    return groups


def make_linear(
    info: TensorInfo,
    bias: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    mode: str = DEFAULT_CPU_LINEAR_MODE,
) -> torch.nn.Module:
    """A module computing `x @ W.T (+ bias)` for the (out, in) GGUF weight `info`."""
    if torch.device(device).type == "cuda":
        return GpuLinear([info], [bias], device)
    if mode not in CPU_LINEAR_MODES:
        raise ValueError(f"unknown CPU linear mode {mode!r}; expected one of {CPU_LINEAR_MODES}")
    if len(info.shape) != 2:
        raise ValueError(f"{info.name}: a linear weight must be 2-D, got shape {info.shape}")
    bias32 = None if bias is None else bias.to(device=device, dtype=torch.float32)
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu and mode != "dense" and info.qtype in INT4_TYPES:
        compute_dtype = torch.bfloat16 if mode == "int4-bf16" else torch.float32
        out_features, in_features = (int(s) for s in info.shape)
        packed = repack_int4(info.data, info.qtype, (out_features, in_features), compute_dtype)
        dense_from_rows = DENSE_FROM_ROWS if mode == "int4-bf16" else None  # prefill: float32 GEMM
        return Int4Linear(packed, info, bias32, dense_from_rows)
    weight = dequantize(info.data, info.qtype, info.shape).to(device)  # (out, in) float32
    return DenseLinear(weight, bias32)
