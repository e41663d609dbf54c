"""Engine.load() -> Session; Session.chat() streams events (DESIGN.md, "Engine API")."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from engine.api import (
    EngineConfig,
    Event,
    Finished,
    GenerationStats,
    SamplingParams,
    StatsUpdate,
    TextDelta,
    auto_prefill_chunk,
)
from engine.chat_template import ChatTemplate
from engine.config import ModelConfig
from engine.errors import SettingsError, TandemError
from engine.gguf_file import GGUFModelFile
from engine.k_equalize import resolve_k_equalize
from engine.kv_cache import make_kv_cache, resolve_k_smooth
from engine.models.transformer import Transformer
from engine.sampling import Sampler
from engine.snapshots import SnapshotStore
from engine.text_stream import TextStream
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
STATS_INTERVAL_S = 0.25


MIN_CUDA_CAPABILITY = (8, 0)  # Ampere and newer: float16/bfloat16 tensor-core dots in the Triton kernels


def cuda_status() -> tuple[bool, str]:
    """(usable, what was found): whether the GPU path can run here, in words a user understands."""
    if torch.version.cuda is None:
        return False, f"this PyTorch ({torch.__version__}) was built without CUDA"
    if not torch.cuda.is_available():
        return False, (
            f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) found no CUDA device: no NVIDIA GPU, "
            "or its driver is missing or too old"
        )
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) < MIN_CUDA_CAPABILITY:
        return False, f"{name} has compute capability {major}.{minor}; the GPU path needs 8.0 or newer"
    if importlib.util.find_spec("triton") is None:
        return False, f"found {name}, but Triton is not installed (the GPU kernels need it)"
    return True, f"{name} (compute capability {major}.{minor})"


def gpu_model_problem(config: ModelConfig | None) -> str | None:
    """Why the GPU kernels cannot run this model, or None. The rule of
    kernels.kv_blocks.check_kernel_head_dim, restated so that choosing a device never imports Triton."""
    if config is None:
        return None
    d = config.head_dim
    if d < 32 or d > 256 or d & (d - 1):
        return f"this model's head size {d} is not a power of two in 32..256, as the GPU kernels need"
    return None


def pick_device(requested: str, model_config: ModelConfig | None = None) -> tuple[str, str]:
    """Return (device, reason): users should always see which device they got and why."""
    if requested == "cpu":
        return "cpu", "requested"
    usable, found = cuda_status()
    problem = gpu_model_problem(model_config) if usable else None
    if requested == "cuda":
        if not usable:
            raise SettingsError(f"Device 'cuda' was requested but {found}; choose 'auto' or 'cpu'.")
        if problem:
            raise SettingsError(f"Device 'cuda' was requested but {problem}; choose 'auto' or 'cpu'.")
        return "cuda", f"requested: {found}"
    if usable and problem is None:
        return "cuda", f"auto: found {found}"
    if usable:
        return "cpu", f"auto: found {found}, but {problem}"
    return "cpu", f"auto: no usable GPU ({found})"


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
        device, reason = pick_device(config.device, ModelConfig.from_gguf(gguf_file))
        log.info("device %s (%s)", device, reason)
        if config.prefill_chunk == 0:  # auto: the draft model and the speculative path read it too
            config = dataclasses.replace(config, prefill_chunk=auto_prefill_chunk(device))
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
    snapshot_role = "target"  # in the snapshot fingerprint: this is the target model's cache

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
        if config.prefill_chunk == 0:
            config = dataclasses.replace(config, prefill_chunk=auto_prefill_chunk(device))
        self.config, self.gguf_file, self.model = config, gguf_file, model
        self.tokenizer, self.template = tokenizer, template
        self.device, self.device_reason = device, device_reason
        c = model.config
        self.max_len = config.context_length
        try:
            self.cache = make_kv_cache(
                c.n_layers,
                c.n_kv_heads,
                c.head_dim,
                self.max_len,
                config.kv_k,
                config.kv_v,
                device=device,
                rotate_k=not config.rotation_skipped(),
                k_smooth=resolve_k_smooth(config.k_smooth, config.kv_k),
                k_equalize=resolve_k_equalize(config.k_equalize, config.kv_k, device),
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
            "k_equalize": self.cache.k_equalize,
        }

    def close(self) -> None:
        if self.drafter is not None:
            self.drafter.close()
        self.cache = None
        self.model = None

    @property
    def compute_identity(self) -> str:
        """How K/V are computed, for the snapshot fingerprint (another kernel gives other bits)."""
        return compute_identity(self.device, self.config.cpu_weights)

    def _snapshot_owners(self) -> list:
        """The caches that snapshots cover: the target's, and the draft model's when it has one."""
        draft_cache = self.drafter.snapshot_owner if self.drafter is not None else None
        return [self] + ([draft_cache] if draft_cache is not None else [])

    def restore_snapshots(self, prompt_ids: list[int]) -> int:
        """Load the longest usable snapshot into each cache (target, draft model) that it beats.

        Returns the tokens restored into the target's cache. A failed restore must never break the chat:
        that cache then keeps what it had and prefills the rest.
        """
        restored = 0
        for owner in self._snapshot_owners():
            try:
                n = self.snapshots.restore(owner, prompt_ids)
            except Exception:
                log.exception("restoring a KV snapshot failed")
                n = 0
            if owner is self:
                restored = n
        return restored

    def save_snapshot(self) -> None:
        """Write each cache's valid prefix to disk; a failed snapshot must never break the chat."""
        for owner in self._snapshot_owners():
            try:
                self.snapshots.save(owner)
            except Exception:
                log.exception("saving a KV snapshot failed")

    def end_turn(self, reason: str) -> None:
        """After an answer (before its Finished event): snapshot the caches unless it was cancelled."""
        if self.snapshots is not None and reason != "cancelled":
            self.save_snapshot()

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
                piece = torch.tensor(ids[offset : offset + chunk], dtype=torch.long)  # the model uploads it
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
            piece = torch.tensor([token], dtype=torch.long)
            logits, _ = self.model(piece, len(self.cached_ids), self.cache, logits_for="last")
        self.cached_ids.append(token)
        return logits

    def decode_greedy(self, token: int, ahead: bool = False) -> int:
        """decode_one followed by the argmax of its logits, reading a single integer from the device:
        on the GPU the step graph computes the argmax itself. ahead: the next call will probably be
        decode_greedy(the pick) (plain greedy decoding); the GPU then queues that step before the host
        waits for this pick (CudaTransformer.pick_next)."""
        return self._decode_pick(token, ahead, None)

    def decode_sampled(self, token: int, sampler: Sampler, ahead: bool = False) -> int:
        """decode_one followed by sampler.pick of its logits, for a sampler without a repeat penalty: on the
        GPU the step samples on the device (the same pick) and, with ahead, the next step is queued before
        the host waits (CudaTransformer.pick_next)."""
        if sampler.graph_params is None:
            raise ValueError("decode_sampled takes a sampler without a repeat penalty (Sampler.graph_params)")
        return self._decode_pick(token, ahead, sampler)

    def _decode_pick(self, token: int, ahead: bool, sampler: Sampler | None) -> int:
        """The pick after token at the next position: the argmax (sampler None) or the sampler's draw."""
        pos = len(self.cached_ids)
        with torch.inference_mode():
            if hasattr(self.model, "pick_next"):  # the GPU model
                pick = self.model.pick_next(token, pos, self.cache, ahead, sampler)
            else:
                logits, _ = self.model(torch.tensor([token], dtype=torch.long), pos, self.cache)
                pick = int(torch.argmax(logits[0])) if sampler is None else sampler.pick(logits[0], [])
        self.cached_ids.append(token)
        return pick

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
        started = time.perf_counter()  # time to first token counts the snapshot restore too
        if self.snapshots is not None:
            self.restore_snapshots(prompt_ids)  # sets cached_ids where a snapshot beats what memory holds
        if self.drafter is not None:
            from engine.speculative import speculative_generate

            yield from speculative_generate(self, self.drafter, prompt_ids, params, cancel, started)
            return
        stats = GenerationStats(
            prompt_tokens=len(prompt_ids),
            kv_bytes=self.cache.nbytes,
            device=self.device,
            device_reason=self.device_reason,
        )
        sampler = Sampler(params)
        # plain argmax, or sampling without a repeat penalty: the next token comes straight from the step
        # (one integer read per token, the next step queued before it on the GPU)
        fast_greedy = sampler.greedy and params.repeat_penalty == 1.0
        fast_sampled = sampler.graph_params is not None
        stream = TextStream(params.stop)
        reuse = self.reusable_prefix(prompt_ids)
        stats.cached_tokens = reuse
        prefill_started = time.perf_counter()
        logits = self.prefill(prompt_ids[reuse:], reuse)
        stats.prefill_seconds = time.perf_counter() - prefill_started
        stats.prefill_tok_per_s = (len(prompt_ids) - reuse) / max(stats.prefill_seconds, 1e-9)
        context = list(prompt_ids)
        answer = []
        pending_ids: list[int] = []  # tokens whose text the stream still holds back (partial UTF-8)
        reason = "max_tokens"
        last_stats = time.perf_counter()
        first_token_at = None
        next_token = None  # set by decode_greedy / decode_sampled on the fast paths
        while True:
            if cancel.is_set():
                reason = "cancelled"
                break
            token = next_token if next_token is not None else sampler.pick(logits[0], context)
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
            # ahead: the step after this pick is queued before the host reads it, unless the answer ends
            # with that pick anyway (max_tokens, a full context)
            ahead = stats.new_tokens + 1 < params.max_tokens and len(context) + 1 < self.max_len
            if fast_greedy:
                next_token = self.decode_greedy(token, ahead)
            elif fast_sampled:
                next_token = self.decode_sampled(token, sampler, ahead)
            else:
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
        self.end_turn(reason)
        yield Finished(reason, stats, "".join(answer))


def compute_identity(device: str, cpu_weights: str) -> str:
    """"cuda", or "cpu/fast" | "cpu/exact": the kernels that produced a cache's K/V."""
    return f"cpu/{cpu_weights}" if device == "cpu" else device


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)
