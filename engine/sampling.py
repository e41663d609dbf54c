"""Token selection: greedy, or llama.cpp's default chain (penalties, top-k, top-p, min-p, temperature).

`probabilities()` returns the full distribution the sampler draws from, so speculative decoding can
run rejection sampling against exactly the same distribution plain decoding uses.
"""

from __future__ import annotations

import torch

from engine.api import SamplingParams


def apply_repeat_penalty(logits: torch.Tensor, recent: list[int], penalty: float) -> torch.Tensor:
    """logits: (vocab,). llama.cpp rule: positive logits are divided, negative ones multiplied."""
    if penalty == 1.0 or not recent:
        return logits
    ids = torch.tensor(sorted(set(recent)), dtype=torch.long, device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams, recent: list[int]) -> torch.Tensor:
    """logits: (vocab,) float -> probabilities (vocab,) float32 after every filter (temperature > 0).
    Without a repeat penalty no host reads and no host-to-device copies: a captured step runs it
    (engine.cuda_graphs).

    top-k keeps exactly k tokens, as llama.cpp's does (of tokens tied at the k-th logit, torch.topk's
    choice), and the filters after it run on those k in their sorted order: no sort of the whole
    vocabulary (on the H200 that sort was most of a sampled token's filter time)."""
    logits = apply_repeat_penalty(
        logits.float(), recent[-params.repeat_last_n :] if params.repeat_last_n else [], params.repeat_penalty
    )
    if 0 < params.top_k < logits.shape[-1]:
        kept, ids = torch.topk(logits, params.top_k)  # (k,) in descending order, (k,)
        return torch.zeros_like(logits).scatter_(0, ids, _filtered_softmax(kept, params, in_order=True))
    return _filtered_softmax(logits, params, in_order=False)


def _filtered_softmax(logits: torch.Tensor, params: SamplingParams, in_order: bool) -> torch.Tensor:
    """top-p, min-p and temperature over logits (n,) (in_order: already in descending order)."""
    if params.top_p < 1.0:
        sorted_logits, order = (logits, None) if in_order else torch.sort(logits, descending=True)
        sorted_probs = torch.softmax(sorted_logits, -1)
        # keep the smallest prefix whose mass reaches top_p (the token crossing it is kept)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop[:1].fill_(False)  # the top token stays (a fill, not a host copy: a captured step runs it)
        if order is not None:
            drop = torch.zeros_like(drop).scatter(0, order, drop)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return torch.softmax(logits / params.temperature, -1)


def draw_with(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token that uniform number u in [0, 1) draws from probs (vocab,), by inverse CDF: the first whose
    cumulative sum (float64, where probs live) passes u * total, so a token of probability 0 never is.
    u: () or (1,) float64, any device. Returns (1,) int64 on probs' device; no host sync, so a captured
    step runs it too (engine.cuda_graphs).

    torch.multinomial did this on the host but took 3.8 ms for a 151936-token vocabulary (2-core VM; it
    made sampling on the H200 about 5x slower than greedy decoding) and needed the distribution copied
    there. Probabilities that are all zero or NaN draw the last token (no error: a captured step cannot
    raise)."""
    cdf = probs.to(torch.float64).cumsum(0)  # (vocab,)
    target = (u.to(cdf.device) * cdf[-1]).reshape(1)
    index = torch.searchsorted(cdf, target, right=True)  # (1,) first i with cdf[i] > target
    return index.clamp_(max=probs.shape[0] - 1)  # past the end only for a zero or NaN total


class Sampler:
    def __init__(self, params: SamplingParams, device: str | torch.device = "cpu") -> None:
        self.params = params
        self.generator = torch.Generator(device="cpu")
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    @property
    def greedy(self) -> bool:
        return self.params.temperature <= 0.0

    def probabilities(self, logits: torch.Tensor, recent: list[int]) -> torch.Tensor:
        return probabilities(logits, self.params, recent)

    def uniform(self) -> torch.Tensor:
        """The next number in [0, 1) of this sampler's seeded stream: () float64 on the CPU."""
        return torch.rand((), generator=self.generator, dtype=torch.float64)

    def draw(self, probs: torch.Tensor) -> int:
        """One token from probs (vocab,) (any device; need not sum to 1) with the next uniform number."""
        return int(draw_with(probs, self.uniform()))

    @property
    def graph_params(self) -> SamplingParams | None:
        """The parameters a captured step can sample with by itself (engine.cuda_graphs), or None: greedy
        picks are the step's argmax, and a repeat penalty needs the recent tokens, which change each step."""
        if self.greedy or self.params.repeat_penalty != 1.0:
            return None
        return self.params

    def pick(self, logits: torch.Tensor, recent: list[int]) -> int:
        """logits: (vocab,) -> the next token id."""
        if self.greedy:
            if self.params.repeat_penalty != 1.0:
                logits = apply_repeat_penalty(
                    logits, recent[-self.params.repeat_last_n :], self.params.repeat_penalty
                )
            return int(torch.argmax(logits))
        return self.draw(self.probabilities(logits, recent))
