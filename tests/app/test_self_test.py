"""`python -m app --self-test` runs a scripted session offscreen and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_self_test_passes():
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"}  # it must pick offscreen itself
    r = subprocess.run(
        [sys.executable, "-m", "app", "--self-test"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert len(lines) == 6 and all(ln.startswith("PASS") for ln in lines), lines


def test_self_test_fails_with_exit_1_for_a_broken_model(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"definitely not a GGUF file")
    r = subprocess.run(
        [sys.executable, "-m", "app", "--self-test", "--model", str(broken)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "FAIL model loads" in r.stdout
