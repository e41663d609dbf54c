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
  verify) always take the int4 kernel (or, below, Bf16Linear's row-by-row calls), whose rows are
  independent of the block size bit for bit.
  The LM head in this mode re-scores each row's near-top logits in float32 (engine/lm_head.py), so a
  greedy pick is not decided by bfloat16 rounding.

On CPUs whose best torch kernel level is AVX2 (no AVX512: most laptops and desktops), "int4-bf16" keeps the
types the repack splits in two int4 planes (Q5_0, Q5_1, Q8_0, Q6_K: the input widened to 2K columns, twice
the op's work) as bfloat16 weights through F.linear instead (`Bf16Linear`; `two_plane_as_bf16`). Measured on
a 2-core AMD EPYC (AVX2) VM (BENCHMARKS.md, session 15): at one row FFN-down Q6_K 1536x8960 2.17 -> 1.35 ms,
the Q6_K LM head 36 -> 25 ms; `python -m engine bench` decode Qwen2.5-Coder-1.5B 4.7-4.9 -> 5.3-5.4 tok/s,
0.5B (mostly Q5_0) 8.6-9.1 -> 10.2-11.8, SmolLM2 22.5-23.9 -> 24.6-27.0. Costs 2 bytes a weight instead of
~1.1 for those types: +0.34 GiB resident for the 1.5B model, +0.41 GiB for the 0.5B.

Types without an int4 repacking (Q2_K, Q3_K, Q5_K, F16, BF16, F32) always use "dense".

On CUDA every weight stays in its GGUF blocks on the device and goes through `kernels.qmatmul`
(`GpuLinear`, which can also hold several weights that share an input, their rows concatenated, so
Q/K/V or gate/up of one type cost one launch). qmatmul's rows of a block of up to 16 are bitwise
independent of the block size (one GEMV kernel for 1..16 rows, every type), so speculative
verification stays exactly equal to decoding.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from engine.api import VERIFY_ROWS_MAX
from engine.errors import ModelFileError
from engine.gguf_file import TensorInfo
from engine.int4_repack import INT4_TYPES, PackedInt4, int4_matmul, repack_int4
from engine.quants import dequantize, dequantize_rows

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
        return linear_rows_alone(x2, self.weight, self.bias).reshape(*lead, self.out_features)


def linear_rows_alone(
    x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear of (M, K) rows, each of a block of 2..VERIFY_ROWS_MAX rows on its own: BLAS picks another
    kernel (another summation order) for 2+ rows than for 1, so a speculative verify block would not
    reproduce single-token decoding bit for bit. -> (M, N)."""
    if 1 < x2.shape[0] <= VERIFY_ROWS_MAX:
        return torch.cat([torch.nn.functional.linear(x2[i : i + 1], weight, bias) for i in range(len(x2))])
    return torch.nn.functional.linear(x2, weight, bias)


# From this many rows on (prefill chunks), an int4 weight is dequantized from the memory-mapped GGUF
# bytes for the call and multiplied densely in float32 instead. Measured on the idle 2-core machine,
# whole Qwen2.5-Coder-1.5B, pp512: 46 tok/s with the bf16 int4 op for every type, 57 tok/s with this.
DENSE_FROM_ROWS = 128


# Types the int4 repack splits in two planes (engine.int4_repack: the input widened to 2K columns).
TWO_PLANE_TYPES = frozenset({QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q6_K})


def two_plane_as_bf16() -> bool:
    """Whether "int4-bf16" keeps TWO_PLANE_TYPES as bfloat16 weights on this CPU: yes where torch's best
    kernel level is AVX2 (measured faster there, module docstring); elsewhere the int4 op, measured on an
    AVX512 VM only. TANDEM_CPU_TWO_PLANE=int4|bf16 overrides (A/B runs, tests)."""
    choice = os.environ.get("TANDEM_CPU_TWO_PLANE", "auto")
    if choice in ("int4", "bf16"):
        return choice == "bf16"
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


def _exact_dense(info: TensorInfo, x2: torch.Tensor) -> torch.Tensor:
    """(M, K) -> (M, N) float32 through the exact float32 weight, dequantized for this call."""
    w = dequantize(info.data, info.qtype, info.shape)  # (N, K) float32, exact
    return torch.nn.functional.linear(x2.to(torch.float32), w)


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
            y = _exact_dense(self.info, x2)  # (M, N)
        else:
            y = int4_matmul(x2, self.weight).to(torch.float32)  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)  # (..., N)


class Bf16Linear(torch.nn.Module):
    """A GGUF weight dequantized once and rounded to bfloat16; bfloat16 inputs, float32 outputs.

    Blocks of 2..VERIFY_ROWS_MAX rows run row by row (`linear_rows_alone`), so a verify block's rows equal
    single-row decoding bit for bit; from
    `dense_from_rows` rows on, the exact float32 weight as in Int4Linear."""

    def __init__(self, info: TensorInfo, bias: torch.Tensor | None, dense_from_rows: int) -> None:
        super().__init__()
        self.info = info  # the GGUF bytes (a memory-map view), for large batches and exact rows
        self.bias = bias  # (out_features,) float32 or None
        self.out_features, self.in_features = (int(s) for s in info.shape)
        self.dense_from_rows = dense_from_rows
        self.weight = torch.empty(self.out_features, self.in_features, dtype=torch.bfloat16)  # (N, K)
        for r0 in range(0, self.out_features, _BF16_CHUNK_ROWS):  # bounded float32 scratch
            rows = torch.arange(r0, min(r0 + _BF16_CHUNK_ROWS, self.out_features))
            self.weight[r0 : r0 + len(rows)] = dequantize_rows(info, rows).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.shape[0] >= self.dense_from_rows:
            y = _exact_dense(self.info, x2)  # (M, N)
        else:
            y = linear_rows_alone(x2.to(torch.bfloat16), self.weight).to(torch.float32)  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)  # (..., N)


_BF16_CHUNK_ROWS = 8192  # rows dequantized at a time while building a Bf16Linear (LM head: 50 MB of float32)


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
    if on_cpu and mode == "int4-bf16" and info.qtype in TWO_PLANE_TYPES and two_plane_as_bf16():
        return Bf16Linear(info, bias32, DENSE_FROM_ROWS)
    if on_cpu and mode != "dense" and info.qtype in INT4_TYPES:
        compute_dtype = torch.bfloat16 if mode == "int4-bf16" else torch.float32
        out_features, in_features = (int(s) for s in info.shape)
        packed = repack_int4(info.data, info.qtype, (out_features, in_features), compute_dtype)
        dense_from_rows = DENSE_FROM_ROWS if mode == "int4-bf16" else None  # prefill: float32 GEMM
        return Int4Linear(packed, info, bias32, dense_from_rows)
    weight = dequantize(info.data, info.qtype, info.shape).to(device)  # (out, in) float32
    return DenseLinear(weight, bias32)
