"""Tandem's inference engine: GGUF models, quantized KV cache, speculative decoding. No Qt here."""

import os

# torch's OpenMP threads (libgomp) spin while they wait. Spinning forever collapses throughput when the
# GUI or other programs share the cores; never spinning (OMP_WAIT_POLICY=PASSIVE) halves small-model
# decode on an idle machine. A short spin does well in both (SmolLM2, 2 threads, decode tok/s, 2026-11-27,
# BENCHMARKS.md "OpenMP wait"): idle ACTIVE 50.3 / PASSIVE 20.1 / GOMP_SPINCOUNT=20000 48.3; with two
# busy processes on the 2 cores ACTIVE 13.3 / PASSIVE 13.3 / 20000 22.7. Must be set before torch loads.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")

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
