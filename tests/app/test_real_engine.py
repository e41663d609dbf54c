"""The app on the real engine with the small SmolLM2-135M test model (CPU)."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt

from app.engine_settings import EngineSettings
from tests.app.test_responsiveness import STALL_LIMIT_S, StallProbe

pytestmark = pytest.mark.slow

LOAD_TIMEOUT_MS = 240_000
ANSWER_TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def smollm2_path():
    from engine.model_catalog import locate

    try:
        return str(locate("smollm2-135m"))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"SmolLM2 test model not installed: {exc}")


def small_settings(model: str, **kw) -> EngineSettings:
    return EngineSettings(model_path=model, draft_mode="none", context_length=512, max_tokens=6, **kw)


def test_real_model_streams_and_stop_works(make_window, qtbot, smollm2_path, store):
    w = make_window(real=True, autoload=False)
    w.settings_panel.set_settings(small_settings(smollm2_path))
    with qtbot.waitSignal(w.controller.model_ready, timeout=LOAD_TIMEOUT_MS) as ready:
        assert w.settings_panel.apply()
    info = ready.args[0]
    assert info["architecture"] == "llama" and info["device"] == "cpu"
    assert "SmolLM2" in w.status_label.text()

    chunks: list[str] = []
    w.controller.answer_text.connect(lambda t, m: chunks.append(t))
    probe = StallProbe()
    probe.start()
    with qtbot.waitSignal(w.controller.answer_finished, timeout=ANSWER_TIMEOUT_MS) as done:
        w.send("Say hello.")
    wall, cpu = probe.stop()
    print(
        f"real engine: longest event-loop stall {wall * 1000:.1f} ms wall, {cpu * 1000:.1f} ms GUI-thread CPU"
    )
    assert cpu < STALL_LIMIT_S
    msg, finished = done.args
    assert finished.stop_reason in ("eos", "max_tokens")
    assert msg.content.strip() and "".join(chunks) == msg.content
    assert 1 <= finished.stats.new_tokens <= 6
    assert store.messages(w.conversation_id)[-1].content == msg.content
    # the meter shows a non-zero decode rate, and the answer keeps its figures
    assert float(w.meter.values["decode"].text()) > 0
    assert "tok/s" in w.chat.widgets[-1].footer.text()

    # stop mid-answer: ask for a long answer and press Stop at the first text
    w.controller.settings.max_tokens = 200
    with qtbot.waitSignal(w.controller.answer_text, timeout=ANSWER_TIMEOUT_MS):
        w.send("Count from one to fifty in words.")
    with qtbot.waitSignal(w.controller.answer_finished, timeout=ANSWER_TIMEOUT_MS) as stopped:
        qtbot.mouseClick(w.stop_button, Qt.LeftButton)
    msg, finished = stopped.args
    assert finished.stop_reason == "cancelled"
    assert finished.stats.new_tokens < 200
    assert msg.status == "partial" and msg.content


class RecordingRealEngine:
    """The real loader (engine.session.Engine.load, in the worker thread), recording its configs."""

    def __init__(self) -> None:
        self.configs = []

    def load(self, config, progress=None):  # noqa: ANN001, ANN201
        from app.worker import _default_loader

        self.configs.append(config)
        return _default_loader(config, progress)


def wait_load(qtbot, w) -> tuple[str, object]:
    """Wait for model_ready or load_failed, whichever comes."""
    got: list[tuple[str, object]] = []
    w.controller.model_ready.connect(lambda info: got.append(("ready", info)))
    w.controller.load_failed.connect(lambda msg: got.append(("failed", msg)))
    qtbot.waitUntil(lambda: bool(got), timeout=LOAD_TIMEOUT_MS)
    return got[0]


def test_real_engine_receives_skip_wht_for_q4_0_k(make_window, qtbot, smollm2_path):
    engine = RecordingRealEngine()
    w = make_window(engine=engine, autoload=False)
    p = w.settings_panel
    p.set_settings(small_settings(smollm2_path))
    p.kv_k.setCurrentIndex(p.kv_k.findData("q4_0"))
    p.skip_wht.setChecked(True)
    assert p.apply()
    kind, payload = wait_load(qtbot, w)
    cfg = engine.configs[-1]
    assert (cfg.kv_k, cfg.skip_wht) == ("q4_0", True) and cfg.rotation_skipped()
    if kind == "ready":
        assert payload["kv_k"] == "q4_0"
        assert w.controller.worker._session.config.skip_wht is True
    else:  # an engine build without a q4_0 K cache must say so in the panel, not crash
        assert "q4_0" in payload and p.error.isVisible() and p.error.text() == payload


def test_broken_gguf_gives_a_message_not_a_crash(make_window, qtbot, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)  # a header that lies about its sizes
    w = make_window(real=True, autoload=False)
    w.settings_panel.set_settings(small_settings(str(broken)))
    with qtbot.waitSignal(w.controller.load_failed, timeout=LOAD_TIMEOUT_MS) as failed:
        assert w.settings_panel.apply()
    message = failed.args[0]
    assert "broken.gguf" in message and "Traceback" not in message
    assert not message.startswith("Unexpected engine error"), message
    assert w.banner.isVisible() and w.settings_panel.error.isVisible()
    # (recovering with a good model afterwards is covered on the fake engine: one model load less here)
