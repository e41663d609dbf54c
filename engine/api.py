"""The engine's public contract, used by the app and the CLI (DESIGN.md, "Engine API").

Only plain dataclasses live here so that the app can import them without touching torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from engine.errors import SettingsError

KV_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_1")
DRAFT_MODES = ("none", "draft-model", "dflash", "ngram")
DEVICES = ("auto", "cuda", "cpu")
K_SMOOTH_MODES = ("auto", "on", "off")
K_EQUALIZE_MODES = ("auto", "on", "off")
# Longest speculative verify block (1 + max draft). Blocks up to this size run row by row through the
# single-token path in attention and dense linears, so greedy verification equals plain decoding bit for bit.
VERIFY_ROWS_MAX = 16
# Tokens per prefill step when EngineConfig.prefill_chunk is 0 ("auto"). On the CPU a chunk is the unit
# of progress and cancelling (512 tokens of a 1.5B model take seconds there). On the GPU every chunk
# launches the same few hundred kernels from Python whatever its size, and that host time, not the
# GPU, set the pace at 512: an H200 prefilled 2048 tokens at 28-32k tok/s in 512-token chunks and at
# 57-66k tok/s in one 2048-token chunk (BENCHMARKS.md, GPU run 4).
PREFILL_CHUNK_CPU = 512
PREFILL_CHUNK_CUDA = 2048


def auto_prefill_chunk(device: str) -> int:
    """The prefill chunk "auto" (0) stands for on `device` ("cpu", "cuda", "cuda:1", ...)."""
    return PREFILL_CHUNK_CUDA if device.startswith("cuda") else PREFILL_CHUNK_CPU


@dataclass
class DraftConfig:
    mode: str = "none"  # none | draft-model | dflash | ngram
    path: str | None = None  # draft GGUF, or DFlash folder (config.json + model.safetensors)
    max_draft: int = 8  # tokens proposed per step (draft-model, ngram)
    block_size: int | None = None  # DFlash block size; None = the draft's config


@dataclass
class EngineConfig:
    model: str
    draft: DraftConfig = field(default_factory=DraftConfig)
    kv_k: str = "f16"
    kv_v: str = "f16"
    skip_wht: bool = False
    k_smooth: str = "auto"
    k_equalize: str = "auto"  # per-channel K scales (engine/k_equalize.py): auto = on for quantized K
    prefill_chunk: int = 0  # tokens per prefill step; 0 = auto (auto_prefill_chunk)
    context_length: int = 4096
    device: str = "auto"
    snapshot_dir: str | None = None
    threads: int | None = None  # CPU threads; None = torch's default
    cpu_weights: str = "fast"  # fast (int4 repack, bf16 math) | exact (float32, bit-exact dequantization)

    def validate(self) -> None:
        """Raise SettingsError with a readable message for any bad field."""
        if self.kv_k not in KV_TYPES:
            raise SettingsError(
                f"K cache type '{self.kv_k}' is not supported; choose one of {', '.join(KV_TYPES)}."
            )
        if self.kv_v not in KV_TYPES:
            raise SettingsError(
                f"V cache type '{self.kv_v}' is not supported; choose one of {', '.join(KV_TYPES)}."
            )
        if self.draft.mode not in DRAFT_MODES:
            raise SettingsError(
                f"Speculative mode '{self.draft.mode}' is unknown; choose one of {', '.join(DRAFT_MODES)}."
            )
        if self.draft.mode in ("draft-model", "dflash") and not self.draft.path:
            raise SettingsError(f"Speculative mode '{self.draft.mode}' needs a draft path.")
        if self.device not in DEVICES:
            raise SettingsError(f"Device '{self.device}' is unknown; choose one of {', '.join(DEVICES)}.")
        if self.cpu_weights not in ("fast", "exact"):
            raise SettingsError(f"CPU weights mode '{self.cpu_weights}' is unknown; choose fast or exact.")
        if self.k_smooth not in K_SMOOTH_MODES:
            raise SettingsError(
                f"K smoothing '{self.k_smooth}' is unknown; choose one of {', '.join(K_SMOOTH_MODES)}."
            )
        if self.k_equalize not in K_EQUALIZE_MODES:
            raise SettingsError(
                f"K equalization '{self.k_equalize}' is unknown; choose one of {', '.join(K_EQUALIZE_MODES)}."
            )
        if not 0 <= self.prefill_chunk <= 8192:
            raise SettingsError(
                f"Prefill chunk {self.prefill_chunk} is out of range; use 1..8192, or 0 for automatic."
            )
        if not 16 <= self.context_length <= 1 << 20:
            raise SettingsError(f"Context length {self.context_length} is out of range; use 16..1048576.")
        if self.draft.max_draft < 1 or self.draft.max_draft > VERIFY_ROWS_MAX - 1:
            raise SettingsError(
                f"Max draft {self.draft.max_draft} is out of range; use 1..{VERIFY_ROWS_MAX - 1}."
            )

    def rotation_skipped(self) -> bool:
        """Skip-WHT applies to a q4_0 K cache only; the variable must be exactly "1"."""
        env_on = os.environ.get("DFLASH_SKIP_WHT") == "1"
        return self.kv_k == "q4_0" and (self.skip_wht or env_on)


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    max_tokens: int = 512
    stop: list[str] = field(default_factory=list)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefill_seconds: float = 0.0
    ttft_seconds: float = 0.0
    new_tokens: int = 0
    decode_seconds: float = 0.0
    decode_tok_per_s: float = 0.0
    prefill_tok_per_s: float = 0.0
    draft_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    acceptance_length: float = 0.0  # mean tokens committed per target forward
    per_position_acceptance: list[float] = field(default_factory=list)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    kv_bytes: int = 0
    device: str = "cpu"
    device_reason: str = ""


@dataclass
class TextDelta:
    """New text for the chat view. `drafted[i]` is True when token_ids[i] was an accepted draft."""

    text: str
    token_ids: list[int]
    drafted: list[bool]


@dataclass
class StatsUpdate:
    stats: GenerationStats


@dataclass
class Finished:
    stop_reason: Literal["eos", "stop_string", "max_tokens", "cancelled", "context_full"]
    stats: GenerationStats
    text: str  # the whole answer


Event = TextDelta | StatsUpdate | Finished
