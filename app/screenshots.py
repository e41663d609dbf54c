"""Take the README screenshots: `xvfb-run -s "-screen 0 1400x900x24" python -m app.screenshots`.

Runs a real session (the small test model unless --model is given) in a throw-away data
dir, waits for the answer, then grabs the main window in the light and the dark theme.
The figures in the meter are whatever this machine measured.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PROMPT = "Write a Python function that checks whether a string is a palindrome, with a short explanation."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", help="target GGUF (default: the SmolLM2 test model)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from app.engine_settings import EngineSettings
    from app.main_window import MainWindow
    from app.self_test import wait_any, wait_for
    from app.storage import ChatStore

    app = QApplication(sys.argv[:1])
    app.setOrganizationName("tandem")
    app.setApplicationName("Tandem")
    model = args.model
    if model is None:
        from engine.model_catalog import locate

        model = str(locate("smollm2-135m"))
    with tempfile.TemporaryDirectory() as tmp:
        store = ChatStore(Path(tmp) / "chats.sqlite3")
        for title in ("Rust lifetimes, explained", "SQL window functions", "Bash: rename files by date"):
            c = store.create_conversation(title)
            store.add_message(c.id, "user", title)
        w = MainWindow(store, QSettings(str(Path(tmp) / "s.ini"), QSettings.IniFormat), autoload=False)
        w.resize(1400, 860)
        w.show()
        settings = EngineSettings(
            model_path=model, draft_mode="none", max_tokens=args.max_tokens, context_length=2048
        )
        w.settings_panel.set_settings(settings)
        w.controller.load(settings)
        hit = wait_any([w.controller.model_ready, w.controller.load_failed], args.timeout)
        if hit is None or hit[0] != 0:
            log.error("the model did not load: %s", w.banner.text())
            return 1
        w.new_conversation()
        w.system_prompt.setText("You are a concise coding assistant.")
        w.send(PROMPT)
        if wait_for(w.controller.answer_finished, args.timeout) is None:
            log.error("no answer in time")
            return 1
        args.out.mkdir(parents=True, exist_ok=True)
        for theme in ("light", "dark"):
            w.set_theme(theme)
            wait_any([], 0.5)  # let the re-rendered messages get their widths and heights
            path = args.out / f"screenshot-{theme}.png"
            w.grab().save(str(path))
            log.info("saved %s", path)
        w.close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
