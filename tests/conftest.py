"""Shared fixtures: the real default models, located through the model catalogue."""

from __future__ import annotations

import pytest


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
