"""What goes into the PyInstaller bundle and what stays out (used by tandem.spec; plain Python, tested).

The spec imports this file by path (packaging/ must not become a package: it would shadow the
`packaging` library that PyInstaller and pip import).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

# Python packages the app never imports at run time: test oracles, benchmarks, their dependency trees.
# torch's hook collects every torch submodule, and some of those import these optionally.
EXCLUDES = [
    "transformers",
    "accelerate",
    "llama_cpp",
    "huggingface_hub",
    "hf_xet",
    "pytest",
    "_pytest",
    "pytestqt",
    "tests",
    "pydantic",
    "pydantic_core",
    "rich",
    "typer",
    "click",
    "httpx",
    "httpx2",
    "httpcore2",
    "requests",
    "tkinter",
    "_tkinter",
    "PIL",
    "matplotlib",
    "IPython",
    "pandas",
    "scipy",
    "tensorboard",
    "torch.utils.tensorboard",
    "torchvision",
    "onnx",
    "onnxruntime",
    "ruff",
    "PyInstaller",
    "kernels.bench_kv_attention",
]

# Files of the collected packages that no user needs (destination paths inside the bundle).
DROP_PATTERNS = [
    "torch/test/*",  # C++ unit-test binaries (~80 MB)
    "torch/bin/test_*",
    "torch/bin/*Test",
    "torch/bin/protoc*",
    "torch/bin/*.pt",
    "torch/bin/*.ptl",
    "torch/bin/upgrader_models/*",
    "torch/include/*",
    "torch/share/*",
    "torch/lib/lib*test*.so*",
    "torch/lib/libbackend_with_compiler.so",
    "torch/lib/libaoti_custom_ops.so",
    "triton/include/*",
    "triton/FileCheck*",
    "*.pyi",
    "*.h",
    "*.hpp",
    "*.cuh",
    "*.cmake",
]

TRITON_GPU_BACKENDS = ("nvidia", "amd")


def triton_backends(mode: str, torch_cuda: str | None, torch_hip: str | None) -> set[str]:
    """Which Triton GPU backends keep their compilers and libraries (ptxas, libdevice, ROCm libs).

    mode "auto": the backends this torch build can feed with GPU tensors (CUDA -> nvidia,
    ROCm -> amd; a CPU torch -> none: Triton then only runs under TRITON_INTERPRET=1, which needs no
    backend binaries). "all": both. Otherwise a comma-separated list of names ("" = none).
    """
    if mode == "auto":
        return ({"nvidia"} if torch_cuda else set()) | ({"amd"} if torch_hip else set())
    if mode == "all":
        return set(TRITON_GPU_BACKENDS)
    wanted = {name.strip() for name in mode.split(",") if name.strip()}
    unknown = wanted - set(TRITON_GPU_BACKENDS)
    if unknown:
        raise ValueError(
            f"unknown Triton backend(s) {sorted(unknown)}; use auto, all, or of {TRITON_GPU_BACKENDS}"
        )
    return wanted


def keep(dest: str, backends: set[str]) -> bool:
    """Whether the file that lands at `dest` (a path inside the bundle, '/'-separated) is kept.

    Python sources and the small driver files of every Triton backend stay (triton imports them when
    it lists its backends); the big per-backend folders (bin/, lib/, include/) only for `backends`.
    """
    dest = dest.replace("\\", "/")
    parts = dest.split("/")
    if parts[:2] == ["triton", "backends"] and len(parts) > 4 and parts[2] in TRITON_GPU_BACKENDS:
        # a kept backend keeps everything: its driver is compiled against these headers at run time
        return parts[3] not in ("bin", "lib", "include") or parts[2] in backends
    return not any(fnmatch.fnmatch(dest, pattern) for pattern in DROP_PATTERNS)


def kernel_modules(root: Path) -> list[str]:
    """Our Triton kernel modules (kernels/*.py, benchmarks aside), for hiddenimports.

    The engine imports them lazily (CUDA only), so PyInstaller's import scan would not see them.
    """
    names = sorted(p.stem for p in (root / "kernels").glob("*.py") if p.stem != "__init__")
    return ["kernels"] + [f"kernels.{name}" for name in names if not name.startswith("bench")]
