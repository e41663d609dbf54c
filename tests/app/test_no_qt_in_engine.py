"""engine/ and kernels/ never import Qt; the GUI modules never import torch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QT_IMPORT = re.compile(r"^\s*(from|import)\s+(PySide6|PySide2|PyQt5|PyQt6|shiboken6|qtpy)\b", re.M)


def test_no_qt_imports_in_engine_or_kernels():
    offenders = []
    files = [p for d in ("engine", "kernels") for p in (ROOT / d).rglob("*.py")]
    assert files, "no engine sources found"
    for p in files:
        if QT_IMPORT.search(p.read_text(encoding="utf-8", errors="replace")):
            offenders.append(str(p.relative_to(ROOT)))
    assert offenders == []


def test_the_pattern_catches_qt_imports():
    assert QT_IMPORT.search("import os\nfrom PySide6.QtCore import QObject\n")
    assert QT_IMPORT.search("    import PyQt5\n")
    assert not QT_IMPORT.search("# we never import PySide6 here\n")


def test_gui_modules_do_not_import_torch():
    """Importing every GUI module and building the window leaves torch unimported."""
    code = (
        "import os, sys, tempfile\n"
        "os.environ['QT_QPA_PLATFORM'] = 'offscreen'\n"
        "from PySide6.QtCore import QSettings\n"
        "from PySide6.QtWidgets import QApplication\n"
        "qapp = QApplication([])\n"
        "import app.main, app.main_window, app.worker, app.controller, app.chat_view, app.settings_panel\n"
        "from app.storage import ChatStore\n"
        "d = tempfile.mkdtemp()\n"
        "w = app.main_window.MainWindow(ChatStore(d + '/c.db'), QSettings(d + '/s.ini', QSettings.IniFormat),"
        " autoload=False)\n"
        "w.show(); qapp.processEvents()\n"
        "print('torch' in sys.modules)\n"
        "w.close()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"
