"""packaging/bundle_rules.py: which files the PyInstaller bundle keeps (loaded by path, as the spec does)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("tandem_bundle_rules", ROOT / "packaging" / "bundle_rules.py")
rules = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rules)


def test_auto_backends_follow_the_torch_build():
    assert rules.triton_backends("auto", None, None) == set()  # CPU torch: interpreter only
    assert rules.triton_backends("auto", "12.8", None) == {"nvidia"}
    assert rules.triton_backends("auto", None, "6.4") == {"amd"}
    assert rules.triton_backends("all", None, None) == {"nvidia", "amd"}
    assert rules.triton_backends(" nvidia ,", None, None) == {"nvidia"}
    assert rules.triton_backends("", "12.8", None) == set()
    with pytest.raises(ValueError, match="cuda"):
        rules.triton_backends("cuda", None, None)


@pytest.mark.parametrize(
    ("dest", "backends", "kept"),
    [
        ("torch/lib/libtorch_cpu.so", set(), True),
        ("torch/lib/libgomp.so.1", set(), True),
        ("torch/test/Dict_test", set(), False),
        ("torch/bin/test_api", set(), False),
        ("torch/bin/torch_shm_manager", set(), True),
        ("torch/lib/libtorchbind_test.so", set(), False),
        ("torch/include/ATen/ATen.h", set(), False),
        ("triton/_C/libtriton.so", set(), True),
        ("triton/language/core.py", set(), True),
        ("triton/backends/nvidia/driver.py", set(), True),  # triton imports it to list backends
        ("triton/backends/nvidia/bin/ptxas", set(), False),
        ("triton/backends/nvidia/bin/ptxas", {"nvidia"}, True),
        ("triton/backends/nvidia/include/cuda.h", {"nvidia"}, True),  # driver.c is built against it
        ("triton/backends/nvidia/lib/libdevice.10.bc", {"amd"}, False),
        ("triton/backends/amd/lib/ockl.bc", {"amd"}, True),
        ("kernels/v_write.py", set(), True),
        ("PySide6/QtCore.pyi", set(), False),
        ("resources\\models.json", set(), True),
    ],
)
def test_keep(dest, backends, kept):
    assert rules.keep(dest, backends) is kept


def test_kernel_modules_lists_every_kernel_but_benchmarks():
    names = rules.kernel_modules(ROOT)
    on_disk = {p.stem for p in (ROOT / "kernels").glob("*.py")} - {"__init__"}
    assert names[0] == "kernels"
    assert {"kernels.v_write", "kernels.k_write", "kernels.decode_attention"} <= set(names)
    assert {n.split(".")[1] for n in names[1:]} == {n for n in on_disk if not n.startswith("bench")}
