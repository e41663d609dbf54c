"""A work-around for a reference-counting bug in PySide6 6.12.0 on CPython < 3.12.

Measured here (PySide6-Essentials 6.12.0, CPython 3.11.7): every call of a void Qt method
(`QLabel.setText`, `QTimer.singleShot`, `QTextBrowser.setHtml`, ...) drops one reference
to None, and `Signal.emit`/`connect`/`disconnect` drop one to True. After a few thousand
calls CPython aborts ("none_dealloc: deallocating None" or "bool_dealloc"); a streaming
answer makes hundreds of such calls a second. PySide6 6.11.0 does not do this, and on
CPython >= 3.12 these objects are immortal, so the bug is harmless there.

`apply()` probes for the bug once and, only where it is found, gives None, True and False
2**40 extra references: the same "never freed" status CPython 3.12 gives them, so the
dropped references can never bring a count to zero. Called from `app/__init__.py`.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

_PROBES = 64
_EXTRA_REFS = 1 << 40

applied = False


def _drops(obj: object, call) -> bool:  # noqa: ANN001
    before = sys.getrefcount(obj)
    for _ in range(_PROBES):
        call()
    return before - sys.getrefcount(obj) >= _PROBES * 3 // 4


def bug_present() -> bool:
    from PySide6.QtCore import QObject, Signal

    class _Probe(QObject):
        fired = Signal()

    probe = _Probe()
    void_drops_none = _drops(None, lambda: probe.setObjectName("probe"))
    emit_drops_true = _drops(True, lambda: probe.fired.emit())
    return void_drops_none or emit_drops_true


def apply() -> bool:
    """Make None/True/False effectively immortal if this PySide6 needs it; returns whether it did."""
    global applied
    if applied or sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return applied
    if bug_present():
        for obj in (None, True, False):
            ctypes.c_ssize_t.from_address(id(obj)).value += _EXTRA_REFS  # ob_refcnt is the first field
        applied = True
        import PySide6

        log.info(
            "PySide6 %s drops references to None/True: applied the refcount work-around", PySide6.__version__
        )
    return applied
