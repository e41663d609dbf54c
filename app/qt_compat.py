"""Work-arounds for bugs in the installed Qt for Python.

PySide6 6.12.0 on Python < 3.12 (measured: 6.12.0 + CPython 3.11.7) returns the bool from
`SignalInstance.emit()` without a new reference, so every emit drops one reference to
True; after a few hundred emits CPython aborts with "bool_dealloc: deallocating True or
False". 6.11.0 does not do this. `emit()` below detects the bug once and gives the
reference back; on a fixed PySide it is a plain emit. Every Python-side emit in the app
goes through it.
"""

from __future__ import annotations

import ctypes
import logging
import sys

from PySide6.QtCore import QObject, Signal, SignalInstance

log = logging.getLogger(__name__)

_PROBES = 64


class _Probe(QObject):
    fired = Signal()


def _measure_leak() -> bool:
    probe = _Probe()
    before = sys.getrefcount(True)
    results = [probe.fired.emit() for _ in range(_PROBES)]
    lost = before - sys.getrefcount(True) + results.count(True)  # the list holds a ref per True
    leaks = lost >= _PROBES * 3 // 4
    if leaks:
        for r in results:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(r))
        log.info("PySide6 emit() drops a bool reference: compensating")
    return leaks


EMIT_DROPS_BOOL_REF = _measure_leak()


def emit(signal: SignalInstance, *args: object) -> bool:
    result = signal.emit(*args)
    if EMIT_DROPS_BOOL_REF:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(result))
    return result
