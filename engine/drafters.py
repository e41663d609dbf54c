"""Drafters for speculative decoding: a smaller model with the same vocabulary, and prompt lookup.

`make_drafter(config, session)` builds the one EngineConfig.draft asks for (DFlash lives in
engine/dflash.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from engine.api import EngineConfig
from engine.chat_template import ChatTemplate
from engine.errors import ModelFileError, TandemError
from engine.gguf_file import GGUFModelFile
from engine.k_equalize import resolve_k_equalize
from engine.kv_cache import KVCache, make_kv_cache, resolve_k_smooth
from engine.models.transformer import Transformer
from engine.sampling import Sampler
from engine.speculative import Draft, Drafter

if TYPE_CHECKING:
    from engine.session import Session

log = logging.getLogger(__name__)


class NgramDrafter(Drafter):
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens (longest n
    first) and propose what followed it. Costs no model; pays off when the answer copies the input
    (edits, refactors, quoting).

    A match needs at least `min_ngram` = 3 tokens: with 1, a lone common token ("the", a newline, a template
    marker) launched a draft at almost every step of a code or chat answer and nearly all of it was
    rejected. Median spec/plain on a 2-core AVX2 CPU (BENCHMARKS.md, "Speculative decoding", session 15),
    edit / code / chat prompts, 1 -> 3 tokens: Qwen2.5-Coder-1.5B 0.62 / 0.50 / 0.52 -> 1.03 / 0.92 / 0.92,
    SmolLM2 1.90 / 0.60 / 0.62 -> 2.20 / 1.09 / 0.91."""

    def __init__(self, max_ngram: int = 4, min_ngram: int = 3) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: list[int], k: int, sampler: Sampler) -> Draft:
        n_ctx = len(context)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            tail = context[n_ctx - n :]
            # latest start s < n_ctx - n with context[s : s + n] == tail
            last = tail[-1]
            for s in range(n_ctx - n - 1, -1, -1):
                if context[s + n - 1] == last and context[s : s + n] == tail:
                    follow = context[s + n : s + n + k]
                    if follow:
                        return Draft(follow)
        return Draft([])


class DraftModelDrafter(Drafter):
    """A second, smaller GGUF model drafts k tokens autoregressively with its own KV cache.

    The draft cache is position-indexed like the target's: `cached_ids` says which tokens sit in it,
    and a rejected draft is rolled back by re-running from the first position that differs.
    Draft length adapts: +2 after a fully accepted draft, -1 after a rejection (HF's heuristic).
    The draft's cache has KV snapshots of its own (engine/snapshots.py; `snapshot_owner`), so a follow-up
    turn after a restart does not re-prefill the conversation through the draft either.
    """

    snapshot_role = "draft"

    def __init__(self, model: Transformer, cache: KVCache, device: str, prefill_chunk: int, max_draft: int,
                 adaptive: bool = True, gguf_file: GGUFModelFile | None = None,
                 template: ChatTemplate | None = None, compute_identity: str = "") -> None:
        self.model, self.cache, self.device = model, cache, device
        self.prefill_chunk = prefill_chunk
        self.max_draft = max_draft
        self.adaptive = adaptive
        self.cached_ids: list[int] = []
        # what snapshots of the draft cache need: the draft file, the target's chat template, the kernels
        self.gguf_file, self.template, self.compute_identity = gguf_file, template, compute_identity

    @property
    def snapshot_owner(self) -> DraftModelDrafter | None:
        """The draft cache as a snapshot owner (engine/snapshots.py), or None when it cannot be identified."""
        return self if self.gguf_file is not None and self.template is not None and self.cache is not None \
            else None

    @classmethod
    def load(cls, config: EngineConfig, target_file: GGUFModelFile, device: str,
             template: ChatTemplate | None = None, compute_identity: str = "") -> DraftModelDrafter:
        draft_file = GGUFModelFile.open(config.draft.path)
        check_same_vocabulary(target_file, draft_file)
        try:
            with torch.inference_mode():
                model = Transformer.from_gguf(draft_file, device=device, cpu_weights=config.cpu_weights)
            c = model.config
            # the draft's cache follows the same K recipe as the target's (rotation, smoothing,
            # equalization): a q4_0 K cache without smoothing ruins Qwen2.5 drafts
            cache = make_kv_cache(c.n_layers, c.n_kv_heads, c.head_dim, config.context_length, config.kv_k,
                                  config.kv_v, device=device, rotate_k=not config.rotation_skipped(),
                                  k_smooth=resolve_k_smooth(config.k_smooth, config.kv_k),
                                  k_equalize=resolve_k_equalize(config.k_equalize, config.kv_k, device))
        except (MemoryError, torch.OutOfMemoryError) as exc:
            raise TandemError(f"Not enough memory to load the draft {draft_file.path.name}: {exc}. "
                              "Pick a smaller draft or turn speculative decoding off.") from exc
        log.info("draft model %s: %d layers", draft_file.path.name, model.config.n_layers)
        return cls(model, cache, device, config.prefill_chunk, config.draft.max_draft, gguf_file=draft_file,
                   template=template, compute_identity=compute_identity)

    def _run(self, ids: list[int], pos: int) -> torch.Tensor:
        """Feed ids at [pos, pos + len) in chunks; return the last row's logits (vocab,)."""
        logits = None
        chunk = self.prefill_chunk
        with torch.inference_mode():
            for offset in range(0, len(ids), chunk):
                piece = torch.tensor(ids[offset : offset + chunk], device=self.device)  # (T,) int64
                want = "last" if offset + chunk >= len(ids) else "none"
                logits, _ = self.model(piece, pos + offset, self.cache, logits_for=want)  # (1, vocab)
        self.cached_ids = self.cached_ids[:pos] + list(ids)
        return logits[0]

    def _sync(self, context: list[int]) -> torch.Tensor:
        """Make the draft cache hold context; return the draft's logits for the next token."""
        n = 0
        for a, b in zip(self.cached_ids, context, strict=False):
            if a != b:
                break
            n += 1
        n = min(n, len(context) - 1)  # always run at least the last token to get its logits
        return self._run(context[n:], n)

    def begin(self, session: Session, context: list[int], start: int, hidden: list[torch.Tensor]) -> None:
        self._sync(context)  # prefill the draft with the prompt now, not on the first step

    def propose(self, context: list[int], k: int, sampler: Sampler) -> Draft:
        logits = self._sync(context)
        if sampler.greedy and sampler.params.repeat_penalty == 1.0 and hasattr(self.model, "pick_next"):
            return Draft(self._greedy_on_gpu(sampler.pick(logits, []), k), None)
        tokens: list[int] = []
        probs = []
        recent = list(context)
        for i in range(k):
            if sampler.greedy:
                token = sampler.pick(logits, recent)
            else:
                q = sampler.probabilities(logits, recent)  # (draft vocab,)
                token = sampler.draw(q)
                probs.append(q)
            tokens.append(token)
            recent.append(token)
            if i + 1 < k:
                logits = self._run([token], len(self.cached_ids))
        return Draft(tokens, torch.stack(probs) if probs else None)

    def _greedy_on_gpu(self, first: int, k: int) -> list[int]:
        """k greedy draft tokens from `first` (the argmax of the synced logits): each draft step queued on
        the GPU before the host reads the token before it (CudaTransformer.pick_next), as plain decoding."""
        tokens = [first]
        with torch.inference_mode():
            for i in range(1, k):
                pos = len(self.cached_ids)
                tokens.append(self.model.pick_next(tokens[-1], pos, self.cache, ahead=i + 1 < k))
                self.cached_ids.append(tokens[-2])
        return tokens

    def next_length(self, k: int, n_drafted: int, n_accepted: int) -> int:
        if not self.adaptive:
            return k
        return min(self.max_draft, k + 2) if n_accepted == n_drafted else max(1, k - 1)

    def close(self) -> None:
        self.model, self.cache = None, None


def check_same_vocabulary(target: GGUFModelFile, draft: GGUFModelFile) -> None:
    """A draft proposes token ids, so both models must mean the same thing by every id."""
    t_tokens = target.get("tokenizer.ggml.tokens")
    d_tokens = draft.get("tokenizer.ggml.tokens")
    if t_tokens is None or d_tokens is None:
        lacking = draft.path.name if d_tokens is None else target.path.name
        raise ModelFileError(f"{lacking} has no vocabulary; a draft model needs the target's tokenizer.")
    if list(t_tokens) != list(d_tokens):
        pairs = enumerate(zip(t_tokens, d_tokens, strict=False))
        differ = next((i for i, (a, b) in pairs if a != b), min(len(t_tokens), len(d_tokens)))
        raise ModelFileError(
            f"The draft {draft.path.name} has a different vocabulary from the target {target.path.name} "
            f"({len(d_tokens)} vs {len(t_tokens)} tokens, first difference at id {differ}). "
            "Pick a draft of the same model family (e.g. Qwen2.5-Coder-0.5B for Qwen2.5-Coder-1.5B)."
        )


def make_drafter(config: EngineConfig, session: Session) -> Drafter | None:
    mode = config.draft.mode
    if mode == "none":
        return None
    if mode == "ngram":
        return NgramDrafter()
    if mode == "draft-model":
        return DraftModelDrafter.load(config, session.gguf_file, session.device, template=session.template,
                                      compute_identity=session.compute_identity)
    if mode == "dflash":
        from engine.dflash import DFlashDrafter

        return DFlashDrafter.load(config, session)
    raise TandemError(f"Speculative mode '{mode}' is unknown.")
