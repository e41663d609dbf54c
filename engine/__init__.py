"""Tandem's inference engine: GGUF models, quantized KV cache, speculative decoding. No Qt here."""

from engine.api import (
    DraftConfig,
    EngineConfig,
    Finished,
    GenerationStats,
    SamplingParams,
    StatsUpdate,
    TextDelta,
)
from engine.errors import ModelFileError, SettingsError, TandemError

__all__ = [
    "DraftConfig",
    "EngineConfig",
    "Finished",
    "GenerationStats",
    "ModelFileError",
    "SamplingParams",
    "SettingsError",
    "StatsUpdate",
    "TandemError",
    "TextDelta",
]
