"""`python -m engine` subcommands and their --json shapes (DESIGN.md), on a tiny random model."""

from __future__ import annotations

import json
import math

import pytest

from engine.cli import main
from tests.engine.tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(write_tiny_model(tmp_path_factory.mktemp("cli") / "llama.gguf", "llama", seed=4))


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_tokenize_json_has_ids_without_bos(capsys, tiny_path):
    out = run_json(capsys, ["tokenize", "--model", tiny_path, "--text", "hi!", "--json"])
    assert out == {"ids": [104, 105, 33]}
    out = run_json(capsys, ["tokenize", "--model", tiny_path, "--text", "hi", "--bos", "--json"])
    assert out == {"ids": [256, 104, 105]}


def test_generate_json_shape_and_stats(capsys, tiny_path):
    out = run_json(
        capsys,
        [
            "generate",
            "--model",
            tiny_path,
            "--prompt",
            "hello",
            "--max-tokens",
            "5",
            "--ctx",
            "128",
            "--json",
        ],
    )
    assert set(out) >= {"text", "token_ids", "stats"}
    assert out["stats"]["new_tokens"] == len(out["token_ids"]) <= 5
    assert out["stats"]["prompt_tokens"] > 0 and out["stats"]["kv_bytes"] > 0


def test_perplexity_json_matches_its_own_nll(capsys, tiny_path, tmp_path):
    ids = list(range(40, 72))
    tokens_file = tmp_path / "ids.json"
    tokens_file.write_text(json.dumps(ids))
    out = run_json(
        capsys,
        ["perplexity", "--model", tiny_path, "--tokens-file", str(tokens_file), "--ctx", "20", "--json"],
    )
    assert out["n_tokens"] == 20 and len(out["nll"]) == 19 and len(out["argmax"]) == 20
    assert out["ppl"] == pytest.approx(math.exp(sum(out["nll"]) / 19))


def test_bench_json_reports_throughput(capsys, tiny_path):
    out = run_json(
        capsys,
        [
            "bench",
            "--model",
            tiny_path,
            "--n-prompt",
            "16",
            "--n-gen",
            "4",
            "--repeats",
            "1",
            "--ctx",
            "64",
            "--json",
        ],
    )
    assert out["prefill_tok_per_s"] > 0 and out["decode_tok_per_s"] > 0


def test_bench_samples_with_temp(capsys, tiny_path, monkeypatch):
    """--temp > 0 decodes by sampling, as Session.generate does: one number of the sampler's stream per
    token (drawn on the host, or on a GPU inside the step)."""
    from engine.sampling import Sampler

    draws = []
    real_uniform = Sampler.uniform
    monkeypatch.setattr(Sampler, "uniform", lambda self: draws.append(1) or real_uniform(self))
    argv = ["bench", "--model", tiny_path, "--n-prompt", "16", "--n-gen", "4", "--repeats", "1"]
    argv += ["--ctx", "64"]
    out = run_json(capsys, [*argv, "--temp", "0.8", "--top-p", "0.9", "--seed", "3", "--json"])
    assert out["decode_tok_per_s"] > 0 and out["temperature"] == 0.8 and len(draws) == 4
    run_json(capsys, [*argv, "--json"])
    assert len(draws) == 4  # greedy: no draw


def test_bad_model_path_is_a_message_not_a_traceback(capsys, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5)
    assert main(["generate", "--model", str(bad), "--prompt", "x"]) == 2
    assert "error:" in capsys.readouterr().err


def test_needle_document_holds_every_needle_in_depth_order(tiny_path):
    from engine.gguf_file import GGUFModelFile
    from engine.needle import build_document, make_needles
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(GGUFModelFile.open(tiny_path))
    needles = make_needles(5, seed=1)
    doc = build_document(tokenizer, needles, 3000)
    positions = [doc.index(n.passphrase) for n in needles]
    assert positions == sorted(positions)
    assert 2500 < len(tokenizer.encode(doc)) <= 3000 + 5 * 2


def test_perplexity_honours_k_equalize(capsys, tiny_path, tmp_path):
    tokens_file = tmp_path / "ids.json"
    tokens_file.write_text(json.dumps(list(range(40, 72))))
    base = ["perplexity", "--model", tiny_path, "--tokens-file", str(tokens_file), "--ctx", "32", "--json"]
    out = {
        (k_type, mode): run_json(capsys, base + ["--ctk", k_type, "--k-equalize", mode])
        for k_type in ("f16", "q4_0")
        for mode in ("on", "off", "auto")
    }
    assert [out[k, m]["k_equalize"] for k in ("f16", "q4_0") for m in ("on", "off", "auto")] == [
        True, False, False, True, False, True
    ]
    # exact on an f16 K cache (power-of-two scales)
    assert out["f16", "on"]["nll"] == out["f16", "off"]["nll"]
    assert main(base + ["--k-equalize", "maybe"]) != 0
    assert "K equalization 'maybe' is unknown" in capsys.readouterr().err
