"""Live throughput meter: decode and prefill speed, TTFT, prompt tokens taken from the cache
(the in-memory prefix or a restored snapshot) instead of being prefilled, acceptance, KV memory,
device, and a sparkline of decode tok/s over the last minute."""

from __future__ import annotations

import time
from collections import deque

from PySide6.QtCore import QPointF, Qt, QTimer
from PySide6.QtGui import QPainter, QPainterPath, QPalette, QPen
from PySide6.QtWidgets import QGridLayout, QLabel, QSizePolicy, QVBoxLayout, QWidget

from engine.api import GenerationStats

SPARK_WINDOW_S = 60.0
SPARK_SAMPLE_S = 0.5


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def acceptance_rate(stats: GenerationStats) -> float | None:
    return stats.accepted / stats.drafted if stats.drafted else None


CACHED_TIP = (
    "Prompt tokens whose K/V came from the cache (earlier turns kept in memory, or a snapshot restored\n"
    "from disk) instead of being prefilled again, out of all prompt tokens."
)


def cached_tokens_text(stats: GenerationStats) -> str:
    """'2,950 / 3,010': prompt tokens that were not prefilled, of all prompt tokens."""
    return f"{stats.cached_tokens:,} / {stats.prompt_tokens:,}"


def stats_summary(stats: GenerationStats) -> str:
    """One line for under an answer:
    '42 tokens · 25.3 tok/s · TTFT 0.31 s · cached 2,950 / 3,010 tokens · 2.4 tok/step (68%)'."""
    parts = [
        f"{stats.new_tokens} tokens",
        f"{stats.decode_tok_per_s:.1f} tok/s",
        f"TTFT {stats.ttft_seconds:.2f} s",
    ]
    if stats.cached_tokens:
        parts.append(f"cached {cached_tokens_text(stats)} tokens")
    rate = acceptance_rate(stats)
    if rate is not None:
        parts.append(f"{stats.acceptance_length:.2f} tok/step ({rate:.0%} accepted)")
    if stats.prefill_tok_per_s:
        parts.append(f"prefill {stats.prefill_tok_per_s:.0f} tok/s")
    return " · ".join(parts)


class Sparkline(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.samples: deque[tuple[float, float]] = deque()
        self.setMinimumHeight(36)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setToolTip("Decode tokens per second over the last 60 seconds")

    def add(self, value: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.samples.append((now, value))
        while self.samples and now - self.samples[0][0] > SPARK_WINDOW_S:
            self.samples.popleft()
        self.update()

    def paintEvent(self, _event) -> None:  # noqa: ANN001, N802 (Qt override)
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        r = self.rect().adjusted(1, 2, -1, -2)
        p.setPen(QPen(self.palette().color(QPalette.Mid), 1))
        p.drawLine(r.bottomLeft(), r.bottomRight())
        if len(self.samples) >= 2:
            now = self.samples[-1][0]
            top = max(v for _, v in self.samples) or 1.0
            path = QPainterPath()
            for i, (t, v) in enumerate(self.samples):
                x = r.right() - (now - t) / SPARK_WINDOW_S * r.width()
                y = r.bottom() - v / top * r.height()
                path.moveTo(QPointF(x, y)) if i == 0 else path.lineTo(QPointF(x, y))
            p.setPen(QPen(self.palette().color(QPalette.Highlight), 1.5))
            p.drawPath(path)
        p.end()


class ThroughputMeter(QWidget):
    FIELDS = (
        ("decode", "decode tok/s"),
        ("prefill", "prefill tok/s"),
        ("ttft", "time to first token"),
        ("cached", "cached / prompt tokens"),
        ("acceptance", "acceptance length · rate"),
        ("kv", "KV memory"),
        ("device", "device"),
    )

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.values: dict[str, QLabel] = {}
        grid = QGridLayout()
        grid.setHorizontalSpacing(18)
        grid.setVerticalSpacing(0)
        for col, (key, caption) in enumerate(self.FIELDS):
            value = QLabel("–")
            value.setObjectName("meterValue")
            value.setTextInteractionFlags(Qt.TextSelectableByMouse)
            cap = QLabel(caption)
            cap.setObjectName("meterCaption")
            grid.addWidget(value, 0, col)
            grid.addWidget(cap, 1, col)
            self.values[key] = value
        self.values["cached"].setToolTip(CACHED_TIP)
        self.state = QLabel("idle")
        self.state.setObjectName("meterCaption")
        grid.addWidget(self.state, 0, len(self.FIELDS), 2, 1, Qt.AlignRight | Qt.AlignVCenter)
        self.sparkline = Sparkline()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 4, 8, 4)
        layout.addLayout(grid)
        layout.addWidget(self.sparkline)
        self.live_decode = 0.0
        self.streaming = False
        self.last_stats: GenerationStats | None = None
        self._timer = QTimer(self)
        self._timer.setInterval(int(SPARK_SAMPLE_S * 1000))
        self._timer.timeout.connect(lambda: self.sparkline.add(self.live_decode if self.streaming else 0.0))
        self._timer.start()

    def set_device(self, device: str) -> None:
        self.values["device"].setText(device or "–")

    def begin_answer(self) -> None:
        self.streaming = True
        self.live_decode = 0.0
        self.state.setText("streaming…")

    def update_stats(self, stats: GenerationStats) -> None:
        self.last_stats = stats
        self.live_decode = stats.decode_tok_per_s
        v = self.values
        v["decode"].setText(f"{stats.decode_tok_per_s:.1f}")
        v["prefill"].setText(f"{stats.prefill_tok_per_s:.0f}" if stats.prefill_tok_per_s else "–")
        v["ttft"].setText(f"{stats.ttft_seconds:.2f} s" if stats.ttft_seconds else "–")
        v["cached"].setText(cached_tokens_text(stats) if stats.prompt_tokens else "–")
        rate = acceptance_rate(stats)
        v["acceptance"].setText(f"{stats.acceptance_length:.2f} · {rate:.0%}" if rate is not None else "–")
        v["kv"].setText(format_bytes(stats.kv_bytes) if stats.kv_bytes else "–")
        if stats.device:
            v["device"].setText(stats.device)
            if stats.device_reason:
                v["device"].setToolTip(stats.device_reason)

    def end_answer(self, stats: GenerationStats | None, reason: str) -> None:
        """The last answer's final figures stay on display until the next one starts."""
        if stats is not None:
            self.update_stats(stats)
        self.streaming = False
        self.state.setText(f"last answer ({reason})")

    def decode_rate_text(self) -> str:
        return self.values["decode"].text()
