"""Speculative decoding: a drafter proposes tokens, the target verifies them in one forward pass.

The target runs once over [last committed token, d1 .. dk] (logits for every row): row i is the
target's distribution for the token after d1..di. Verification (`verify`):
- greedy: accept the longest prefix of drafts equal to the target's own pick, then commit the
  target's pick at the first mismatch (or a bonus pick after a full accept). The committed
  tokens are exactly what plain greedy decoding would produce.
- sampling: rejection sampling. Accept d_i with probability min(1, p(d_i) / q(d_i)); on a
  reject draw from norm(max(0, p - q)); after a full accept draw a bonus token from p. A
  deterministic draft (n-gram, DFlash greedy) has q = one-hot(d_i). Every committed token is
  then distributed exactly as plain sampling from p (Leviathan et al. / Chen et al. 2023).
Rollback needs no work: the KV cache is position-indexed, so rejected positions are simply
overwritten by the next verify block.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.api import Event, Finished, GenerationStats, SamplingParams, StatsUpdate, TextDelta
from engine.sampling import Sampler
from engine.text_stream import TextStream

if TYPE_CHECKING:
    from engine.session import Session

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.25


@dataclass
class Draft:
    tokens: list[int]  # proposed continuation, in order
    probs: torch.Tensor | None = None  # (k, vocab) distribution each token was drawn from; None = one-hot


class Drafter:
    """What the speculative loop needs from a drafter (engine/drafters.py, engine/dflash.py)."""

    capture_layers: tuple[int, ...] = ()  # target layers whose outputs the drafter needs (DFlash)
    snapshot_owner = None  # a drafter with its own KV cache: that cache as a snapshot owner (snapshots.py)

    def reusable_prefix(self, ids: list[int]) -> int:
        """How many leading prompt tokens the drafter can pick up without the target re-running them."""
        return len(ids)

    def begin(self, session: Session, context: list[int], start: int, hidden: list[torch.Tensor]) -> None:
        """A new generation: context = prompt ids, all in the target's cache; hidden = the target's
        captured hidden states (T, d_model) of context[start:] (only with capture_layers)."""

    def propose(self, context: list[int], k: int, sampler: Sampler) -> Draft:
        """Up to k tokens that may follow context (prompt + committed answer)."""
        raise NotImplementedError

    def observe(self, context: list[int], start: int, hidden: list[torch.Tensor]) -> None:
        """After a verify step: context now ends with the new pending token; hidden holds the target's
        captured states of context[start:-1], the rows of the verify block that were kept."""

    def first_length(self, max_draft: int) -> int:
        """The draft length of the first step (DFlash: its block size - 1)."""
        return max_draft

    def next_length(self, k: int, n_drafted: int, n_accepted: int) -> int:
        """The draft length for the next step."""
        return k

    def close(self) -> None:
        """Free the drafter's memory."""


def target_forward(session: Session, ids: list[int], pos: int, logits_for: str,
                   capture: tuple[int, ...]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Run ids at [pos, pos + len) through the target in prefill_chunk pieces, capturing layers.

    Returns the logits of the final chunk ("last": (1, vocab); "all": every row of every chunk) and
    the captured hidden states of every row, one (len, d_model) tensor per captured layer.
    """
    chunk = session.config.prefill_chunk
    outputs, captured = [], []
    with torch.inference_mode():
        for offset in range(0, len(ids), chunk):
            piece = torch.tensor(ids[offset : offset + chunk], dtype=torch.long)  # the model uploads it
            final = offset + chunk >= len(ids)
            want = logits_for if (final or logits_for == "all") else "none"
            logits, hidden = session.model(piece, pos + offset, session.cache, logits_for=want,
                                           capture_layers=capture)
            if logits is not None:
                outputs.append(logits)
            captured.append(hidden)
    session.cached_ids = session.cached_ids[:pos] + list(ids)
    layers = [torch.cat([h[i] for h in captured]) for i in range(len(capture))]  # (len, d_model) each
    return (torch.cat(outputs) if logits_for == "all" else outputs[-1]), layers


def verify(sampler: Sampler, logits: torch.Tensor, draft: Draft, context: list[int]) -> tuple[list[int], int]:
    """logits: (k + 1, vocab), row i after [last, d1..di]. Returns (committed tokens, drafts accepted).

    committed = the accepted drafts followed by one token chosen by the target (correction or bonus).
    """
    drafts = draft.tokens
    recent = list(context)
    if sampler.greedy:
        # without a repeat penalty every row's pick is its argmax: one read from the device for the block
        picks = logits.argmax(-1).tolist() if sampler.params.repeat_penalty == 1.0 else None
        for i, d in enumerate(drafts):
            target = picks[i] if picks is not None else sampler.pick(logits[i], recent)
            if target != d:
                return drafts[:i] + [target], i
            recent.append(d)
        bonus = picks[len(drafts)] if picks is not None else sampler.pick(logits[len(drafts)], recent)
        return drafts + [bonus], len(drafts)
    for i, d in enumerate(drafts):
        p = sampler.probabilities(logits[i], recent)  # (vocab,)
        q_d = 1.0 if draft.probs is None else float(draft.probs[i, d])
        p_d = float(p[d])
        u = float(torch.rand((), generator=sampler.generator))
        if q_d > 0.0 and u * q_d < p_d:  # u < p/q without dividing by a tiny q
            recent.append(d)
            continue
        if draft.probs is None:
            residual = p.clone()
            residual[d] = 0.0
        else:
            q = draft.probs[i].to(p.device, p.dtype)  # (draft vocab,); a draft may pad its vocabulary
            vocab = p.shape[0]
            q = q[:vocab] if q.shape[0] >= vocab else torch.nn.functional.pad(q, (0, vocab - q.shape[0]))
            residual = (p - q).clamp_min(0.0)  # (vocab,)
        total = float(residual.sum())
        # p == q on the support leaves nothing: can only happen by rounding; p itself is then correct
        token = sampler.draw(residual / total) if total > 1e-12 else sampler.draw(p)
        return drafts[:i] + [token], i
    return drafts + [sampler.draw(sampler.probabilities(logits[len(drafts)], recent))], len(drafts)


class SpeculativeStats:
    """Counters behind GenerationStats' speculative fields."""

    def __init__(self, max_draft: int) -> None:
        self.target_forwards = 0
        self.committed = 0
        self.position_drafted = [0] * max_draft
        self.position_accepted = [0] * max_draft

    def record(self, stats: GenerationStats, n_drafted: int, n_accepted: int, n_committed: int) -> None:
        self.target_forwards += 1
        self.committed += n_committed
        if n_drafted:
            stats.draft_steps += 1
        stats.drafted += n_drafted
        stats.accepted += n_accepted
        for i in range(n_drafted):
            if i >= len(self.position_drafted):
                self.position_drafted.append(0)
                self.position_accepted.append(0)
            self.position_drafted[i] += 1
            self.position_accepted[i] += i < n_accepted
        stats.acceptance_length = self.committed / self.target_forwards
        pairs = zip(self.position_accepted, self.position_drafted, strict=True)
        stats.per_position_acceptance = [a / d for a, d in pairs if d]


def speculative_generate(session: Session, drafter: Drafter, prompt_ids: list[int], params: SamplingParams,
                         cancel: threading.Event, started: float | None = None) -> Iterator[Event]:
    """The decode loop with drafting; same events and stop rules as Session.generate's plain loop.

    The target prefills only what its cache (the in-memory prefix, or a snapshot restored by the session)
    lacks. The first token comes from the target alone, so the drafter catches up on the prompt (a draft
    model prefills what its own cache lacks) after that token is out: it is not in the time to first token.
    started: when the request began (time to first token counts from there); None = now.
    """
    stats = GenerationStats(prompt_tokens=len(prompt_ids), kv_bytes=session.cache.nbytes,
                            device=session.device, device_reason=session.device_reason)
    sampler = Sampler(params)
    stream = TextStream(params.stop)
    tokenizer = session.tokenizer
    max_draft = session.config.draft.max_draft
    spec = SpeculativeStats(max_draft)
    capture = drafter.capture_layers
    started = time.perf_counter() if started is None else started
    # DFlash needs the target's hidden states of every prompt token its context lacks: the target re-runs them
    reuse = min(session.reusable_prefix(prompt_ids), drafter.reusable_prefix(prompt_ids))
    stats.cached_tokens = reuse
    prefill_started = time.perf_counter()
    logits, hidden = target_forward(session, prompt_ids[reuse:], reuse, "last", capture)
    stats.prefill_seconds = time.perf_counter() - prefill_started
    stats.prefill_tok_per_s = (len(prompt_ids) - reuse) / max(stats.prefill_seconds, 1e-9)
    begun = False  # drafter.begin runs before the first draft, after the first token is out

    context = list(prompt_ids)  # prompt + committed answer; the cache holds all but the last token
    answer: list[str] = []
    pending_ids: list[int] = []  # tokens whose text the stream holds back (partial UTF-8 / stop prefix)
    pending_flags: list[bool] = []
    reason = "max_tokens"
    last_stats = time.perf_counter()
    first_token_at = None
    committed = [sampler.pick(logits[0], context)]
    flags = [False]
    k = drafter.first_length(max_draft)
    done = False
    while True:
        # -- emit committed tokens one by one, applying the plain loop's stop rules ------------------
        for token, flag in zip(committed, flags, strict=True):
            if first_token_at is None:
                first_token_at = time.perf_counter()
                stats.ttft_seconds = first_token_at - started
            if token in tokenizer.eog_ids:
                reason, done = "eos", True
                break
            context.append(token)
            stats.new_tokens += 1
            text = stream.push(tokenizer.token_bytes(token))
            answer.append(text)
            pending_ids.append(token)
            pending_flags.append(flag)
            if text or stream.stopped:
                yield TextDelta(text, pending_ids, pending_flags)
                pending_ids, pending_flags = [], []
            if stream.stopped:
                reason, done = "stop_string", True
                break
            if stats.new_tokens >= params.max_tokens:
                done = True
                break
            if len(context) >= session.max_len:
                reason, done = "context_full", True
                break
        if done:
            break
        if cancel.is_set():
            reason = "cancelled"
            break
        # -- draft ------------------------------------------------------------------------------------
        # The verify block writes positions len(context) - 1 .. len(context) - 1 + n: keep it in the
        # context, and draft no more than the tokens still wanted.
        budget = min(k, params.max_tokens - stats.new_tokens - 1, session.max_len - len(context))
        t0 = time.perf_counter()
        if not begun:
            drafter.begin(session, list(prompt_ids), reuse, hidden)
            begun, hidden = True, None
        draft = drafter.propose(context, budget, sampler) if budget > 0 else Draft([])
        draft.tokens = draft.tokens[: max(budget, 0)]
        t1 = time.perf_counter()
        # -- verify -----------------------------------------------------------------------------------
        block = [context[-1]] + draft.tokens
        pos = len(context) - 1
        logits, hidden = target_forward(session, block, pos, "all", capture)
        committed, n_accepted = verify(sampler, logits, draft, context)
        t2 = time.perf_counter()
        session.cached_ids = context[:-1] + block[: 1 + n_accepted]
        drafter.observe(context + committed, pos, [h[: 1 + n_accepted] for h in hidden])
        stats.draft_seconds += t1 - t0
        stats.verify_seconds += t2 - t1
        spec.record(stats, len(draft.tokens), n_accepted, len(committed))
        if draft.tokens:
            k = drafter.next_length(k, len(draft.tokens), n_accepted)
        flags = [True] * n_accepted + [False]
        now = time.perf_counter()
        stats.decode_seconds = now - first_token_at
        stats.decode_tok_per_s = (stats.new_tokens + len(committed)) / max(stats.decode_seconds, 1e-9)
        if now - last_stats >= STATS_INTERVAL_S:
            last_stats = now
            yield StatsUpdate(GenerationStats(**vars(stats)))
    tail = stream.finish()
    if tail or pending_ids:
        answer.append(tail)
        yield TextDelta(tail, pending_ids, pending_flags)
    if stats.decode_seconds == 0.0 and first_token_at is not None:
        stats.decode_seconds = time.perf_counter() - first_token_at
    stats.decode_tok_per_s = stats.new_tokens / max(stats.decode_seconds, 1e-9)
    if not spec.target_forwards:
        stats.acceptance_length = 1.0 if stats.new_tokens else 0.0
    session.end_turn(reason)
    yield Finished(reason, stats, "".join(answer))
