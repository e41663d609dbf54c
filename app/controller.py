"""ChatController: between the main window, the chat store and the inference worker.

It owns the worker's QThread, turns user actions into generation requests, writes each
message to the store when it completes (and the streaming answer about once a second, so
a crash keeps a partial answer), and re-emits the worker's results for the widgets.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

from PySide6.QtCore import QCoreApplication, QObject, QThread, Signal

from app.engine_settings import EngineSettings, snapshot_directory
from app.markdown_render import mask_to_spans
from app.meter import stats_summary
from app.storage import ChatStore, Message
from app.worker import EngineLoader, EngineWorker, GenerationRequest, ModelLocator
from engine.api import Finished, GenerationStats

log = logging.getLogger(__name__)

PARTIAL_WRITE_S = 1.0  # how often the streaming answer is written to the store
DEFAULT_TITLE = "New chat"


def title_from(text: str, limit: int = 48) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), DEFAULT_TITLE)
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


class _Answer:
    """Book-keeping for the answer being generated."""

    def __init__(self, request: GenerationRequest, conversation_id: int, message: Message) -> None:
        self.request = request
        self.conversation_id = conversation_id
        self.message = message
        self.parts: list[str] = []
        self.mask = bytearray()
        self.stats: GenerationStats | None = None
        self.last_write = time.monotonic()

    @property
    def text(self) -> str:
        return "".join(self.parts)


class ChatController(QObject):
    # to the worker (queued: the worker lives on its own thread)
    _load = Signal(object)
    _generate = Signal(object)
    _shutdown = Signal()
    _clear_snapshots = Signal(str)

    # to the widgets
    load_started = Signal()
    load_progress = Signal(str, float)
    model_ready = Signal(dict)
    load_failed = Signal(str)
    answer_started = Signal(object)  # Message (assistant, empty, streaming)
    answer_text = Signal(str, bytes)
    answer_stats = Signal(object)  # GenerationStats
    answer_finished = Signal(object, object)  # Message (final), Finished
    answer_failed = Signal(object, str)  # Message (as saved), readable message
    busy_changed = Signal(bool)
    snapshots_cleared = Signal(int, int)  # files deleted, bytes freed
    snapshots_clear_failed = Signal(str)

    def __init__(
        self,
        store: ChatStore,
        engine_loader: EngineLoader | None = None,
        model_locator: ModelLocator | None = None,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.store = store
        self.thread = QThread()
        self.thread.setObjectName("tandem-engine")
        self.worker = EngineWorker(engine_loader, model_locator)
        self.worker.moveToThread(self.thread)
        self._load.connect(self.worker.load)
        self._generate.connect(self.worker.generate)
        self._shutdown.connect(self.worker.shutdown)
        self._clear_snapshots.connect(self.worker.clear_snapshots)
        self.worker.snapshots_cleared.connect(self.snapshots_cleared)
        self.worker.snapshots_clear_failed.connect(self.snapshots_clear_failed)
        self.worker.load_progress.connect(self.load_progress)
        self.worker.loaded.connect(self._on_loaded)
        self.worker.load_failed.connect(self._on_load_failed)
        self.worker.text.connect(self._on_text)
        self.worker.stats.connect(self._on_stats)
        self.worker.finished.connect(self._on_finished)
        self.worker.failed.connect(self._on_failed)
        self.thread.start()
        app = QCoreApplication.instance()
        if app is not None:  # never leave a running QThread behind at exit
            app.aboutToQuit.connect(self.shutdown)
        self._next_id = 1
        self.answer: _Answer | None = None
        self.model_info: dict | None = None
        self.loading = False
        self.settings = EngineSettings()
        self.shut_down = False

    @property
    def busy(self) -> bool:
        return self.answer is not None

    # loading
    def load(self, settings: EngineSettings) -> None:
        """(Re)load in the background; a running answer is stopped first."""
        self.settings = settings
        self.stop()
        self.loading = True
        self.model_info = None
        self.load_started.emit()
        self._load.emit(settings)

    def _on_loaded(self, info: dict) -> None:
        self.loading = False
        self.model_info = info
        self.model_ready.emit(info)

    def _on_load_failed(self, message: str) -> None:
        self.loading = False
        self.load_failed.emit(message)

    def clear_snapshots(self) -> None:
        """Delete the KV snapshots on disk, on the worker thread (after any running answer and its save)."""
        self._clear_snapshots.emit(snapshot_directory())

    # conversations -> requests
    def engine_messages(self, conversation_id: int, upto_id: int | None = None) -> list[dict]:
        conv = self.store.conversation(conversation_id)
        out = []
        if conv and conv.system_prompt.strip():
            out.append({"role": "system", "content": conv.system_prompt})
        for m in self.store.messages(conversation_id):
            if upto_id is not None and m.id >= upto_id:
                break
            if m.role in ("user", "assistant") and (m.content or m.role == "user"):
                out.append({"role": m.role, "content": m.content})
        return out

    def send(self, conversation_id: int, text: str) -> Message:
        """Store the user's message and start an answer; returns the user message."""
        conv = self.store.conversation(conversation_id)
        if conv is not None and conv.title == DEFAULT_TITLE and not self.store.messages(conversation_id):
            self.store.rename_conversation(conversation_id, title_from(text))
        user = self.store.add_message(conversation_id, "user", text)
        self._start(conversation_id)
        return user

    def regenerate(self, conversation_id: int) -> None:
        """Drop the answer after the last user message and generate it again."""
        msgs = self.store.messages(conversation_id)
        last_user = next((m for m in reversed(msgs) if m.role == "user"), None)
        if last_user is None or self.busy:
            return
        nxt = next((m for m in msgs if m.id > last_user.id), None)
        if nxt is not None:
            self.store.delete_messages_from(conversation_id, nxt.id)
        self._start(conversation_id)

    def resend_edited(self, conversation_id: int, user_message_id: int, text: str) -> None:
        """Replace a user message, drop everything after it, and answer again."""
        if self.busy:
            return
        msgs = self.store.messages(conversation_id)
        nxt = next((m for m in msgs if m.id > user_message_id), None)
        if nxt is not None:
            self.store.delete_messages_from(conversation_id, nxt.id)
        self.store.update_message(user_message_id, text)
        self._start(conversation_id)

    def _start(self, conversation_id: int) -> None:
        messages = self.engine_messages(conversation_id)
        assistant = self.store.add_message(conversation_id, "assistant", "", status="streaming")
        request = GenerationRequest(self._next_id, messages, self.settings.sampling())
        self._next_id += 1
        self.answer = _Answer(request, conversation_id, assistant)
        self.busy_changed.emit(True)
        self.answer_started.emit(assistant)
        self._generate.emit(request)

    def stop(self) -> None:
        if self.answer is not None:
            self.answer.request.cancel.set()

    # results from the worker
    def _current(self, request_id: int) -> _Answer | None:
        a = self.answer
        return a if a is not None and a.request.request_id == request_id else None

    def _on_text(self, request_id: int, text: str, mask: bytes) -> None:
        a = self._current(request_id)
        if a is None:
            return
        a.parts.append(text)
        a.mask += mask
        now = time.monotonic()
        if now - a.last_write >= PARTIAL_WRITE_S:
            self.store.update_message(a.message.id, a.text)
            a.last_write = now
        self.answer_text.emit(text, mask)

    def _on_stats(self, request_id: int, stats: GenerationStats) -> None:
        a = self._current(request_id)
        if a is None:
            return
        a.stats = stats
        self.answer_stats.emit(stats)

    def _meta(self, a: _Answer, stats: GenerationStats | None, **extra: object) -> dict:
        meta: dict = {"drafted": mask_to_spans(a.mask), **extra}
        if stats is not None:
            meta["stats"] = {k: v for k, v in asdict(stats).items() if k != "per_position_acceptance"}
            meta["summary"] = stats_summary(stats)
        return meta

    def _on_finished(self, request_id: int, finished: Finished) -> None:
        a = self._current(request_id)
        if a is None:
            return
        text = a.text
        if finished.text and len(finished.text) >= len(text):
            text = finished.text
            if len(a.mask) < len(text):
                a.mask += bytes(len(text) - len(a.mask))
        status = "partial" if finished.stop_reason == "cancelled" else "complete"
        meta = self._meta(a, finished.stats, stop_reason=finished.stop_reason)
        self.store.update_message(a.message.id, text, status=status, meta=meta)
        self.answer = None
        self.busy_changed.emit(False)
        self.answer_finished.emit(self.store.message(a.message.id), finished)

    def _on_failed(self, request_id: int, message: str, produced: str) -> None:
        a = self._current(request_id)
        if a is None:
            return
        text = produced if len(produced) >= len(a.text) else a.text
        self.store.update_message(
            a.message.id, text, status="partial", meta=self._meta(a, a.stats, error=message)
        )
        self.answer = None
        self.busy_changed.emit(False)
        self.answer_failed.emit(self.store.message(a.message.id), message)

    # shutdown
    def shutdown(self, timeout_ms: int = 15000) -> bool:
        """Stop any answer, close the session and end the thread; True when it ended in time."""
        if self.shut_down:
            return True
        self.shut_down = True
        self.stop()
        self.worker.closing.set()
        self._shutdown.emit()
        ended = self.thread.wait(timeout_ms)
        if ended:
            QCoreApplication.processEvents()  # deliver the worker's last queued results
        else:
            log.warning("the engine thread did not stop within %d ms", timeout_ms)
        a = self.answer
        if a is not None:  # keep what was produced as a partial answer
            self.store.update_message(a.message.id, a.text, status="partial", meta=self._meta(a, a.stats))
            self.answer = None
        return ended
