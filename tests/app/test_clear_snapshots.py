"""The settings panel's "Clear snapshots": engine code deletes the files on the worker thread, the panel
says how much was freed."""

from __future__ import annotations

import threading

import pytest
from PySide6.QtCore import Qt

import engine.snapshots


def wait_ready(qtbot, w):
    if w.controller.model_info is None:
        with qtbot.waitSignal(w.controller.model_ready, timeout=10000):
            pass


@pytest.fixture
def snapshot_dir(tmp_path, monkeypatch):
    d = tmp_path / "snapshots"
    d.mkdir()
    monkeypatch.setenv("TANDEM_SNAPSHOT_DIR", str(d))
    return d


@pytest.fixture
def clear_threads(monkeypatch):
    """Names of the threads SnapshotStore.clear ran on."""
    names: list[str] = []
    original = engine.snapshots.SnapshotStore.clear

    def recording(self):
        names.append(threading.current_thread().name)
        return original(self)

    monkeypatch.setattr(engine.snapshots.SnapshotStore, "clear", recording)
    return names


def test_clear_snapshots_deletes_files_off_the_gui_thread_and_reports_freed(
    make_window, qtbot, fake_engine, snapshot_dir, clear_threads
):
    (snapshot_dir / "0123456789abcdef-aaaa.tkv").write_bytes(b"x" * 1000)
    (snapshot_dir / "fedcba9876543210-bbbb.tkv").write_bytes(b"x" * 2072)
    (snapshot_dir / ".fedcba9876543210-cccc.tkv.99.0a1b2c3d.tmp").write_bytes(b"x" * 100)
    (snapshot_dir / "readme.txt").write_bytes(b"not a snapshot")
    w = make_window()
    wait_ready(qtbot, w)
    panel = w.settings_panel
    with qtbot.waitSignal(w.controller.snapshots_cleared, timeout=10000) as blocker:
        qtbot.mouseClick(panel.clear_snapshots_button, Qt.LeftButton)
        assert not panel.clear_snapshots_button.isEnabled()  # until the worker answers
    assert blocker.args == [3, 3172]
    assert sorted(p.name for p in snapshot_dir.iterdir()) == ["readme.txt"]
    assert clear_threads == [fake_engine.load_threads[0]] and clear_threads[0] != "MainThread"
    assert panel.snapshot_status.text() == "Deleted 3 snapshot files, freed 3.1 KiB."
    assert panel.clear_snapshots_button.isEnabled()
    assert w.statusBar().currentMessage() == panel.snapshot_status.text()

    with qtbot.waitSignal(w.controller.snapshots_cleared, timeout=10000) as blocker:
        qtbot.mouseClick(panel.clear_snapshots_button, Qt.LeftButton)
    assert blocker.args == [0, 0] and panel.snapshot_status.text() == "No snapshots to clear."


def test_clear_waits_for_a_running_answer(make_window, qtbot, fake_engine, snapshot_dir, clear_threads):
    """The worker clears after the answer (and its snapshot save) ends; the GUI stays responsive meanwhile."""
    fake_engine.token_delay = 0.02
    (snapshot_dir / "0123456789abcdef-aaaa.tkv").write_bytes(b"x" * 10)
    w = make_window()
    wait_ready(qtbot, w)
    finished: list[str] = []
    w.controller.answer_finished.connect(lambda _m, _f: finished.append("answer"))
    w.controller.snapshots_cleared.connect(lambda _n, _b: finished.append("cleared"))
    w.send("hello")
    with qtbot.waitSignal(w.controller.snapshots_cleared, timeout=20000):
        w.settings_panel.clear_snapshots_button.click()
        assert w.controller.busy
    assert finished == ["answer", "cleared"]
    assert list(snapshot_dir.iterdir()) == []


def test_clear_failure_is_shown_in_the_panel(make_window, qtbot, snapshot_dir, monkeypatch):
    def broken(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(engine.snapshots.SnapshotStore, "clear", broken)
    w = make_window()
    wait_ready(qtbot, w)
    panel = w.settings_panel
    with qtbot.waitSignal(w.controller.snapshots_clear_failed, timeout=10000):
        panel.clear_snapshots_button.click()
    assert panel.snapshot_status.text().startswith(f"Could not clear the snapshots in {snapshot_dir}")
    assert "Permission denied" in panel.snapshot_status.text()
    assert panel.clear_snapshots_button.isEnabled()
