"""`python -m app --self-test`: a scripted session against the real engine, offscreen.

Loads the small test model (SmolLM2-135M, or --model), sends a message and waits for a
streamed answer, stops a second answer mid-way, closes the window and reopens the store to
check the conversation survived. Prints one line per step; returns 0 when all pass.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from PySide6.QtCore import QEventLoop, QSettings, QTimer

log = logging.getLogger(__name__)

TEST_MODEL = "smollm2-135m"


def wait_any(signals: list, timeout_s: float) -> tuple[int, tuple] | None:
    """Run the event loop until one of `signals` fires: (its index, its args), or None on timeout."""
    loop = QEventLoop()
    got: list[tuple[int, tuple]] = []
    slots = []
    for i, signal in enumerate(signals):

        def on_signal(*args: object, i: int = i) -> None:
            got.append((i, args))
            loop.quit()

        signal.connect(on_signal)
        slots.append((signal, on_signal))
    timer = QTimer()
    timer.setSingleShot(True)
    timer.timeout.connect(loop.quit)
    timer.start(int(timeout_s * 1000))
    if not got:
        loop.exec()
    timer.stop()
    for signal, slot in slots:
        signal.disconnect(slot)
    return got[0] if got else None


def wait_for(signal, timeout_s: float) -> tuple | None:  # noqa: ANN001
    """Run the event loop until `signal` fires (its args) or time runs out (None)."""
    hit = wait_any([signal], timeout_s)
    return hit[1] if hit else None


def run_self_test(model: str | None = None, timeout_s: float = 240.0) -> int:
    from app.engine_settings import EngineSettings
    from app.main_window import MainWindow
    from app.storage import ChatStore

    results: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str = "") -> bool:
        results.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        return ok

    with tempfile.TemporaryDirectory(prefix="tandem-self-test-") as tmp:
        data = Path(tmp)
        store = ChatStore(data / "chats.sqlite3")
        qsettings = QSettings(str(data / "settings.ini"), QSettings.IniFormat)
        if model is None:
            try:
                from engine.model_catalog import locate

                model = str(locate(TEST_MODEL))
            except Exception as exc:  # noqa: BLE001 - reported as a failed step
                check("locate the test model", False, str(exc))
                return 1
        settings = EngineSettings(model_path=model, draft_mode="none", max_tokens=16, context_length=1024)
        t0 = time.perf_counter()
        window = MainWindow(store, qsettings, autoload=False)
        window.show()
        check("window shown", window.isVisible(), f"{time.perf_counter() - t0:.2f} s")
        c = window.controller
        c.load(settings)
        hit = wait_any([c.model_ready, c.load_failed], timeout_s)
        loaded = hit[1] if hit is not None and hit[0] == 0 else None
        if loaded is not None:
            detail = f"{loaded[0].get('model', '')} on {loaded[0].get('device', '')}"
        else:
            detail = window.banner.text() or "timed out"
        if not check("model loads", loaded is not None, detail):
            window.close()
            return 1

        window.send("Write one sentence about the sea.")
        done = wait_for(c.answer_finished, timeout_s)
        ok = done is not None and bool(done[0].content.strip())
        check("an answer streams and completes", ok, repr(done[0].content[:60]) if done else "timed out")
        stats = window.last_stats()
        check(
            "meter shows decode tok/s",
            stats is not None and stats.decode_tok_per_s > 0,
            f"{stats.decode_tok_per_s:.1f} tok/s" if stats else "no stats",
        )

        c.settings.max_tokens = 200  # long enough that Stop, not the limit, ends it
        window.send("Count from one to one hundred in words.")
        first = wait_for(c.answer_text, timeout_s)
        if first is not None:
            c.stop()
        stopped = wait_for(c.answer_finished, timeout_s)
        check(
            "stop ends an answer",
            stopped is not None and stopped[1].stop_reason == "cancelled",
            stopped[1].stop_reason if stopped else "timed out",
        )

        cid = window.conversation_id
        window.close()
        store.close()
        reopened = ChatStore(data / "chats.sqlite3")
        msgs = reopened.messages(cid) if cid is not None else []
        check(
            "conversation survives a restart",
            len(msgs) == 4 and msgs[1].content.strip() != "",
            f"{len(msgs)} messages",
        )
        reopened.close()
    return 0 if all(ok for _, ok, _ in results) else 1
