"""The engine settings the user edits in the panel, persisted in QSettings.

`EngineSettings` is plain data; `to_engine_config` turns it into the engine's
`EngineConfig` (an empty model path means "the default model", resolved in the worker
because locating it may assemble files and takes time).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from PySide6.QtCore import QSettings

from engine.api import DraftConfig, EngineConfig, SamplingParams
from engine.errors import SettingsError

log = logging.getLogger(__name__)

DEFAULT_TARGET = "qwen2.5-coder-1.5b"  # model_catalog names
DEFAULT_DRAFT = "qwen2.5-coder-0.5b"
THEMES = ("system", "light", "dark")


def snapshot_directory() -> str:
    """Where KV snapshots of conversations live (TANDEM_SNAPSHOT_DIR overrides, e.g. for tests)."""
    from platformdirs import user_cache_dir

    return os.environ.get("TANDEM_SNAPSHOT_DIR") or os.path.join(
        user_cache_dir("tandem", "tandem"), "snapshots"
    )


@dataclass
class EngineSettings:
    model_path: str = ""  # "" = default target
    draft_mode: str = "auto"  # auto | none | draft-model | dflash | ngram (auto: `resolved`)
    draft_path: str = ""  # "" with draft-model = default draft
    max_draft: int = 8
    kv_k: str = "f16"
    kv_v: str = "f16"
    skip_wht: bool = False
    k_smooth: str = "auto"
    k_equalize: str = "auto"
    prefill_chunk: int = 0  # 0 = auto: 512 tokens on the CPU, 2048 on a GPU
    context_length: int = 4096
    device: str = "auto"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    seed: int = -1  # -1 = random
    max_tokens: int = 1024

    def resolved(self, on_gpu: bool) -> EngineSettings:
        """These settings with draft mode "auto" made concrete for the device the engine will run on.

        auto = n-gram lookup on a GPU, no speculation on the CPU (BENCHMARKS.md, "Speculative decoding",
        session 15). On the CPU every mode measured slower than plain decoding of the default target on
        code and chat prompts (draft model 0.49-0.76x, n-gram lookup 0.92x at best on an AVX2 VM): a verify
        row costs nearly a decode step there. On a GPU a 16-row verify costs ~1.15x a step and lookup
        drafts cost nothing, so lookup wins big on edits (projected 7.55x llama.cpp, GPU run 19) and loses
        little elsewhere, while the 0.5B draft model's step costs about the target's (projected 1.19x
        llama.cpp against plain decoding's 1.52x)."""
        if self.draft_mode != "auto":
            return self
        return replace(self, draft_mode="ngram" if on_gpu else "none")

    def to_engine_config(self, model: str, draft_path: str | None) -> EngineConfig:
        """The engine config for resolved paths; raises SettingsError for a bad combination."""
        config = EngineConfig(
            model=model,
            draft=DraftConfig(mode=self.draft_mode, path=draft_path, max_draft=self.max_draft),
            kv_k=self.kv_k,
            kv_v=self.kv_v,
            skip_wht=self.skip_wht and self.kv_k == "q4_0",
            k_smooth=self.k_smooth,
            k_equalize=self.k_equalize,
            prefill_chunk=self.prefill_chunk,
            context_length=self.context_length,
            device=self.device,
            snapshot_dir=snapshot_directory(),
        )
        config.validate()
        return config

    def check(self) -> None:
        """Everything that can be judged without loading: raises SettingsError with advice."""
        if self.model_path:
            p = Path(self.model_path)
            if not p.is_file():
                raise SettingsError(f"Target model file '{p}' does not exist. Choose a .gguf file.")
            if p.suffix.lower() != ".gguf":
                raise SettingsError(f"Target model '{p.name}' is not a .gguf file. Choose a GGUF model.")
        if self.draft_mode == "draft-model" and self.draft_path:
            p = Path(self.draft_path)
            if not p.is_file() or p.suffix.lower() != ".gguf":
                raise SettingsError(f"Draft model '{p}' is not an existing .gguf file.")
        if self.draft_mode == "dflash":
            if not self.draft_path:
                raise SettingsError("DFlash needs a draft folder (config.json + model.safetensors).")
            p = Path(self.draft_path)
            missing = [n for n in ("config.json", "model.safetensors") if not (p / n).is_file()]
            if missing:
                raise SettingsError(
                    f"DFlash folder '{p}' lacks {', '.join(missing)}. Choose a z-lab DFlash draft folder."
                )
        if self.skip_wht and self.kv_k != "q4_0":
            raise SettingsError(
                "Skip WHT rotation applies to a q4_0 K cache only; set K to q4_0 or turn it off."
            )
        if self.max_tokens < 1:
            raise SettingsError("Max tokens must be at least 1.")
        if self.max_tokens >= self.context_length:
            raise SettingsError(
                f"Max tokens ({self.max_tokens}) must be smaller than the context length "
                f"({self.context_length}); lower max tokens or raise the context length."
            )
        placeholder = "placeholder.gguf"
        concrete = self.resolved(on_gpu=False)  # auto on a GPU (n-gram lookup) is valid as well
        draft = self.draft_path or (placeholder if concrete.draft_mode in ("draft-model", "dflash") else None)
        concrete.to_engine_config(self.model_path or placeholder, draft)

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            seed=None if self.seed < 0 else self.seed,
            max_tokens=self.max_tokens,
        )

    # persistence
    def save(self, settings: QSettings) -> None:
        settings.beginGroup("engine")
        for k, v in asdict(self).items():
            settings.setValue(k, v)
        settings.endGroup()
        settings.sync()

    @classmethod
    def load(cls, settings: QSettings) -> EngineSettings:
        out = cls()
        settings.beginGroup("engine")
        try:
            for f in fields(cls):
                if not settings.contains(f.name):
                    continue
                raw = settings.value(f.name)
                default = getattr(out, f.name)
                try:
                    setattr(out, f.name, _coerce(raw, type(default)))
                except (TypeError, ValueError):
                    log.warning("ignoring stored setting %s=%r", f.name, raw)
        finally:
            settings.endGroup()
        return out


def _coerce(raw: object, kind: type) -> object:
    # QSettings' INI backend returns strings; the native ones may keep types.
    if kind is bool:
        if isinstance(raw, str):
            return raw.strip().lower() in ("true", "1", "yes")
        return bool(raw)
    if raw is None:
        raise ValueError("missing")
    return kind(raw)
