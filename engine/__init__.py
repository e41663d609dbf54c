"""Tandem's inference engine: GGUF models, quantized KV cache, speculative decoding. No Qt here."""

import os

# torch's OpenMP threads spin while waiting by default; on a desktop where the GUI, a browser or a
# second process share the cores that collapses throughput (measured on the 2-core dev box under load:
# 1.5B decode 0.4 -> 5.3 tok/s, load 129 s -> 4 s). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
