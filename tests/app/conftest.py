"""GUI tests run offscreen and wait on signals, never on sleeps."""

from __future__ import annotations

import os
import tempfile  # noqa: E402

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("TANDEM_SNAPSHOT_DIR", tempfile.mkdtemp(prefix="tandem-snapshots-"))

import pytest  # noqa: E402

from tests.app.fake_engine import FakeEngine, fake_locator  # noqa: E402


@pytest.fixture
def qsettings(tmp_path):
    from PySide6.QtCore import QSettings

    return QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)


@pytest.fixture
def store(tmp_path):
    from app.storage import ChatStore

    s = ChatStore(tmp_path / "chats.sqlite3")
    yield s
    s.close()


@pytest.fixture
def fake_engine():
    return FakeEngine()


@pytest.fixture
def make_window(qtbot, tmp_path, store, qsettings, fake_engine):
    """Build a MainWindow on the fake engine; every window is closed (thread stopped) at the end."""
    from app.main_window import MainWindow

    windows = []

    def make(engine=None, store_=None, settings_=None, autoload=True, real=False, locator=None):
        """real=True: the real engine (engine.session, loaded lazily in the worker thread)."""
        engine = engine or fake_engine
        w = MainWindow(
            store_ or store,
            settings_ or qsettings,
            engine_loader=None if real else engine.load,
            model_locator=None if real else (locator or fake_locator(tmp_path)),
            autoload=autoload,
        )
        qtbot.addWidget(w)
        w.show()
        windows.append(w)
        return w

    yield make
    for w in windows:
        if not w.controller.shut_down:
            w.close()
