"""Engine.load() -> Session; Session.chat() streams events (DESIGN.md, "Engine API")."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from engine.api import EngineConfig, Event, Finished, GenerationStats, SamplingParams, StatsUpdate, TextDelta
from engine.chat_template import ChatTemplate
from engine.errors import SettingsError, TandemError
from engine.gguf_file import GGUFModelFile
from engine.kv_cache import KVCache, resolve_k_smooth
from engine.models.transformer import Transformer
from engine.sampling import Sampler
from engine.snapshots import SnapshotStore
from engine.text_stream import TextStream
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
STATS_INTERVAL_S = 0.25


def pick_device(requested: str) -> tuple[str, str]:
    """Return (device, reason): users should always see why they got the CPU."""
    has_cuda = torch.cuda.is_available()
    if requested == "cuda":
        if not has_cuda:
            raise SettingsError(
                "Device 'cuda' was requested but no CUDA GPU is available; choose 'auto' or 'cpu'."
            )
        return "cuda", f"requested; {torch.cuda.get_device_name(0)}"
    if requested == "cpu":
        return "cpu", "requested"
    if has_cuda:
        return "cuda", f"auto: found {torch.cuda.get_device_name(0)}"
    return "cpu", "auto: no CUDA GPU found"


class Engine:
    @staticmethod
    def load(config: EngineConfig, progress: Progress | None = None) -> Session:
        config.validate()
        if config.threads:
            torch.set_num_threads(config.threads)
        report = progress or (lambda stage, fraction: None)
        report("Reading model file", 0.0)
        started = time.perf_counter()
        gguf_file = GGUFModelFile.open(config.model)
        tokenizer = Tokenizer.from_gguf(gguf_file)
        template = ChatTemplate.from_gguf(gguf_file, tokenizer)
        device, reason = pick_device(config.device)
        try:
            with torch.inference_mode():
                model = Transformer.from_gguf(
                    gguf_file, device=device, progress=report, cpu_weights=config.cpu_weights
                )
        except (MemoryError, torch.OutOfMemoryError) as exc:
            raise TandemError(
                f"Not enough memory to load {gguf_file.path.name}: {exc}. Close other programs, "
                "or pick a smaller model or quantization."
            ) from exc
        session = Session(config, gguf_file, model, tokenizer, template, device, reason)
        if config.draft.mode != "none":
            from engine.drafters import make_drafter

            report("Loading draft", 0.95)
            session.drafter = make_drafter(config, session)
        log.info("loaded %s on %s in %.2f s", gguf_file.path.name, device, time.perf_counter() - started)
        report("Ready", 1.0)
        return session


class Session:
    drafter = None  # engine.speculative.Drafter, set by Engine.load when config.draft.mode is not "none"

    def __init__(
        self,
        config: EngineConfig,
        gguf_file: GGUFModelFile,
        model: Transformer,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        device: str,
        device_reason: str,
    ) -> None:
        self.config, self.gguf_file, self.model = config, gguf_file, model
        self.tokenizer, self.template = tokenizer, template
        self.device, self.device_reason = device, device_reason
        c = model.config
        self.max_len = config.context_length
        try:
            self.cache = KVCache(
                c.n_layers,
                c.n_kv_heads,
                c.head_dim,
                self.max_len,
                config.kv_k,
                config.kv_v,
                device=device,
                rotate_k=not config.rotation_skipped(),
                k_smooth=resolve_k_smooth(config.k_smooth, config.kv_k),
            )
        except (MemoryError, torch.OutOfMemoryError) as exc:
            raise TandemError(
                f"Not enough memory for a {self.max_len}-token KV cache; lower the context length "
                "or use a quantized cache type."
            ) from exc
        self.cached_ids: list[int] = []  # tokens whose K/V sit in the cache at positions 0..n-1
        self.snapshots = SnapshotStore(Path(config.snapshot_dir)) if config.snapshot_dir else None

    @property
    def info(self) -> dict:
        c = self.model.config
        return {
            "model": self.gguf_file.path.name,
            "architecture": c.architecture,
            "n_layers": c.n_layers,
            "device": self.device,
            "device_reason": self.device_reason,
            "kv_k": self.config.kv_k,
            "kv_v": self.config.kv_v,
            "n_ctx": self.max_len,
            "draft": self.config.draft.mode,
            "kv_bytes": self.cache.nbytes,
            "k_rotated": self.cache.rotation is not None,
            "k_smooth": self.cache.k_smooth,
        }

    def close(self) -> None:
        if self.drafter is not None:
            self.drafter.close()
        self.cache = None
        self.model = None

    def save_snapshot(self) -> None:
        """Write the cache's valid prefix to disk; a failed snapshot must never break the chat."""
        try:
            self.snapshots.save(self)
        except Exception:
            log.exception("saving a KV snapshot failed")

    # -- low level ---------------------------------------------------------------------------------------
    def prefill(self, ids: list[int], start: int, logits_for: str = "last") -> torch.Tensor:
        """Run ids at positions [start, start + len(ids)) in chunks of prefill_chunk tokens.

        Every chunk but the last has the same size. Returns the final chunk's logits: its last
        row only ("last", shape (1, vocab)) or all rows of every chunk ("all", (len(ids), vocab)).
        """
        chunk = self.config.prefill_chunk
        outputs = []
        with torch.inference_mode():
            for offset in range(0, len(ids), chunk):
                piece = torch.tensor(ids[offset : offset + chunk], dtype=torch.long, device=self.device)
                final = offset + chunk >= len(ids)
                want = logits_for if (final or logits_for == "all") else "none"
                logits, _ = self.model(piece, start + offset, self.cache, logits_for=want)
                if logits is not None:
                    outputs.append(logits)
        self.cached_ids = self.cached_ids[:start] + list(ids)
        return torch.cat(outputs) if logits_for == "all" else outputs[-1]

    def decode_one(self, token: int) -> torch.Tensor:
        """Append one token at the next position; return its logits (1, vocab)."""
        with torch.inference_mode():
            piece = torch.tensor([token], dtype=torch.long, device=self.device)
            logits, _ = self.model(piece, len(self.cached_ids), self.cache, logits_for="last")
        self.cached_ids.append(token)
        return logits

    def reusable_prefix(self, ids: list[int]) -> int:
        """How many leading tokens of ids already sit in the cache (keeping at least one to run)."""
        n = 0
        for a, b in zip(self.cached_ids, ids, strict=False):
            if a != b:
                break
            n += 1
        return min(n, len(ids) - 1)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.template.render(messages, add_generation_prompt=True)
        bos_id = self.tokenizer.bos_id
        bos_text = self.gguf_file.get("tokenizer.ggml.tokens")[bos_id] if bos_id is not None else None
        add_bos = self.tokenizer.add_bos and not (bos_text and text.startswith(bos_text))
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=True)

    # -- generation ----------------------------------------------------------------------------------------
    def chat(
        self,
        messages: list[dict],
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[Event]:
        return self.generate(self.encode_chat(messages), params, cancel)

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[Event]:
        params = params or SamplingParams()
        cancel = cancel or threading.Event()
        if not prompt_ids:
            raise SettingsError("The prompt is empty.")
        if len(prompt_ids) >= self.max_len:
            raise SettingsError(
                f"The prompt has {len(prompt_ids)} tokens but the context holds {self.max_len}; "
                "raise the context length or shorten the conversation."
            )
        if self.snapshots is not None:
            self.snapshots.restore(self, prompt_ids)  # sets cached_ids when it beats what memory holds
        if self.drafter is not None:
            from engine.speculative import speculative_generate

            yield from speculative_generate(self, self.drafter, prompt_ids, params, cancel)
            return
        stats = GenerationStats(
            prompt_tokens=len(prompt_ids),
            kv_bytes=self.cache.nbytes,
            device=self.device,
            device_reason=self.device_reason,
        )
        sampler = Sampler(params)
        stream = TextStream(params.stop)
        started = time.perf_counter()
        reuse = self.reusable_prefix(prompt_ids)
        stats.cached_tokens = reuse
        logits = self.prefill(prompt_ids[reuse:], reuse)
        stats.prefill_seconds = time.perf_counter() - started
        stats.prefill_tok_per_s = (len(prompt_ids) - reuse) / max(stats.prefill_seconds, 1e-9)
        context = list(prompt_ids)
        answer = []
        pending_ids: list[int] = []  # tokens whose text the stream still holds back (partial UTF-8)
        reason = "max_tokens"
        last_stats = time.perf_counter()
        first_token_at = None
        while True:
            if cancel.is_set():
                reason = "cancelled"
                break
            token = sampler.pick(logits[0], context)
            now = time.perf_counter()
            if first_token_at is None:
                first_token_at = now
                stats.ttft_seconds = now - started
            if token in self.tokenizer.eog_ids:
                reason = "eos"
                break
            context.append(token)
            stats.new_tokens += 1
            text = stream.push(self.tokenizer.token_bytes(token))
            answer.append(text)
            pending_ids.append(token)
            if text or stream.stopped:
                yield TextDelta(text, pending_ids, [False] * len(pending_ids))
                pending_ids = []
            if stream.stopped:
                reason = "stop_string"
                break
            if stats.new_tokens >= params.max_tokens:
                break
            if len(context) >= self.max_len:
                reason = "context_full"
                break
            logits = self.decode_one(token)
            now = time.perf_counter()
            stats.decode_seconds = now - first_token_at
            stats.decode_tok_per_s = (stats.new_tokens) / max(stats.decode_seconds, 1e-9)
            if now - last_stats >= STATS_INTERVAL_S:
                last_stats = now
                yield StatsUpdate(GenerationStats(**vars(stats)))
        tail = stream.finish()
        if tail or pending_ids:
            answer.append(tail)
            yield TextDelta(tail, pending_ids, [False] * len(pending_ids))
        stats.acceptance_length = 1.0 if stats.new_tokens else 0.0
        if self.snapshots is not None and reason != "cancelled":
            self.save_snapshot()
        yield Finished(reason, stats, "".join(answer))


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)
