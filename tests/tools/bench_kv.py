"""KV cache quality table: perplexity for every K type x rotation x smoothing, per model and text.

Usage (from the repo root):
    .venv/bin/python -m tests.tools.bench_kv --models smollm2-135m qwen2.5-coder-0.5b --ctx 512
The model is loaded once per model; only the cache is rebuilt between runs. V stays f16 in the
K-only rows (the quantity the rotation/smoothing switches act on), then the shipped defaults are
measured for whole K/V pairs. llama.cpp's own q4_0/q4_0 cache is measured on the same tokens when
llama-cpp-python is installed.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from engine.api import EngineConfig
from engine.cli import resolve_model
from engine.kv_cache import KVCache, resolve_k_smooth
from engine.session import Engine

TEXTS = Path(__file__).resolve().parents[1] / "fixtures" / "eval_text"


def perplexity(session, ids: list[int]) -> float:
    session.cached_ids = []
    logits = session.prefill(ids, 0, logits_for="all").float()  # (n, vocab)
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return math.exp(float(nll.mean()))


def with_cache(session, kv_k: str, kv_v: str, rotate: bool, smooth: bool) -> None:
    c = session.model.config
    session.cache = KVCache(
        c.n_layers, c.n_kv_heads, c.head_dim, session.max_len, kv_k, kv_v, rotate_k=rotate, k_smooth=smooth
    )


def llama_cpp_ppl(path: str, ids: list[int], type_k: int, type_v: int) -> float | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=len(ids) + 8,
        n_batch=512,
        logits_all=True,
        n_threads=2,
        type_k=type_k,
        type_v=type_v,
        flash_attn=True,
        verbose=False,
    )
    llm.eval(ids)
    scores = torch.tensor(llm.scores[: len(ids)])  # (n, vocab)
    nll = -torch.log_softmax(scores[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return math.exp(float(nll.mean()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--models",
        nargs="+",
        default=["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma-3-270m"],
    )
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--k-types", nargs="+", default=["q8_0", "q4_0"])
    parser.add_argument("--json-out")
    args = parser.parse_args()
    rows = []
    for key in args.models:
        path = resolve_model(key)
        session = Engine.load(EngineConfig(model=path, context_length=args.ctx + 8))
        for text_name in ("code", "prose"):
            text = (TEXTS / ("code.py.txt" if text_name == "code" else "prose.txt")).read_text(
                encoding="utf-8"
            )
            ids = session.tokenizer.encode(text, add_bos=session.tokenizer.add_bos, parse_special=False)[
                : args.ctx
            ]
            started = time.perf_counter()
            with_cache(session, "f16", "f16", False, False)
            base = perplexity(session, ids)
            row = {"model": key, "text": text_name, "n": len(ids), "f16": base}
            for k_type in args.k_types:
                for rotate in (False, True):
                    for smooth in (False, True):
                        with_cache(session, k_type, "f16", rotate, smooth)
                        row[f"{k_type} rot={int(rotate)} smooth={int(smooth)}"] = perplexity(session, ids)
            for kv_k, kv_v in (("q8_0", "q8_0"), ("q4_0", "q4_0")):
                with_cache(session, kv_k, kv_v, True, resolve_k_smooth("auto", kv_k))
                row[f"default {kv_k}/{kv_v}"] = perplexity(session, ids)
            q8, q4 = 8, 2  # GGML type ids
            row["llama.cpp f16"] = llama_cpp_ppl(path, ids, 1, 1)
            row["llama.cpp q8_0/q8_0"] = llama_cpp_ppl(path, ids, q8, q8)
            row["llama.cpp q4_0/q4_0"] = llama_cpp_ppl(path, ids, q4, q4)
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    keys = [k for k in rows[0] if k not in ("model", "text", "n", "seconds")]
    print("\n| model | text | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in rows:
        cells = []
        for k in keys:
            v = r[k]
            cells.append(
                "n/a"
                if v is None
                else f"{v:.3f}"
                if k in ("f16", "llama.cpp f16")
                else f"{v:.3f} ({100 * (v / r['f16'] - 1):+.1f}%)"
            )
        print(f"| {r['model']} | {r['text']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
