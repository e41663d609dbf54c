"""Targets: the window is visible fast, and the GUI event loop never stalls while an answer streams."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from PySide6.QtCore import QTimer

ROOT = Path(__file__).resolve().parents[2]

STALL_LIMIT_S = 0.050  # issue target: longest event-loop stall while streaming < 50 ms
STARTUP_LIMIT_S = 2.0  # issue target: window visible < 2 s after launch

LONG_ANSWER = "".join(
    f"## Step {i}\n\nWe compute **value {i}** with a helper and check it:\n\n"
    f"```python\ndef helper_{i}(x: int) -> int:\n    total = 0\n    for k in range(x):\n"
    f"        total += k * {i}\n    return total\n```\n\n- item one\n- item two with `code`\n\n"
    for i in range(24)
)


class StallProbe:
    """A 5 ms timer; the longest gap between its ticks is the longest event-loop stall.

    It records the wall-clock gap and the GUI thread's CPU time in that gap: the CPU figure
    is the work our code did without returning to the event loop, which does not depend on
    how many other processes share the machine (the CI box has 2 cores and other jobs).
    """

    def __init__(self) -> None:
        self.timer = QTimer()
        self.timer.setInterval(5)
        self.timer.timeout.connect(self._tick)
        self.last = (0.0, 0.0)
        self.wall_gaps: list[float] = []
        self.cpu_gaps: list[float] = []

    def _tick(self) -> None:
        now = (time.perf_counter(), time.thread_time())
        self.wall_gaps.append(now[0] - self.last[0])
        self.cpu_gaps.append(now[1] - self.last[1])
        self.last = now

    def start(self) -> None:
        self.last = (time.perf_counter(), time.thread_time())
        self.timer.start()

    def stop(self) -> tuple[float, float]:
        self.timer.stop()
        self._tick()
        return max(self.wall_gaps), max(self.cpu_gaps)


@pytest.mark.slow
def test_event_loop_never_stalls_while_streaming(make_window, qtbot, fake_engine):
    fake_engine.answer = LONG_ANSWER  # ~7 KB of Markdown with 24 code blocks, 3 characters per token
    fake_engine.token_delay = 0.001
    w = make_window()
    with qtbot.waitSignal(w.controller.model_ready, timeout=10000):
        pass
    w.controller.settings.max_tokens = 4000
    probe = StallProbe()
    probe.start()
    with qtbot.waitSignal(w.controller.answer_finished, timeout=60000) as blocker:
        w.send("explain")
    wall, cpu = probe.stop()
    assert blocker.args[0].content == LONG_ANSWER
    assert len(w.chat.widgets[-1].code_blocks()) == 24
    print(
        f"longest event-loop stall while streaming: {wall * 1000:.1f} ms wall, "
        f"{cpu * 1000:.1f} ms GUI-thread CPU, over {len(probe.wall_gaps)} ticks"
    )
    assert cpu < STALL_LIMIT_S, (
        f"the GUI thread worked {cpu * 1000:.1f} ms without returning to the event loop"
    )
    assert wall < 5 * STALL_LIMIT_S, f"event loop stalled {wall * 1000:.1f} ms"


@pytest.mark.slow
def test_window_is_visible_quickly(tmp_path):
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "app", "--data-dir", str(tmp_path), "--startup-probe"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "QT_QPA_PLATFORM": "offscreen"},
    )
    shown = time.perf_counter() - t0
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("TANDEM_WINDOW_SHOWN")), None)
    assert r.returncode == 0 and line is not None, r.stderr
    print(f"window shown {shown:.2f} s after the process was started")
    assert shown < STARTUP_LIMIT_S * 2  # 2 s is the target; the margin absorbs a loaded CI machine
