"""The left column: search box, conversation list (or search hits), and list actions."""

from __future__ import annotations

import datetime as dt

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.storage import ChatStore

ROLE_ID = Qt.UserRole
ROLE_MESSAGE = Qt.UserRole + 1


class ConversationList(QWidget):
    selected = Signal(int)  # conversation id
    hit_selected = Signal(int, int)  # conversation id, message id (-1 for a title hit)
    new_requested = Signal()
    rename_requested = Signal(int)
    delete_requested = Signal(int)
    export_requested = Signal(int)

    def __init__(self, store: ChatStore, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.store = store
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search all messages…")
        self.search.setClearButtonEnabled(True)
        self.list = QListWidget()
        self.list.setObjectName("conversations")
        self.list.setWordWrap(True)
        self.new_button = QPushButton("New chat")
        self.rename_button = QPushButton("Rename")
        self.delete_button = QPushButton("Delete")
        self.export_button = QPushButton("Export")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 0, 6)
        layout.addWidget(self.new_button)
        layout.addWidget(self.search)
        layout.addWidget(self.list, 1)
        row = QHBoxLayout()
        for b in (self.rename_button, self.delete_button, self.export_button):
            row.addWidget(b)
        layout.addLayout(row)
        self._search_timer = QTimer(self)
        self._search_timer.setSingleShot(True)
        self._search_timer.setInterval(150)
        self._search_timer.timeout.connect(self.refresh)
        self.search.textChanged.connect(lambda _t: self._search_timer.start())
        self.list.currentItemChanged.connect(self._on_current)
        self.new_button.clicked.connect(self.new_requested)
        self.rename_button.clicked.connect(lambda: self._emit_for_current(self.rename_requested))
        self.delete_button.clicked.connect(lambda: self._emit_for_current(self.delete_requested))
        self.export_button.clicked.connect(lambda: self._emit_for_current(self.export_requested))
        self.current_id: int | None = None
        self.shown_query = ""

    @property
    def searching(self) -> bool:
        return bool(self.search.text().strip())

    def refresh(self) -> None:
        """Rebuild the list from the store (all conversations, or the hits for the search)."""
        self.list.blockSignals(True)
        self.list.clear()
        self.shown_query = self.search.text().strip()
        if self.searching:
            for hit in self.store.search(self.search.text()):
                label = (
                    f"{hit.conversation_title}\n  {hit.snippet}" if hit.message_id else hit.conversation_title
                )
                item = QListWidgetItem(label)
                item.setData(ROLE_ID, hit.conversation_id)
                item.setData(ROLE_MESSAGE, hit.message_id if hit.message_id is not None else -1)
                self.list.addItem(item)
        else:
            for conv in self.store.conversations():
                item = QListWidgetItem(conv.title)
                item.setData(ROLE_ID, conv.id)
                item.setData(ROLE_MESSAGE, -1)
                when = dt.datetime.fromtimestamp(conv.updated).strftime("%Y-%m-%d %H:%M")
                item.setToolTip(f"{conv.title}\nlast change {when}")
                self.list.addItem(item)
                if conv.id == self.current_id:
                    self.list.setCurrentItem(item)
        self.list.blockSignals(False)

    def select(self, conversation_id: int) -> None:
        self.current_id = conversation_id
        for i in range(self.list.count()):
            item = self.list.item(i)
            if item.data(ROLE_ID) == conversation_id:
                self.list.blockSignals(True)
                self.list.setCurrentItem(item)
                self.list.blockSignals(False)
                return

    def hit_count(self) -> int:
        """Hits listed for the current search text (0 until the debounced search has run)."""
        if not self.searching or self.shown_query != self.search.text().strip():
            return 0
        return self.list.count()

    def _on_current(self, item: QListWidgetItem | None, _prev: QListWidgetItem | None) -> None:
        if item is None:
            return
        cid = item.data(ROLE_ID)
        self.current_id = cid
        if self.searching:
            self.hit_selected.emit(cid, item.data(ROLE_MESSAGE))
        else:
            self.selected.emit(cid)

    def _emit_for_current(self, signal: Signal) -> None:
        if self.current_id is not None:
            signal.emit(self.current_id)
