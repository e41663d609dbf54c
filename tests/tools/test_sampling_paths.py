"""tests/tools/sampling_paths.py: each mode runs `engine bench --temp` on a tiny model (CPU) and takes the
path it names."""

from __future__ import annotations

import json

import pytest
import torch

from engine.api import SamplingParams
from engine.sampling import Sampler
from tests.tools import sampling_paths


@pytest.fixture
def restore_sampler(monkeypatch):
    monkeypatch.setattr(Sampler, "graph_params", Sampler.graph_params)
    monkeypatch.setattr(Sampler, "draw", Sampler.draw)


@pytest.mark.parametrize("mode,graph_params,multinomial", [
    ("multinomial", False, True), ("host", False, False), ("graph", True, False),
])
def test_modes(mode, graph_params, multinomial, tmp_path, capsys, monkeypatch, restore_sampler):
    from tests.engine.tiny_models import write_tiny_model

    path = write_tiny_model(tmp_path / "m.gguf", "llama", seed=3, quantized=True)
    calls = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: calls.append(1) or real(*a, **k))
    argv = [mode, "--", "--model", str(path), "--device", "cpu", "--n-prompt", "8", "--n-gen", "3",
            "--repeats", "1", "--ctx", "32", "--temp", "0.8", "--json"]
    assert sampling_paths.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["decode_tok_per_s"] > 0
    params = Sampler(SamplingParams(temperature=0.8)).graph_params
    assert (params is not None) == graph_params and bool(calls) == multinomial


def test_unknown_mode_is_refused(restore_sampler):
    with pytest.raises(SystemExit):
        sampling_paths.patch("fast")
