"""The emit() work-around keeps the bool refcount balanced over many emits."""

from __future__ import annotations

import sys

from PySide6.QtCore import QObject, Signal

from app.qt_compat import emit


class _Source(QObject):
    ping = Signal(int)


def test_many_emits_keep_true_alive(qtbot):
    src = _Source()
    got = []
    src.ping.connect(got.append)
    before = sys.getrefcount(True)
    for i in range(5000):  # more than True's refcount: without the fix this aborts the interpreter
        emit(src.ping, i)
    assert len(got) == 5000
    assert abs(sys.getrefcount(True) - before) < 50
