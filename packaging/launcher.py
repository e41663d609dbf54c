"""Entry point of the packaged app (PyInstaller runs this file as `tandem`).

    tandem [app options]          the desktop app (app.main: --self-test, --data-dir, --model, ...)
    tandem engine COMMAND ...     the engine command line (`python -m engine` in a source checkout)
    tandem --bundle-check         checks that the bundle carries what it must (the smoke test runs it)

The installed app has no Python of its own to run `-m`, hence the `engine` word.
"""

from __future__ import annotations

import os
import sys


def bundle_check() -> int:
    """The bundle carries what it must: the model catalogue and style sheets, and (where Triton is part
    of the build: Linux) our Triton kernels as real source files that run (interpreter, tiny shapes)."""
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is first imported
    import importlib
    import importlib.util
    import pkgutil
    from pathlib import Path

    failures = 0

    def check(name: str, ok: bool, detail: str = "") -> None:
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)

    from app.theme import RESOURCES
    from engine.model_catalog import catalog

    sheets = sorted(p.name for p in RESOURCES.glob("*.qss"))
    check("style sheets bundled", len(sheets) >= 2, ", ".join(sheets))
    check("model catalogue bundled", len(catalog()) > 0, ", ".join(e.key for e in catalog()))
    if importlib.util.find_spec("triton") is None:
        print("SKIP Triton kernels: triton is not part of this build (it is Linux-only)", flush=True)
        return 1 if failures else 0

    import kernels

    names = [m.name for m in pkgutil.iter_modules(kernels.__path__) if not m.name.startswith("bench")]
    check("kernel modules found", bool(names), ", ".join(names))
    for name in names:
        try:
            module = importlib.import_module(f"kernels.{name}")
            source = Path(module.__file__ or "")
            from_source = source.suffix == ".py" and source.is_file()
            check(f"kernels.{name} imports from source", from_source, str(source))
        except Exception as exc:  # noqa: BLE001 - reported as a failed check
            check(f"kernels.{name} imports from source", False, repr(exc))

    import torch

    from engine import kv_quant
    from kernels.v_write import v_write, v_write_reference

    v = torch.randn(1, 2, 5, 64, generator=torch.Generator().manual_seed(0)) * 3.0  # (B, H, T, D)
    got = kv_quant.allocate("q8_0", (1, 2, 8), 64)
    want = kv_quant.allocate("q8_0", (1, 2, 8), 64)
    try:
        v_write(v, got, 1)  # the Triton kernel, interpreted on the CPU
        v_write_reference(v, want, 1)
        same = torch.equal(got.qs, want.qs) and torch.equal(got.d, want.d)
        check("Triton v_write (interpreter) equals its torch reference", same, "q8_0, 1x2x5x64")
    except Exception as exc:  # noqa: BLE001
        check("Triton v_write (interpreter) equals its torch reference", False, repr(exc))
    return 1 if failures else 0


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["engine"]:
        from engine.cli import main as engine_main

        sys.argv = ["tandem engine", *argv[1:]]
        return engine_main(argv[1:])
    if argv == ["--bundle-check"]:
        return bundle_check()
    from app.main import main as app_main

    return app_main(argv)


if __name__ == "__main__":
    sys.exit(main())
