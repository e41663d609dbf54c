"""EngineWorker: coalescing, drafted masks, error messages, thread placement."""

from __future__ import annotations

import time

import pytest
from PySide6.QtCore import QObject, QThread, Signal

from app.engine_settings import EngineSettings
from app.worker import COALESCE_S, EngineWorker, GenerationRequest, describe_error, split_mask
from engine.api import SamplingParams, TextDelta
from engine.errors import ModelFileError
from tests.app.fake_engine import FakeEngine, fake_locator


class Driver(QObject):
    """Sends requests to the worker through queued signals, as the controller does."""

    load = Signal(object)
    generate = Signal(object)
    shutdown = Signal()


@pytest.fixture
def worker_on_thread(qtbot, tmp_path):
    made = []

    def make(engine):
        thread = QThread()
        worker = EngineWorker(engine.load, fake_locator(tmp_path))
        worker.moveToThread(thread)
        driver = Driver()
        driver.load.connect(worker.load)
        driver.generate.connect(worker.generate)
        driver.shutdown.connect(worker.shutdown)
        thread.start()
        made.append((thread, worker, driver))
        return worker, driver

    yield make
    kept = []
    while made:
        thread, worker, driver = made.pop()
        driver.shutdown.emit()
        assert thread.wait(5000)
        kept.append((thread, worker, driver))


def test_tokens_are_coalesced_to_about_30_updates_per_second(qtbot, worker_on_thread):
    engine = FakeEngine(answer="abc" * 1500, token_delay=0.001)  # 1500 tokens, >= 1.5 s
    w, driver = worker_on_thread(engine)
    with qtbot.waitSignal(w.loaded, timeout=10000):
        driver.load.emit(EngineSettings(draft_mode="none"))
    assert engine.load_threads[0] != "MainThread"
    emitted: list[tuple[str, bytes]] = []
    w.text.connect(lambda rid, t, m: emitted.append((t, m)))
    req = GenerationRequest(7, [{"role": "user", "content": "x"}], SamplingParams(max_tokens=10_000))
    t0 = time.monotonic()
    with qtbot.waitSignal(w.finished, timeout=30000) as blocker:
        driver.generate.emit(req)
    elapsed = time.monotonic() - t0
    rid, finished = blocker.args
    assert rid == 7 and finished.stop_reason == "eos"
    text = "".join(t for t, _ in emitted)
    assert text == engine.answer
    assert sum(len(m) for _, m in emitted) == len(text)
    assert 2 <= len(emitted) <= elapsed / COALESCE_S + 3, (len(emitted), elapsed)
    assert len(emitted) < 1500 / 5  # far fewer crossings than tokens


def test_split_mask():
    assert split_mask(TextDelta("abc", [1], [True])) == b"\x01\x01\x01"
    assert split_mask(TextDelta("abc", [1], [False])) == b"\x00\x00\x00"
    assert split_mask(TextDelta("abcd", [1, 2], [True, False])) == b"\x01\x01\x00\x00"
    d = TextDelta("abcde", [1, 2], [True, False])
    d.pieces = ["a", "bcde"]
    assert split_mask(d) == b"\x01\x00\x00\x00\x00"


def test_describe_error():
    assert describe_error(ModelFileError("bad file; choose another")) == "bad file; choose another"
    assert describe_error(MemoryError()).startswith("Out of memory.")
    assert describe_error(RuntimeError("CUDA out of memory. Tried to allocate")).startswith("Out of memory.")
    assert "ValueError" in describe_error(ValueError("x"))


@pytest.mark.parametrize(("on_gpu", "mode"), [(False, "none"), (True, "ngram")])
def test_automatic_draft_mode_follows_the_device(qtbot, tmp_path, on_gpu, mode):
    engine = FakeEngine()
    probed = []
    thread = QThread()
    worker = EngineWorker(engine.load, fake_locator(tmp_path), gpu_probe=lambda d: probed.append(d) or on_gpu)
    worker.moveToThread(thread)
    driver = Driver()
    driver.load.connect(worker.load)
    driver.shutdown.connect(worker.shutdown)
    thread.start()
    try:
        with qtbot.waitSignal(worker.loaded, timeout=10000):
            driver.load.emit(EngineSettings(device="auto"))  # draft mode "auto" is the default
        assert probed == ["auto"]
        config = engine.configs[-1]
        assert config.draft.mode == mode
        assert config.draft.path is None  # no draft model is located or loaded
    finally:
        driver.shutdown.emit()
        assert thread.wait(5000)
