"""A stand-in for `engine.session.Engine` with the same interface, for GUI tests.

It yields scripted text token by token (every other token marked as an accepted draft),
periodic stats and a final event, honours the cancel event between tokens, and records
every config it was asked to load.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from engine.api import EngineConfig, Finished, GenerationStats, SamplingParams, StatsUpdate, TextDelta
from engine.errors import ModelFileError

DEFAULT_ANSWER = (
    "Here is a function:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\nIt **adds** two numbers.\n"
)


class FakeSession:
    def __init__(self, engine: FakeEngine, config: EngineConfig) -> None:
        self.engine = engine
        self.config = config
        self.closed = False
        self.info = {
            "model": "fake-model",
            "architecture": "fake",
            "device": "cpu",
            "kv_k": config.kv_k,
            "kv_v": config.kv_v,
            "draft": config.draft.mode,
            "n_ctx": config.context_length,
        }
        self.requests: list[tuple[list[dict], SamplingParams]] = []

    def chat(self, messages: list[dict], params: SamplingParams, cancel: threading.Event):  # noqa: ANN201
        self.requests.append((messages, params))
        answer = self.engine.answer
        tokens = [answer[i : i + 3] for i in range(0, len(answer), 3)][: params.max_tokens]
        t0 = time.monotonic()
        stats = GenerationStats(
            prompt_tokens=sum(len(m["content"]) for m in messages) // 4 + 1,
            device="cpu",
            prefill_seconds=0.01,
            ttft_seconds=0.01,
            kv_bytes=123456,
        )
        stats.prefill_tok_per_s = stats.prompt_tokens / stats.prefill_seconds
        text = []
        reason = "max_tokens" if len(tokens) == params.max_tokens else "eos"
        for i, tok in enumerate(tokens):
            if cancel.is_set():
                reason = "cancelled"
                break
            if self.engine.token_delay:
                cancel.wait(self.engine.token_delay)
            if self.engine.fail_after is not None and i == self.engine.fail_after:
                raise MemoryError("fake allocation failed")
            drafted = i % 2 == 1
            text.append(tok)
            yield TextDelta(tok, [i], [drafted])
            stats.new_tokens = i + 1
            stats.decode_seconds = max(time.monotonic() - t0, 1e-6)
            stats.decode_tok_per_s = stats.new_tokens / stats.decode_seconds
            stats.draft_steps = (i + 1) // 2
            stats.drafted = (i + 1) // 2 + (i + 1) // 4
            stats.accepted = (i + 1) // 2
            stats.acceptance_length = 2.0
            if i % 4 == 3:
                yield StatsUpdate(GenerationStats(**vars(stats)))
        yield Finished(reason, GenerationStats(**vars(stats)), "".join(text))

    def close(self) -> None:
        self.closed = True


class FakeEngine:
    def __init__(
        self, answer: str = DEFAULT_ANSWER, token_delay: float = 0.0, fail_after: int | None = None
    ) -> None:
        self.answer = answer
        self.token_delay = token_delay
        self.fail_after = fail_after
        self.configs: list[EngineConfig] = []
        self.sessions: list[FakeSession] = []
        self.load_threads: list[str] = []

    def load(self, config: EngineConfig, progress=None) -> FakeSession:  # noqa: ANN001
        self.load_threads.append(threading.current_thread().name)
        self.configs.append(config)
        if progress:
            progress("Reading the model", 0.5)
        if "broken" in Path(config.model).name:
            raise ModelFileError(
                f"'{config.model}' is not a valid GGUF file (bad magic). Choose another model."
            )
        if config.draft.path and "othervocab" in Path(config.draft.path).name:
            raise ModelFileError(
                f"The draft model {Path(config.draft.path).name} has a different vocabulary (49152 tokens) "
                "than the target (151936 tokens); choose a draft from the same model family, or n-gram."
            )
        if progress:
            progress("Ready", 1.0)
        session = FakeSession(self, config)
        self.sessions.append(session)
        return session


def fake_locator(tmp_path):  # noqa: ANN001, ANN201
    """A model locator that returns placeholder files under `tmp_path`."""

    def locate(name: str, progress=None):  # noqa: ANN001, ANN202
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(b"GGUF")
        return p

    return locate
