"""The settings panel: models, speculative mode, KV cache, device, sampling, appearance.

"Apply" validates the settings here (a bad combination is explained in the panel) and
asks the controller to reload in the background; a load failure comes back as a message
in the same place. "Clear snapshots" asks for the KV snapshots on disk to be deleted (the
worker thread does it) and shows how much that freed.
"""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.engine_settings import THEMES, EngineSettings
from app.meter import format_bytes
from engine.api import DEVICES, K_EQUALIZE_MODES, K_SMOOTH_MODES, KV_TYPES
from engine.errors import TandemError

DRAFT_MODE_LABELS = {
    "auto": "Automatic (n-gram lookup on a GPU, none on the CPU)",
    "none": "None",
    "draft-model": "Draft model file",
    "ngram": "N-gram (prompt lookup)",
    "dflash": "DFlash folder",
}

SNAPSHOTS_TIP = (
    "After each answer the conversation's KV cache is saved to disk, so continuing or reopening\n"
    "a chat (also after a restart) skips prefilling the earlier turns. The files live in the user\n"
    "cache folder within a 4 GB budget. Clearing them is safe: the next turn prefills normally."
)

SKIP_WHT_TIP = (
    "Store the q4_0 K cache without the Walsh–Hadamard rotation.\n"
    "Gains: no rotation work when K is written and when queries are rotated, so decode is a little\n"
    "faster and the snapshot does not depend on the rotation seed.\n"
    "Costs: K outliers are no longer spread over the block before 4-bit quantization, so the\n"
    "K cache error grows and answers can get worse (much worse on models with large K outliers,\n"
    "such as Qwen2.5, unless K smoothing is on).\n"
    "Only a q4_0 K cache is affected; other K types ignore it."
)


def _combo(items: dict[str, str] | tuple[str, ...]) -> QComboBox:
    c = QComboBox()
    pairs = items.items() if isinstance(items, dict) else ((v, v) for v in items)
    for value, label in pairs:
        c.addItem(label, value)
    return c


def _set_combo(c: QComboBox, value: str) -> None:
    i = c.findData(value)
    c.setCurrentIndex(max(i, 0))


class SettingsPanel(QScrollArea):
    apply_requested = Signal(object)  # EngineSettings
    clear_snapshots_requested = Signal()
    theme_changed = Signal(str)
    tint_changed = Signal(bool)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWidgetResizable(True)
        body = QWidget()
        outer = QVBoxLayout(body)

        # models
        models = QGroupBox("Models")
        f = QFormLayout(models)
        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("Default: Qwen2.5-Coder-1.5B Instruct Q4_K_M")
        self.model_open = QPushButton("Open…")
        self.model_open.setToolTip("Open any .gguf file in place (it is not copied)")
        self.model_open.clicked.connect(self._choose_model)
        f.addRow("Target", self._row(self.model_path, self.model_open))
        self.draft_mode = _combo(DRAFT_MODE_LABELS)
        self.draft_mode.setToolTip("Speculative decoding: a draft proposes tokens, the target verifies them")
        f.addRow("Draft", self.draft_mode)
        self.draft_path = QLineEdit()
        self.draft_open = QPushButton("Open…")
        self.draft_open.clicked.connect(self._choose_draft)
        f.addRow("Draft path", self._row(self.draft_path, self.draft_open))
        self.max_draft = QSpinBox()
        self.max_draft.setRange(1, 15)  # verify blocks of at most 16 rows stay bit-exact
        self.max_draft.setToolTip("Tokens proposed per step")
        f.addRow("Max draft", self.max_draft)
        self.draft_mode.currentIndexChanged.connect(self._sync_enabled)
        outer.addWidget(models)

        # KV cache and device
        kv = QGroupBox("KV cache and device")
        f = QFormLayout(kv)
        self.kv_k = _combo(KV_TYPES)
        self.kv_v = _combo(KV_TYPES)
        f.addRow("K cache type", self.kv_k)
        f.addRow("V cache type", self.kv_v)
        self.skip_wht = QCheckBox("Skip WHT rotation (q4_0 K only)")
        self.skip_wht.setToolTip(SKIP_WHT_TIP)
        f.addRow(self.skip_wht)
        self.k_smooth = _combo(K_SMOOTH_MODES)
        self.k_smooth.setToolTip("Subtract a per-channel K mean before quantizing (attention is unchanged)")
        f.addRow("K smoothing", self.k_smooth)
        self.k_equalize = _combo(K_EQUALIZE_MODES)
        self.k_equalize.setToolTip(
            "Scale each K channel to a similar width before quantizing, and Q back (attention is unchanged)"
        )
        f.addRow("K equalization", self.k_equalize)
        self.prefill_chunk = QSpinBox()
        self.prefill_chunk.setRange(0, 8192)
        self.prefill_chunk.setSingleStep(64)
        self.prefill_chunk.setSpecialValueText("auto")  # shown for 0
        self.prefill_chunk.setToolTip("Prompt tokens per step; auto = 512 on the CPU, 2048 on a GPU")
        f.addRow("Prefill chunk", self.prefill_chunk)
        self.context_length = QSpinBox()
        self.context_length.setRange(256, 1 << 20)
        self.context_length.setSingleStep(1024)
        f.addRow("Context length", self.context_length)
        self.device = _combo(DEVICES)
        f.addRow("Device", self.device)
        self.kv_k.currentIndexChanged.connect(self._sync_enabled)
        outer.addWidget(kv)

        # KV snapshots on disk (applies at once, no reload)
        snapshots = QGroupBox("Conversation snapshots")
        snapshots.setToolTip(SNAPSHOTS_TIP)
        v = QVBoxLayout(snapshots)
        self.clear_snapshots_button = QPushButton("Clear snapshots")
        self.clear_snapshots_button.setToolTip(SNAPSHOTS_TIP)
        self.clear_snapshots_button.clicked.connect(self._request_clear_snapshots)
        self.snapshot_status = QLabel("")
        self.snapshot_status.setWordWrap(True)
        v.addWidget(self._row(self.clear_snapshots_button, self.snapshot_status))
        outer.addWidget(snapshots)

        # sampling
        sampling = QGroupBox("Sampling")
        f = QFormLayout(sampling)
        self.temperature = self._dspin(0.0, 2.0, 0.05, "0 = greedy (deterministic)")
        self.top_k = QSpinBox()
        self.top_k.setRange(0, 1000)
        self.top_k.setToolTip("0 = off")
        self.top_p = self._dspin(0.0, 1.0, 0.05)
        self.min_p = self._dspin(0.0, 1.0, 0.01)
        self.repeat_penalty = self._dspin(1.0, 2.0, 0.05)
        self.seed = QSpinBox()
        self.seed.setRange(-1, 2**31 - 1)
        self.seed.setToolTip("-1 = a new random seed each answer")
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 1 << 20)
        for label, w in (
            ("Temperature", self.temperature),
            ("Top-k", self.top_k),
            ("Top-p", self.top_p),
            ("Min-p", self.min_p),
            ("Repeat penalty", self.repeat_penalty),
            ("Seed", self.seed),
            ("Max tokens", self.max_tokens),
        ):
            f.addRow(label, w)
        outer.addWidget(sampling)

        self.error = QLabel("")
        self.error.setObjectName("panelError")
        self.error.setWordWrap(True)
        self.error.setVisible(False)
        outer.addWidget(self.error)
        buttons = QHBoxLayout()
        self.apply_button = QPushButton("Apply and reload")
        self.apply_button.clicked.connect(self.apply)
        self.defaults_button = QPushButton("Defaults")
        self.defaults_button.clicked.connect(lambda: self.set_settings(EngineSettings()))
        buttons.addWidget(self.defaults_button)
        buttons.addStretch(1)
        buttons.addWidget(self.apply_button)
        outer.addLayout(buttons)

        # appearance (applies at once)
        look = QGroupBox("Appearance")
        f = QFormLayout(look)
        self.theme = _combo({t: t.capitalize() for t in THEMES})
        self.theme.currentIndexChanged.connect(lambda _i: self.theme_changed.emit(self.theme.currentData()))
        f.addRow("Theme", self.theme)
        self.tint = QCheckBox("Tint accepted draft tokens")
        self.tint.toggled.connect(self.tint_changed)
        f.addRow(self.tint)
        outer.addWidget(look)
        outer.addStretch(1)
        self.setWidget(body)
        self.set_settings(EngineSettings())

    @staticmethod
    def _row(*widgets: QWidget) -> QWidget:
        w = QWidget()
        h = QHBoxLayout(w)
        h.setContentsMargins(0, 0, 0, 0)
        for x in widgets:
            h.addWidget(x)
        return w

    @staticmethod
    def _dspin(lo: float, hi: float, step: float, tip: str = "") -> QDoubleSpinBox:
        s = QDoubleSpinBox()
        s.setRange(lo, hi)
        s.setSingleStep(step)
        s.setDecimals(2)
        if tip:
            s.setToolTip(tip)
        return s

    def _choose_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open a GGUF model", self.model_path.text(), "GGUF (*.gguf)"
        )
        if path:
            self.model_path.setText(path)

    def _choose_draft(self) -> None:
        if self.draft_mode.currentData() == "dflash":
            path = QFileDialog.getExistingDirectory(
                self, "Open a DFlash draft folder", self.draft_path.text()
            )
        else:
            path, _ = QFileDialog.getOpenFileName(
                self, "Open a draft GGUF", self.draft_path.text(), "GGUF (*.gguf)"
            )
        if path:
            self.draft_path.setText(path)

    def _sync_enabled(self) -> None:
        mode = self.draft_mode.currentData()
        needs_path = mode in ("draft-model", "dflash")
        self.draft_path.setEnabled(needs_path)
        self.draft_open.setEnabled(needs_path)
        self.draft_path.setPlaceholderText(
            "Default: Qwen2.5-Coder-0.5B Instruct Q4_K_M"
            if mode == "draft-model"
            else "Folder with config.json + model.safetensors"
            if mode == "dflash"
            else ""
        )
        self.max_draft.setEnabled(mode in ("auto", "draft-model", "ngram"))
        q4_0 = self.kv_k.currentData() == "q4_0"
        self.skip_wht.setEnabled(q4_0)
        if not q4_0:
            self.skip_wht.setChecked(False)

    # values
    def set_settings(self, s: EngineSettings) -> None:
        self.model_path.setText(s.model_path)
        _set_combo(self.draft_mode, s.draft_mode)
        self.draft_path.setText(s.draft_path)
        self.max_draft.setValue(s.max_draft)
        _set_combo(self.kv_k, s.kv_k)
        _set_combo(self.kv_v, s.kv_v)
        self._sync_enabled()
        self.skip_wht.setChecked(s.skip_wht and s.kv_k == "q4_0")
        _set_combo(self.k_smooth, s.k_smooth)
        _set_combo(self.k_equalize, s.k_equalize)
        self.prefill_chunk.setValue(s.prefill_chunk)
        self.context_length.setValue(s.context_length)
        _set_combo(self.device, s.device)
        self.temperature.setValue(s.temperature)
        self.top_k.setValue(s.top_k)
        self.top_p.setValue(s.top_p)
        self.min_p.setValue(s.min_p)
        self.repeat_penalty.setValue(s.repeat_penalty)
        self.seed.setValue(s.seed)
        self.max_tokens.setValue(s.max_tokens)

    def settings(self) -> EngineSettings:
        mode = self.draft_mode.currentData()
        return EngineSettings(
            model_path=self.model_path.text().strip(),
            draft_mode=mode,
            draft_path=self.draft_path.text().strip() if mode in ("draft-model", "dflash") else "",
            max_draft=self.max_draft.value(),
            kv_k=self.kv_k.currentData(),
            kv_v=self.kv_v.currentData(),
            skip_wht=self.skip_wht.isEnabled() and self.skip_wht.isChecked(),
            k_smooth=self.k_smooth.currentData(),
            k_equalize=self.k_equalize.currentData(),
            prefill_chunk=self.prefill_chunk.value(),
            context_length=self.context_length.value(),
            device=self.device.currentData(),
            temperature=self.temperature.value(),
            top_k=self.top_k.value(),
            top_p=self.top_p.value(),
            min_p=self.min_p.value(),
            repeat_penalty=self.repeat_penalty.value(),
            seed=self.seed.value(),
            max_tokens=self.max_tokens.value(),
        )

    # snapshots
    def _request_clear_snapshots(self) -> None:
        self.clear_snapshots_button.setEnabled(False)
        self.snapshot_status.setText("Clearing…")
        self.clear_snapshots_requested.emit()

    def show_snapshots_cleared(self, files: int, freed_bytes: int) -> None:
        self.clear_snapshots_button.setEnabled(True)
        if files:
            noun = "snapshot file" if files == 1 else "snapshot files"
            self.snapshot_status.setText(f"Deleted {files} {noun}, freed {format_bytes(freed_bytes)}.")
        else:
            self.snapshot_status.setText("No snapshots to clear.")

    def show_snapshots_clear_failed(self, message: str) -> None:
        self.clear_snapshots_button.setEnabled(True)
        self.snapshot_status.setText(message)

    def show_error(self, message: str) -> None:
        self.error.setText(message)
        self.error.setVisible(bool(message))

    def apply(self) -> bool:
        s = self.settings()
        try:
            s.check()
        except TandemError as exc:
            self.show_error(str(exc))
            return False
        self.show_error("")
        self.apply_requested.emit(s)
        return True
