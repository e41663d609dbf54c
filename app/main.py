"""Entry point: `tandem` / `python -m app` (options: --self-test, --data-dir, --model, --theme)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

_T0 = time.perf_counter()
log = logging.getLogger(__name__)

ORGANIZATION = "tandem"
APPLICATION = "Tandem"


def default_data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("tandem", "tandem"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tandem", description="Desktop chat for local LLMs.")
    p.add_argument("--data-dir", type=Path, help="keep chats and settings here instead of the user data dir")
    p.add_argument("--model", help="target GGUF for this run (default: the last used, or the default model)")
    p.add_argument("--draft", help="'none', 'ngram', or a draft GGUF for this run")
    p.add_argument("--theme", choices=("system", "light", "dark"), help="colour theme for this run")
    p.add_argument("--self-test", action="store_true", help="run a scripted session offscreen; exit 0 or 1")
    p.add_argument(
        "--startup-probe", action="store_true", help=argparse.SUPPRESS
    )  # print time-to-window, quit
    p.add_argument("--verbose", "-v", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.self_test:
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    from PySide6.QtCore import QSettings, QTimer
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)

    if args.self_test:
        from app.self_test import run_self_test

        return run_self_test(args.model)

    from app.main_window import MainWindow
    from app.storage import ChatStore

    data_dir = args.data_dir or default_data_dir()
    store = ChatStore(data_dir / "chats.sqlite3")
    settings = (
        QSettings(str(data_dir / "settings.ini"), QSettings.IniFormat) if args.data_dir else QSettings()
    )
    window = MainWindow(store, settings, autoload=False)
    s = window.engine_settings
    if args.model:
        s.model_path = str(Path(args.model).expanduser().resolve())
    if args.draft:
        if args.draft in ("none", "ngram"):
            s.draft_mode, s.draft_path = args.draft, ""
        else:
            s.draft_mode, s.draft_path = "draft-model", str(Path(args.draft).expanduser().resolve())
    if args.model or args.draft:
        window.settings_panel.set_settings(s)
    if args.theme:
        window.set_theme(args.theme)
    window.show()
    log.info("window shown %.3f s after start", time.perf_counter() - _T0)
    if args.startup_probe:
        print(f"TANDEM_WINDOW_SHOWN {time.perf_counter() - _T0:.3f}", flush=True)
        QTimer.singleShot(0, window.close)
    else:
        QTimer.singleShot(0, lambda: window.controller.load(s))
    code = app.exec()
    if window.controller.thread.isRunning():
        log.warning("the engine thread is still busy; exiting without waiting for it")
        store.close()
        logging.shutdown()
        os._exit(code)
    store.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
