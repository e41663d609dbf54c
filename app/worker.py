"""The inference worker: one QObject living on a QThread that owns the engine session.

All engine work (locating and loading models, generating) happens here; the worker
reports only through signals. `engine.session` (and so torch) is imported lazily inside
the worker thread, never on the GUI thread.

Text is coalesced before it crosses threads: deltas are buffered and sent at most every
`coalesce_s` seconds (about 30 updates/s), with a per-character mask of drafted tokens.
Each generation has its own `threading.Event` for cancel, set directly by the GUI thread
(the worker is busy inside the generation loop, so a queued signal would arrive too late).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from PySide6.QtCore import QObject, QThread, Signal, Slot

from app.engine_settings import DEFAULT_DRAFT, DEFAULT_TARGET, EngineSettings
from app.markdown_render import warm_lexers
from engine.api import Finished, GenerationStats, SamplingParams, StatsUpdate, TextDelta
from engine.errors import TandemError

log = logging.getLogger(__name__)

COALESCE_S = 1 / 30

EngineLoader = Callable[..., object]  # (EngineConfig, progress=callable) -> session
ModelLocator = Callable[..., object]  # (catalogue name, progress=callable) -> Path
GpuProbe = Callable[[str], bool]  # (device setting) -> whether the engine will run on a GPU


class _LoadCancelled(Exception):
    """Raised from the progress callback to abandon a load when the app is closing."""


@dataclass
class GenerationRequest:
    request_id: int
    messages: list[dict]
    params: SamplingParams
    cancel: threading.Event = field(default_factory=threading.Event)


def describe_error(exc: BaseException) -> str:
    """A message a user can act on, for any exception out of the engine."""
    if isinstance(exc, TandemError):
        return str(exc)
    text = str(exc)
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return (
            "Out of memory. Try a smaller model, a quantized KV cache (q8_0 or q4_0), a shorter "
            "context length, a smaller prefill chunk, or turn off the draft model."
        )
    return f"Unexpected engine error ({type(exc).__name__}: {text}). Details are in the log."


def _default_loader(config, progress):  # noqa: ANN001, ANN202
    from engine.session import Engine  # torch comes in here, on the worker thread

    return Engine.load(config, progress=progress)


def _default_gpu_probe(device: str) -> bool:
    """Whether the engine will run on a GPU for this device setting (for draft mode "auto")."""
    from engine.session import pick_device  # torch comes in here, on the worker thread

    try:
        return pick_device(device)[0] == "cuda"
    except TandemError:
        return False  # device "cuda" without a usable GPU: the load itself will say so


def _default_locator(name: str, progress):  # noqa: ANN001, ANN202
    from engine.model_catalog import locate  # no torch; hashing/assembling runs on the worker thread

    def bytes_progress(message: str, done: int, total: int) -> None:
        progress(message, done / total if total else 0.0)

    return locate(name, progress=bytes_progress)


def split_mask(delta: TextDelta) -> bytes:
    """Per-character drafted flags for a delta.

    Exact when the delta holds one token (or all its tokens agree); otherwise the text is
    split over the tokens in proportion, since a delta carries no per-token text.
    """
    n = len(delta.text)
    flags = delta.drafted
    if not flags or not any(flags):
        return bytes(n)
    if all(flags):
        return b"\x01" * n
    pieces = getattr(delta, "pieces", None)
    if pieces and len(pieces) == len(flags) and sum(map(len, pieces)) == n:
        return b"".join((b"\x01" if f else b"\x00") * len(p) for p, f in zip(pieces, flags, strict=True))
    out = bytearray(n)
    for i, f in enumerate(flags):
        if f:
            start, end = n * i // len(flags), n * (i + 1) // len(flags)
            out[start:end] = b"\x01" * (end - start)
    return bytes(out)


class EngineWorker(QObject):
    load_progress = Signal(str, float)  # stage, fraction 0..1
    loaded = Signal(dict)  # session.info plus "model_path"
    load_failed = Signal(str)  # readable message
    text = Signal(int, str, bytes)  # request id, coalesced text, per-character drafted mask
    stats = Signal(int, object)  # request id, GenerationStats
    finished = Signal(int, object)  # request id, Finished
    failed = Signal(int, str, str)  # request id, readable message, text produced so far
    snapshots_cleared = Signal(int, int)  # files deleted, bytes freed
    snapshots_clear_failed = Signal(str)  # readable message
    closed = Signal()

    def __init__(
        self,
        engine_loader: EngineLoader | None = None,
        model_locator: ModelLocator | None = None,
        coalesce_s: float = COALESCE_S,
        gpu_probe: GpuProbe | None = None,
    ) -> None:
        super().__init__()
        self._load_engine = engine_loader or _default_loader
        self._locate = model_locator or _default_locator
        self._on_gpu = gpu_probe or _default_gpu_probe
        self._coalesce_s = coalesce_s
        self._session = None
        self.closing = threading.Event()  # set by the GUI thread before shutdown

    @property
    def has_session(self) -> bool:
        return self._session is not None

    # loading
    @Slot(object)
    def load(self, settings: EngineSettings) -> None:
        if self.closing.is_set():
            return
        self._close_session()
        last = [0.0]

        def progress(stage: str = "", fraction: float = 0.0, *_args: object) -> None:
            if self.closing.is_set():
                raise _LoadCancelled()
            now = time.monotonic()
            if now - last[0] >= self._coalesce_s or fraction >= 1.0:
                last[0] = now
                self.load_progress.emit(str(stage), float(max(0.0, min(1.0, fraction))))

        try:
            settings.check()
            settings = settings.resolved(on_gpu=self._on_gpu(settings.device))
            model = settings.model_path
            if not model:
                progress("Locating the default model", 0.0)
                model = str(self._locate(DEFAULT_TARGET, progress=progress))
            draft_path: str | None = settings.draft_path or None
            if settings.draft_mode == "draft-model" and not draft_path:
                progress("Locating the default draft model", 0.0)
                draft_path = str(self._locate(DEFAULT_DRAFT, progress=progress))
            if settings.draft_mode in ("none", "ngram"):
                draft_path = None
            config = settings.to_engine_config(model, draft_path)
            log.info(
                "loading %s (draft %s %s, K %s, V %s, skip_wht %s)",
                model,
                config.draft.mode,
                draft_path,
                config.kv_k,
                config.kv_v,
                config.skip_wht,
            )
            t0 = time.monotonic()
            session = self._load_engine(config, progress=progress)
        except _LoadCancelled:
            log.info("load abandoned: the app is closing")
            return
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a message
            if not isinstance(exc, TandemError):
                log.exception("model load failed")
            self.load_failed.emit(describe_error(exc))
            return
        self._session = session
        try:  # first use of a lexer imports it; do that here rather than on the GUI thread
            warm_lexers()
        except Exception:  # noqa: BLE001 - highlighting then just warms up lazily
            log.exception("warming the code lexers failed")
        info = dict(getattr(session, "info", {}) or {})
        info.setdefault("model_path", model)
        info["load_seconds"] = round(time.monotonic() - t0, 3)
        self.load_progress.emit("Ready", 1.0)
        self.loaded.emit(info)

    # generation
    @Slot(object)
    def generate(self, request: GenerationRequest) -> None:
        rid = request.request_id
        if self._session is None:
            self.failed.emit(rid, "No model is loaded. Open Settings to choose a model.", "")
            return
        buf: list[str] = []
        mask = bytearray()
        produced: list[str] = []
        latest: GenerationStats | None = None
        pending_stats = False
        last_emit = 0.0
        finished: Finished | None = None

        def flush() -> None:
            # one crossing per interval: the text so far, then the newest stats
            nonlocal mask, pending_stats
            if buf:
                chunk = "".join(buf)
                self.text.emit(rid, chunk, bytes(mask))
                produced.append(chunk)
                buf.clear()
                mask = bytearray()
            if pending_stats and latest is not None:
                self.stats.emit(rid, latest)
                pending_stats = False

        try:
            for event in self._session.chat(request.messages, request.params, request.cancel):
                if isinstance(event, TextDelta):
                    buf.append(event.text)
                    mask += split_mask(event)
                elif isinstance(event, StatsUpdate):
                    latest, pending_stats = event.stats, True
                elif isinstance(event, Finished):
                    finished = event
                    break
                now = time.monotonic()
                if now - last_emit >= self._coalesce_s:
                    flush()
                    last_emit = now
        except BaseException as exc:  # noqa: BLE001
            flush()
            if not isinstance(exc, TandemError):
                log.exception("generation failed")
            self.failed.emit(rid, describe_error(exc), "".join(produced))
            return
        pending_stats = False
        flush()
        if finished is None:  # a generator that ended without its final event
            reason = "cancelled" if request.cancel.is_set() else "eos"
            finished = Finished(reason, latest or GenerationStats(), "".join(produced))
        self.stats.emit(rid, finished.stats)
        self.finished.emit(rid, finished)

    # KV snapshots on disk
    @Slot(str)
    def clear_snapshots(self, directory: str) -> None:
        """Delete the snapshot files in directory (engine code: file I/O stays off the GUI thread)."""
        from engine.snapshots import SnapshotStore

        try:
            files, freed = SnapshotStore(directory).clear()
        except Exception as exc:  # noqa: BLE001 - a failure becomes a message
            log.exception("clearing the snapshots failed")
            self.snapshots_clear_failed.emit(f"Could not clear the snapshots in {directory}: {exc}")
            return
        self.snapshots_cleared.emit(files, freed)

    # shutdown
    def _close_session(self) -> None:
        if self._session is not None:
            try:
                self._session.close()
            except Exception:  # noqa: BLE001
                log.exception("closing the engine session failed")
            self._session = None
            gc.collect()

    @Slot()
    def shutdown(self) -> None:
        self._close_session()
        self.closed.emit()
        thread = QThread.currentThread()
        if thread is not None:
            thread.quit()
