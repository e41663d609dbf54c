"""The main window: conversations (left), chat + input + meter (centre), settings (dock)."""

from __future__ import annotations

import logging
from pathlib import Path

from PySide6.QtCore import QEvent, QObject, QSettings, Qt, QTimer
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QDockWidget,
    QFileDialog,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QMainWindow,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from app.chat_view import ChatView
from app.controller import DEFAULT_TITLE, ChatController
from app.conversation_list import ConversationList
from app.engine_settings import EngineSettings
from app.export import conversation_to_json, conversation_to_markdown
from app.meter import ThroughputMeter
from app.settings_panel import SettingsPanel
from app.storage import ChatStore, Message
from app.theme import apply_theme
from app.worker import EngineLoader, ModelLocator
from engine.api import Finished, GenerationStats

log = logging.getLogger(__name__)


class MainWindow(QMainWindow):
    def __init__(
        self,
        store: ChatStore,
        settings: QSettings,
        engine_loader: EngineLoader | None = None,
        model_locator: ModelLocator | None = None,
        autoload: bool = True,
    ) -> None:
        super().__init__()
        self.store = store
        self.qsettings = settings
        self.setWindowTitle("Tandem")
        self.controller = ChatController(store, engine_loader, model_locator, self)
        self.conversation_id: int | None = None
        self.editing_message_id: int | None = None
        self._build()
        self._connect()
        self._restore()
        if autoload:
            QTimer.singleShot(0, lambda: self.controller.load(self.engine_settings))

    # construction
    def _build(self) -> None:
        self.conversations = ConversationList(self.store)
        self.system_prompt = QLineEdit()
        self.system_prompt.setPlaceholderText("System prompt for this conversation (optional)")
        self.banner = QLabel("")
        self.banner.setObjectName("errorBanner")
        self.banner.setWordWrap(True)
        self.banner.setVisible(False)
        self.banner.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.chat = ChatView()
        self.input = QPlainTextEdit()
        self.input.setPlaceholderText("Message (Enter sends, Shift+Enter for a new line)")
        self.input.setFixedHeight(84)
        self.input.installEventFilter(self)
        self.editing_label = QLabel(
            "Editing your last message: Send replaces it and answers again; Esc cancels."
        )
        self.editing_label.setVisible(False)
        self.send_button = QPushButton("Send")
        self.send_button.setDefault(True)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.meter = ThroughputMeter()

        column = QWidget()
        col = QVBoxLayout(column)
        col.setContentsMargins(6, 6, 6, 0)
        col.addWidget(self.system_prompt)
        col.addWidget(self.banner)
        col.addWidget(self.chat, 1)
        col.addWidget(self.editing_label)
        row = QHBoxLayout()
        row.addWidget(self.input, 1)
        buttons = QVBoxLayout()
        buttons.addWidget(self.send_button)
        buttons.addWidget(self.stop_button)
        row.addLayout(buttons)
        col.addLayout(row)
        col.addWidget(self.meter)

        self.splitter = QSplitter(Qt.Horizontal)
        self.splitter.setObjectName("mainSplitter")
        self.splitter.addWidget(self.conversations)
        self.splitter.addWidget(column)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setSizes([240, 760])
        self.setCentralWidget(self.splitter)

        self.settings_panel = SettingsPanel()
        self.settings_dock = QDockWidget("Settings", self)
        self.settings_dock.setObjectName("settingsDock")
        self.settings_dock.setWidget(self.settings_panel)
        self.addDockWidget(Qt.RightDockWidgetArea, self.settings_dock)

        bar = self.addToolBar("Main")
        bar.setObjectName("mainToolBar")
        bar.setMovable(False)
        self.new_action = QAction("New chat", self)
        self.new_action.setShortcut(QKeySequence.New)
        bar.addAction(self.new_action)
        self.stop_action = QAction("Stop", self)
        self.stop_action.setShortcut(QKeySequence("Ctrl+."))
        self.stop_action.setEnabled(False)
        bar.addAction(self.stop_action)
        self.tint_action = QAction("Tint drafts", self)
        self.tint_action.setCheckable(True)
        self.tint_action.setToolTip("Tint the tokens that came from accepted drafts")
        bar.addAction(self.tint_action)
        settings_toggle = self.settings_dock.toggleViewAction()
        settings_toggle.setText("Settings")
        bar.addAction(settings_toggle)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setMaximumWidth(220)
        self.progress.setTextVisible(False)
        self.status_label = QLabel("Starting…")
        self.statusBar().addWidget(self.status_label, 1)
        self.statusBar().addPermanentWidget(self.progress)

    def _connect(self) -> None:
        c = self.controller
        self.send_button.clicked.connect(self.send_from_input)
        self.stop_button.clicked.connect(c.stop)
        self.stop_action.triggered.connect(c.stop)
        self.new_action.triggered.connect(self.new_conversation)
        self.tint_action.toggled.connect(self._set_tint)
        self.conversations.new_requested.connect(self.new_conversation)
        self.conversations.selected.connect(self.open_conversation)
        self.conversations.hit_selected.connect(lambda cid, _mid: self.open_conversation(cid))
        self.conversations.rename_requested.connect(self.rename_conversation)
        self.conversations.delete_requested.connect(self.delete_conversation)
        self.conversations.export_requested.connect(self.export_conversation)
        self.system_prompt.editingFinished.connect(self._save_system_prompt)
        self.chat.edit_requested.connect(self.begin_edit)
        self.chat.regenerate_requested.connect(lambda _mid: self.regenerate())
        self.settings_panel.apply_requested.connect(self.apply_settings)
        self.settings_panel.theme_changed.connect(self.set_theme)
        self.settings_panel.tint_changed.connect(self.tint_action.setChecked)
        self.settings_panel.clear_snapshots_requested.connect(c.clear_snapshots)
        c.snapshots_cleared.connect(self._on_snapshots_cleared)
        c.snapshots_clear_failed.connect(self.settings_panel.show_snapshots_clear_failed)
        c.load_started.connect(self._on_load_started)
        c.load_progress.connect(self._on_load_progress)
        c.model_ready.connect(self._on_model_ready)
        c.load_failed.connect(self._on_load_failed)
        c.answer_started.connect(self._on_answer_started)
        c.answer_text.connect(self.chat.append_stream)
        c.answer_stats.connect(self.meter.update_stats)
        c.answer_finished.connect(self._on_answer_finished)
        c.answer_failed.connect(self._on_answer_failed)
        c.busy_changed.connect(self._on_busy)

    def _restore(self) -> None:
        s = self.qsettings
        geometry = s.value("window/geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        else:
            self.resize(1280, 800)
        state = s.value("window/state")
        if state is not None:
            self.restoreState(state)
        splitter = s.value("window/splitter")
        if splitter is not None:
            self.splitter.restoreState(splitter)
        self.engine_settings = EngineSettings.load(s)
        self.settings_panel.set_settings(self.engine_settings)
        theme = str(s.value("ui/theme", "system"))
        i = self.settings_panel.theme.findData(theme)
        self.settings_panel.theme.setCurrentIndex(max(i, 0))
        self.set_theme(theme)
        tint = str(s.value("ui/tint", "false")).lower() == "true"
        self.tint_action.setChecked(tint)
        self.conversations.refresh()
        last = s.value("ui/conversation")
        convs = self.store.conversations()
        ids = {cv.id for cv in convs}
        try:
            last_id = int(last) if last is not None else None
        except (TypeError, ValueError):
            last_id = None
        if last_id in ids:
            self.open_conversation(last_id)
        elif convs:
            self.open_conversation(convs[0].id)

    def save_state(self) -> None:
        s = self.qsettings
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/state", self.saveState())
        s.setValue("window/splitter", self.splitter.saveState())
        s.setValue("ui/tint", self.tint_action.isChecked())
        if self.conversation_id is not None:
            s.setValue("ui/conversation", self.conversation_id)
        s.sync()

    # conversations
    def new_conversation(self) -> int:
        conv = self.store.create_conversation(DEFAULT_TITLE)
        self.conversations.search.clear()
        self.conversations.current_id = conv.id
        self.conversations.refresh()
        self.open_conversation(conv.id)
        self.input.setFocus()
        return conv.id

    def open_conversation(self, conversation_id: int) -> None:
        if self.controller.busy and conversation_id != self.conversation_id:
            self.controller.stop()
        conv = self.store.conversation(conversation_id)
        if conv is None:
            return
        self.conversation_id = conversation_id
        self.conversations.select(conversation_id)
        self.system_prompt.setText(conv.system_prompt)
        self.cancel_edit()
        self.chat.set_messages(self.store.messages(conversation_id))

    def rename_conversation(self, conversation_id: int, title: str | None = None) -> None:
        conv = self.store.conversation(conversation_id)
        if conv is None:
            return
        if title is None:
            title, ok = QInputDialog.getText(self, "Rename conversation", "Title", text=conv.title)
            if not ok:
                return
        title = title.strip() or conv.title
        self.store.rename_conversation(conversation_id, title)
        self.conversations.refresh()

    def delete_conversation(self, conversation_id: int, confirm: bool = True) -> None:
        conv = self.store.conversation(conversation_id)
        if conv is None:
            return
        if confirm:
            answer = QMessageBox.question(
                self, "Delete conversation", f"Delete “{conv.title}” and all its messages?"
            )
            if answer != QMessageBox.Yes:
                return
        if conversation_id == self.conversation_id:
            self.controller.stop()
            self.conversation_id = None
            self.chat.clear()
            self.system_prompt.clear()
        self.store.delete_conversation(conversation_id)
        self.conversations.refresh()
        remaining = self.store.conversations()
        if self.conversation_id is None and remaining:
            self.open_conversation(remaining[0].id)

    def export_conversation(self, conversation_id: int, path: str | None = None) -> Path | None:
        conv = self.store.conversation(conversation_id)
        if conv is None:
            return None
        if path is None:
            safe = (
                "".join(ch if ch.isalnum() or ch in " -_" else "_" for ch in conv.title).strip()
                or "conversation"
            )
            path, _ = QFileDialog.getSaveFileName(
                self, "Export conversation", f"{safe}.md", "Markdown (*.md);;JSON (*.json)"
            )
            if not path:
                return None
        out = Path(path)
        messages = self.store.messages(conversation_id)
        text = (
            conversation_to_json(conv, messages)
            if out.suffix.lower() == ".json"
            else conversation_to_markdown(conv, messages)
        )
        try:
            out.write_text(text, encoding="utf-8")
        except OSError as exc:
            self.show_error(f"Could not write {out}: {exc.strerror or exc}. Choose another place.")
            return None
        self.statusBar().showMessage(f"Exported to {out}", 5000)
        return out

    def _save_system_prompt(self) -> None:
        if self.conversation_id is not None:
            self.store.set_system_prompt(self.conversation_id, self.system_prompt.text())

    # sending
    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt override)
        if obj is self.input and event.type() == QEvent.KeyPress:
            if event.key() in (Qt.Key_Return, Qt.Key_Enter) and not event.modifiers() & Qt.ShiftModifier:
                self.send_from_input()
                return True
            if event.key() == Qt.Key_Escape and self.editing_message_id is not None:
                self.cancel_edit()
                return True
        return super().eventFilter(obj, event)

    def send_from_input(self) -> bool:
        text = self.input.toPlainText().strip()
        if not text or self.controller.busy:
            return False
        return self.send(text)

    def send(self, text: str) -> bool:
        if self.controller.busy:
            return False
        self.hide_error()
        if self.conversation_id is None:
            self.new_conversation()
        self._save_system_prompt()
        cid = self.conversation_id
        if self.editing_message_id is not None:
            mid = self.editing_message_id
            self.cancel_edit()
            self.controller.resend_edited(cid, mid, text)
        else:
            self.controller.send(cid, text)
        self.input.clear()
        # the chat view was updated through answer_started; the list shows the new title
        self.conversations.refresh()
        return True

    def regenerate(self) -> None:
        if self.conversation_id is not None and not self.controller.busy:
            self.hide_error()
            self.controller.regenerate(self.conversation_id)

    def begin_edit(self, message_id: int) -> None:
        m = self.store.message(message_id)
        if m is None or self.controller.busy:
            return
        self.editing_message_id = message_id
        self.input.setPlainText(m.content)
        self.editing_label.setVisible(True)
        self.input.setFocus()

    def cancel_edit(self) -> None:
        if self.editing_message_id is not None:
            self.editing_message_id = None
            self.editing_label.setVisible(False)
            self.input.clear()

    # controller events
    def _on_busy(self, busy: bool) -> None:
        self.send_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)
        self.stop_action.setEnabled(busy)

    def _on_answer_started(self, message: Message) -> None:
        if message.conversation_id != self.conversation_id:
            return
        self.chat.sync_messages(self.store.messages(message.conversation_id)[:-1])
        w = self.chat.begin_stream(message)
        if self.controller.loading:
            w.set_footer("waiting for the model to load…")
        self.meter.begin_answer()

    def _on_answer_finished(self, message: Message, finished: Finished) -> None:
        if message.conversation_id == self.conversation_id:
            self.chat.end_stream(message)
        self.meter.end_answer(finished.stats, finished.stop_reason)
        self.conversations.refresh()

    def _on_answer_failed(self, message: Message, error: str) -> None:
        if message.conversation_id == self.conversation_id:
            self.chat.end_stream(message)
        self.meter.end_answer(None, "error")
        self.show_error(error)

    def _on_load_started(self) -> None:
        self.progress.setVisible(True)
        self.progress.setValue(0)
        self.status_label.setText("Loading the model…")
        self.settings_panel.apply_button.setEnabled(False)

    def _on_load_progress(self, stage: str, fraction: float) -> None:
        self.progress.setValue(int(fraction * 1000))
        self.status_label.setText(f"{stage}… {fraction:.0%}" if fraction < 1 else stage)

    def _on_model_ready(self, info: dict) -> None:
        self.progress.setValue(1000)
        self.progress.setVisible(False)
        self.settings_panel.apply_button.setEnabled(True)
        self.settings_panel.show_error("")
        name = info.get("model") or Path(str(info.get("model_path", ""))).name
        draft = info.get("draft") or info.get("draft_mode") or "none"
        device = str(info.get("device", ""))
        self.status_label.setText(
            f"Ready: {name} · draft {draft} · {device} · loaded in {info.get('load_seconds', 0)} s"
        )
        self.meter.set_device(device)
        self.hide_error()
        if self.chat.streaming is not None:
            self.chat.streaming.set_footer("")

    def _on_load_failed(self, message: str) -> None:
        self.progress.setVisible(False)
        self.settings_panel.apply_button.setEnabled(True)
        self.status_label.setText("No model loaded")
        self.settings_panel.show_error(message)
        self.show_error("Could not load the model: " + message)

    def _on_snapshots_cleared(self, files: int, freed_bytes: int) -> None:
        self.settings_panel.show_snapshots_cleared(files, freed_bytes)
        self.statusBar().showMessage(self.settings_panel.snapshot_status.text(), 5000)

    # errors
    def show_error(self, message: str) -> None:
        self.banner.setText(message)
        self.banner.setVisible(True)

    def hide_error(self) -> None:
        self.banner.setVisible(False)

    # settings and appearance
    def apply_settings(self, settings: EngineSettings) -> None:
        self.engine_settings = settings
        settings.save(self.qsettings)
        self.controller.load(settings)

    def set_theme(self, theme: str) -> None:
        app = QApplication.instance()
        dark = apply_theme(app, theme) if app is not None else False
        self.chat.set_dark(dark)
        self.qsettings.setValue("ui/theme", theme)

    def _set_tint(self, on: bool) -> None:
        self.chat.set_tint(on)
        if self.settings_panel.tint.isChecked() != on:
            self.settings_panel.tint.setChecked(on)

    # meter convenience for tests and the self-test
    def last_stats(self) -> GenerationStats | None:
        return self.meter.last_stats

    def closeEvent(self, event) -> None:  # noqa: ANN001, N802 (Qt override)
        self.save_state()
        self.hide()
        self.controller.shutdown()
        super().closeEvent(event)
