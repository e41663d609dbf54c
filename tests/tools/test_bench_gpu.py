"""CPU checks of the GPU benchmark tool (tests/tools/bench_gpu.py): config, parsing, projection, report.

The GPU run itself happens on the lent machine; these check the parts that can be wrong on any machine.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from engine import random_gguf
from tests.engine.tiny_models import write_tiny_model
from tests.tools import bench_gpu


def tiny_layout(tmp_path, arch="qwen2", tied=False) -> random_gguf.HeaderLayout:
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = write_tiny_model(tmp_path / "tiny.gguf", arch, quantized=True, tied=tied)
    return random_gguf.write_header_file(source, tmp_path / "tiny.header.gguf")


def n_params(layout: random_gguf.HeaderLayout) -> int:
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(bench_gpu.hf_config(layout))
    return sum(p.numel() for p in model.parameters())


def n_elements(layout: random_gguf.HeaderLayout) -> int:
    return sum(
        int(torch.tensor(t.shape).prod()) for t in layout.tensors if not t.name.startswith("rope_freqs")
    )


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_transformers_config_has_exactly_the_gguf_parameters(tmp_path, tied):
    layout = tiny_layout(tmp_path, tied=tied)
    assert n_params(layout) == n_elements(layout)


def test_transformers_config_of_the_real_qwen_header(qwen_15b_path):
    layout = random_gguf.parse_header(random_gguf.read_header_bytes(qwen_15b_path))
    assert n_params(layout) == n_elements(layout)  # 1.54e9 with the tied embedding once


def test_weight_bytes_per_token_counts_one_embedding_row_when_untied(tmp_path):
    untied = tiny_layout(tmp_path / "u", tied=False)
    embd = next(t for t in untied.tensors if t.name == "token_embd.weight")
    everything = sum(t.n_bytes for t in untied.tensors)
    one_row = embd.n_bytes // embd.shape[0]
    assert bench_gpu.weight_bytes_per_token(untied) == everything - embd.n_bytes + one_row
    tied = tiny_layout(tmp_path / "t", tied=True)  # the embedding is the output matrix: read whole
    assert bench_gpu.weight_bytes_per_token(tied) == sum(t.n_bytes for t in tied.tensors)


def test_parse_acceptance():
    assert bench_gpu.parse_acceptance("draft-model code=5.29@7+draft") == {
        "name": "draft-model code",
        "length": 5.29,
        "rows": 7,
        "draft_model": True,
    }
    assert bench_gpu.parse_acceptance("ngram=5.76@9")["draft_model"] is False
    with pytest.raises(argparse.ArgumentTypeError):
        bench_gpu.parse_acceptance("ngram 5.76")


def fake_results() -> dict:
    """llama-bench JSON rows as the tool reads them, and an engine result per the documented contract."""

    def test(n_prompt, n_gen, depth, ts):
        return {"n_prompt": n_prompt, "n_gen": n_gen, "n_depth": depth, "avg_ts": ts, "stddev_ts": 1.0}

    llama_f16 = [test(1, 0, 0, 500.0), test(16, 0, 0, 4000.0), test(2048, 0, 0, 27000.0)]
    llama_f16 += [test(2048, 0, 0, 20000.0)]  # the -ub 2048 run, slower here: the table takes the faster
    llama_f16 += [test(0, 128, 0, 500.0), test(0, 128, 4096, 450.0)]
    llama_q4 = [test(0, 128, 4096, 400.0)]
    engine = {
        "caches": {
            "f16/f16": {
                "decode_tok_s": 1000.0,
                "prefill_tok_s": 27000.0,
                "verify_ms": {"1": 1.0, "4": 1.05, "8": 1.1, "16": 1.2, "7": 1.08},
                "verify_gpu_ms": {"1": 0.9, "4": 0.95, "8": 1.0, "16": 1.17},
            },
            "q4_0/q4_0": {"decode_depth_tok_s": 800.0},
        }
    }
    return {"llama_bench": {"tests": {"f16": llama_f16, "q4_0": llama_q4}}, "ours": engine}


def test_table_ratios_and_projection():
    args = argparse.Namespace(n_prompt=2048, n_gen=128, depth=4096)
    res = fake_results()
    res["transformers"] = {"eager_decode_tok_s": 50.0}
    table = {row["metric"]: row for row in bench_gpu.build_table(res, args)}
    assert table["decode tg128 f16/f16"]["ours/llama"] == pytest.approx(2.0)
    assert table["decode tg128 f16/f16"]["ours/hf"] == pytest.approx(20.0)
    assert table["decode tg128 @4096 q4_0/q4_0"]["ours/llama"] == pytest.approx(2.0)
    assert table["prefill pp2048 f16/f16"]["ours/llama"] == pytest.approx(1.0)
    assert table["prefill pp2048 q4_0/q4_0"]["ours/llama"] is None  # not measured: no ratio

    verify = {(r["cache"], r["depth"], r["rows"]): r for r in bench_gpu.verify_table(res, 4096)}
    assert verify[("f16/f16", 0, 16)]["ours_x_step"] == pytest.approx(1.2)
    assert verify[("f16/f16", 0, 16)]["ours_gpu_x_step"] == pytest.approx(1.3)  # GPU time: 1.17 / 0.9
    assert verify[("f16/f16", 4096, 16)]["ours_gpu_x_step"] is None
    # llama.cpp: pp16 at 4000 tok/s = 4 ms, pp1 at 500 tok/s = 2 ms -> 2x one step
    assert verify[("f16/f16", 0, 16)]["llama_x_step"] == pytest.approx(2.0)
    assert verify[("f16/f16", 4096, 16)]["ours_x_step"] is None  # not measured at depth here

    specs = [bench_gpu.parse_acceptance("ngram=5.5@16"), bench_gpu.parse_acceptance("dm=5.29@7+draft")]
    draft = {"caches": {"f16/f16": {"verify_ms": {"1": 0.5}}}}
    proj = bench_gpu.project_speculative(specs, res["ours"], draft, llama_decode=500.0)
    assert proj[0]["tok_s"] == pytest.approx(5.5 / 1.2e-3)
    assert proj[0]["vs_llama_decode"] == pytest.approx(5.5 / 1.2e-3 / 500)
    assert proj[1]["draft_ms"] == pytest.approx(3.0)  # 6 draft steps of 0.5 ms
    assert proj[1]["tok_s"] == pytest.approx(5.29 / (1.08 + 3.0) * 1000)
    no_draft = bench_gpu.project_speculative(specs[1:], res["ours"], {}, llama_decode=500.0)
    assert "tok_s" not in no_draft[0] and "draft-header" in no_draft[0]["note"]


def test_transformers_section_runs_on_cpu(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(bench_gpu, "DEVICE", "cpu")
    layout = tiny_layout(tmp_path)
    args = argparse.Namespace(
        n_prompt=16, n_gen=4, depth=8, hf_compile="off", hf_compile_min_s=0, deadline_s=1e9
    )
    waited = []
    out = bench_gpu.run_transformers(layout, args, lambda: waited.append(True))
    assert waited == [True]
    for key in ("prefill_tok_s", "eager_decode_tok_s", "eager_decode_depth_tok_s"):
        assert out[key] > 0
    assert out["compiled"].startswith("skipped")


def test_saved_llama_bench_parts_unpack_to_the_same_binary(tmp_path, monkeypatch):
    binary = tmp_path / "llama-bench"
    binary.write_bytes(
        bytes(range(256)) * 4096 + torch.randint(0, 256, (300_000,)).to(torch.uint8).numpy().tobytes()
    )
    carried = tmp_path / "bench"
    names = bench_gpu.save_binary(binary, carried, part_bytes=100_000)
    assert len(names) > 1 and all((carried / n).stat().st_size <= 100_000 for n in names)
    monkeypatch.setattr(bench_gpu, "BENCH_DIR", carried)
    args = argparse.Namespace(llama_bench=None, work_dir=str(tmp_path / "work"))
    (tmp_path / "work").mkdir()
    found = bench_gpu.find_llama_bench(args)
    assert found.read_bytes() == binary.read_bytes()


def test_our_engine_results_are_read_from_gpu_bench_measure(monkeypatch):
    """run_our_engine calls engine.gpu_bench.measure per cache type and depth and maps its keys."""
    import sys
    import types

    calls = []

    def measure(path, ctk, ctv, n_prompt, n_gen, depth, verify_sizes):
        calls.append((ctk, ctv, n_prompt, depth, verify_sizes))
        scale = 2.0 if depth else 1.0
        return {
            "prefill_tok_per_s": 30000.0 if n_prompt else None,
            "decode_tok_per_s": 1000.0 / scale,
            "verify_ms": {r: scale * (1 + r / 100) for r in verify_sizes},
            "verify_gpu_ms": {r: scale * (0.9 + r / 100) for r in verify_sizes},
        }

    monkeypatch.setitem(sys.modules, "engine.gpu_bench", types.SimpleNamespace(measure=measure))
    import engine

    monkeypatch.setattr(engine, "gpu_bench", sys.modules["engine.gpu_bench"], raising=False)
    args = argparse.Namespace(n_prompt=2048, n_gen=128, depth=4096)
    res = bench_gpu.run_our_engine("m.gguf", args, (1, 4, 7, 8, 16))
    assert calls == [
        ("f16", "f16", 2048, 0, (1, 4, 7, 8, 16)),
        ("f16", "f16", 0, 4096, (1, 4, 7, 8, 16)),
        ("q4_0", "q4_0", 2048, 0, (1, 4, 7, 8, 16)),
        ("q4_0", "q4_0", 0, 4096, (1, 4, 7, 8, 16)),
    ]
    f16 = res["caches"]["f16/f16"]
    assert (f16["prefill_tok_s"], f16["decode_tok_s"], f16["decode_depth_tok_s"]) == (30000.0, 1000.0, 500.0)
    assert bench_gpu.our_verify_ms(res, "q4_0", 16) == pytest.approx(1.16)
    assert bench_gpu.our_verify_ms(res, "q4_0", 16, "verify_depth_ms") == pytest.approx(2.32)
    assert bench_gpu.our_verify_ms(res, "q4_0", 16, "verify_depth_gpu_ms") == pytest.approx(2.12)
