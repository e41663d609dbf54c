"""Tandem's desktop app (PySide6). Talks to the engine only through `engine.api`."""

from app import qt_compat

qt_compat.apply()
