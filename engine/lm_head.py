"""The CPU LM head, whose near-ties are settled in float32 on the fast path.

The fast path ("int4-bf16", engine.linear: the int4 op, or bfloat16 weights for two-plane types on AVX2
CPUs) rounds the head's input, its weights or scales, and its output to bfloat16: a logit near 25 can only
be a multiple of 0.125, and the head's error against float32 dots of the same input with the exactly
dequantized rows reached 1.2 % of the top logit (measured with the int4 op: SmolLM2-135M 0.20 at ~25,
Qwen2.5-Coder-0.5B/1.5B 0.5 %, 300 rows of README and code each). So the greedy pick was often a coin
toss the CPU decided: on those rows 9/300 (SmolLM2), 3/300 and 1/300 (Qwen) picks differed from the
float32 argmax of the same hidden state, and on "What is the capital of France?" SmolLM2's first pick
tied "The" and "L" at 25.375 on an AMD EPYC (AVX2) machine and the answer went French.

`RescoredHead` keeps the fast head and, row by row, recomputes every logit within `MARGIN` of the row's top
(at most `MAX_RESCORED` of them) as a float32 dot of the input row with the exact rows of the GGUF weight.
The float32 argmax is among them whenever the head's error on a logit stays under half the margin (3.1 % of
the top, 2.6x the worst seen). Each row is settled alone, by the same calls at the same shapes whatever the
batch, so a speculative verify block's rows stay bit-identical to single-token decoding.

Token by token over 512 tokens of code and of prose (`tests/tools/head_agreement.py`, BENCHMARKS.md), the
fast path's picks equalled those of float32 weights at 96.7-99.8 % of positions with the plain head and at
98.2-100 % re-scored, for ~0.5-1 ms a token (a 47 ms step of SmolLM2, 200 ms of Qwen2.5-Coder-1.5B here).
"""

from __future__ import annotations

import torch

from engine.linear import Bf16Linear, Int4Linear, make_linear
from engine.quants import dequantize_rows

MARGIN = 1 / 16  # of max(|top logit|, 1)
MAX_RESCORED = 64
_BLOCK = 256  # vocabulary entries a block in near_top


class RescoredHead(torch.nn.Module):
    def __init__(self, linear: Int4Linear | Bf16Linear) -> None:
        super().__init__()
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> logits (..., out_features) float32."""
        logits = self.linear(x)  # (..., N)
        rows = logits.reshape(-1, self.out_features)  # (M, N), a view: rescored in place
        if rows.shape[0] >= self.linear.dense_from_rows:
            return logits  # that many rows took the exact float32 GEMM already
        inputs = x.reshape(-1, self.in_features).to(torch.float32)  # (M, K)
        for row, x_row in zip(rows, inputs, strict=True):
            self._rescore(row, x_row)
        return logits

    def _rescore(self, logits: torch.Tensor, x: torch.Tensor) -> None:
        """logits: (N,) rewritten in place near their top; x: (K,) float32."""
        ids = near_top(logits, MARGIN)  # (n,) ascending
        if ids.numel() > MAX_RESCORED:
            ids = ids[torch.topk(logits[ids], MAX_RESCORED).indices].sort().values
        weights = dequantize_rows(self.linear.info, ids)  # (n, K) float32, exact
        exact = torch.mv(weights, x)  # (n,)
        if self.linear.bias is not None:
            exact = exact + self.linear.bias[ids]
        logits[ids] = exact


def near_top(logits: torch.Tensor, margin: float) -> torch.Tensor:
    """Ascending indices of the logits (N,) within margin * max(|top|, 1) of their maximum `top`.

    Reads the maxima of blocks of `_BLOCK` entries, then looks inside the blocks that reach the threshold:
    on 2 cores ~0.1 ms for 262144 entries, where a nonzero over the whole vocabulary took 0.42 ms (most of
    the re-scoring's time)."""
    n = logits.shape[0]
    body = n - n % _BLOCK
    block_max = logits[:body].view(-1, _BLOCK).amax(1)  # (body / _BLOCK,)
    tail = logits[body:]
    top = float(torch.cat((block_max, tail)).max())
    threshold = top - max(abs(top), 1.0) * margin
    hot = torch.nonzero(block_max >= threshold).flatten()  # (h,) blocks
    idx = (hot[:, None] * _BLOCK + torch.arange(_BLOCK)).flatten()  # (h * _BLOCK,)
    if body < n:
        idx = torch.cat((idx, torch.arange(body, n)))
    return idx[logits[idx] >= threshold]


def make_lm_head(info, device, mode: str) -> torch.nn.Module:
    """The LM head over the GGUF weight `info`: a RescoredHead where the linear layer computes in bfloat16."""
    linear = make_linear(info, device=device, mode=mode)
    bf16_int4 = isinstance(linear, Int4Linear) and linear.dense_from_rows is not None
    if bf16_int4 or isinstance(linear, Bf16Linear):
        return RescoredHead(linear)
    return linear
