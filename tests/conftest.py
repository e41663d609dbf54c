"""Shared fixtures: the real default models, located through the model catalogue."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _row_independent_interpreter_dot():
    """Under the Triton interpreter, tl.dot with the mma's row independence (tests/interpreter_dot.py).
    Test modules set TRITON_INTERPRET before importing triton, at collection; this runs after it."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from tests import interpreter_dot

        interpreter_dot.install()


def _real_model(key: str):
    from engine.errors import TandemError
    from engine.model_catalog import locate

    try:
        return locate(key)
    except TandemError as exc:  # not installed on this machine: the setup command installs them
        pytest.skip(f"model {key} not available: {exc}")


@pytest.fixture(scope="session")
def smollm2_path():
    return _real_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path():
    return _real_model("gemma-3-270m")


@pytest.fixture(scope="session")
def qwen_05b_path():
    return _real_model("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def qwen_15b_path():
    return _real_model("qwen2.5-coder-1.5b")
