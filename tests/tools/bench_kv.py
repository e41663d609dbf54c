"""KV cache quality table: perplexity for every K/V type pair x rotation x smoothing x K equalization.

Usage (from the repo root):
    .venv/bin/python -m tests.tools.bench_kv --models smollm2-135m qwen2.5-coder-0.5b --ctx 512
    .venv/bin/python -m tests.tools.bench_kv --pairs q4_0/f16 --equalize 0   # K-only rows, as in run 1
The model is loaded once per model; only the cache is rebuilt between runs. For each pair (K/V) every
combination of the three K switches is measured (with the cache's attention sinks, on for every
quantized cache), then the shipped defaults (engine.session's resolution of skip-WHT off,
k_smooth=auto, k_equalize=auto) are named in their own column, followed by two reference columns:
the defaults without attention sinks, and run 2's defaults (K-only equalization scales, no sinks,
docs/kv-quality-run.md) that run 3 replaced. Besides
perplexity, the JSON rows hold the mean KL divergence of each run's next-token distribution from the
f16 cache's (a steadier measure of the damage than the perplexity change, which a noisy run can move
either way). llama.cpp's own caches are measured on the same tokens when llama-cpp-python is installed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch

from engine.api import EngineConfig
from engine.cli import resolve_model
from engine.k_equalize import resolve_k_equalize
from engine.kv_cache import KVCache, resolve_k_smooth
from engine.session import Engine

TEXTS = Path(__file__).resolve().parents[1] / "fixtures" / "eval_text"


def all_logits(session, ids: list[int]) -> torch.Tensor:
    session.cached_ids = []
    return session.prefill(ids, 0, logits_for="all").float()  # (n, vocab)


def perplexity(session, ids: list[int]) -> float:
    return score(all_logits(session, ids), ids)[0]


def score(logits: torch.Tensor, ids: list[int], ref_logp: torch.Tensor | None = None) -> tuple[float, float]:
    """(perplexity, mean KL(ref || this) over the predicted positions; 0 without a reference)."""
    logp = torch.log_softmax(logits[:-1], -1)  # (n - 1, vocab)
    nll = -logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    kl = 0.0 if ref_logp is None else float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
    return math.exp(float(nll.mean())), kl


class KOnlyScalesCache(KVCache):
    """Run 2's equalization recipe for comparison: the scales from the first chunk's K alone."""

    def _store(self, layer, pos, k, v, q=None):
        super()._store(layer, pos, k, v)


def with_cache(
    session, kv_k: str, kv_v: str, rotate: bool, smooth: bool, equalize: bool = False,
    sink_tokens: int | None = None, cache_class: type[KVCache] = KVCache,
) -> None:
    c = session.model.config
    session.cache = cache_class(
        c.n_layers, c.n_kv_heads, c.head_dim, session.max_len, kv_k, kv_v,
        rotate_k=rotate, k_smooth=smooth, k_equalize=equalize, sink_tokens=sink_tokens,
    )


def llama_cpp_ppl(path: str, ids: list[int], type_k: int, type_v: int, threads: int | None) -> float | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=len(ids) + 8,
        n_batch=512,
        logits_all=True,
        n_threads=threads or 2,
        type_k=type_k,
        type_v=type_v,
        flash_attn=True,
        verbose=False,
    )
    llm.eval(ids)
    scores = torch.tensor(llm.scores[: len(ids)])  # (n, vocab)
    nll = -torch.log_softmax(scores[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return math.exp(float(nll.mean()))


GGML_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2, "q4_1": 3}


def cell_name(pair: str, rotate: bool, smooth: bool, equalize: bool) -> str:
    return f"{pair} rot={int(rotate)} smooth={int(smooth)} eq={int(equalize)}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--models",
        nargs="+",
        default=["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma-3-270m"],
    )
    parser.add_argument("--texts", nargs="+", default=["code", "prose"], choices=["code", "prose"])
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument(
        "--chunk", type=int, default=512,
        help="prefill chunk: the smoothing mean and equalization scales come from the first one",
    )
    parser.add_argument("--pairs", nargs="+", default=["q8_0/q8_0", "q4_0/q4_0"], help="K/V type pairs")
    parser.add_argument("--rotate", nargs="+", type=int, default=[0, 1], help="rotation values to measure")
    parser.add_argument("--smooth", nargs="+", type=int, default=[0, 1], help="smoothing values to measure")
    parser.add_argument("--equalize", nargs="+", type=int, default=[0, 1], help="K equalization values")
    parser.add_argument("--threads", type=int, help="CPU threads (ours and llama.cpp's); default: torch's")
    parser.add_argument("--no-llama", action="store_true", help="skip llama.cpp's runs")
    parser.add_argument("--json-out")
    parser.add_argument("--tables-from", help="only print the tables of a saved --json-out file")
    args = parser.parse_args()
    if args.tables_from:
        print_tables(json.loads(Path(args.tables_from).read_text()))
        return
    rows = []
    for key in args.models:
        path = resolve_model(key)
        session = Engine.load(EngineConfig(
            model=path, context_length=args.ctx + 8, prefill_chunk=args.chunk, threads=args.threads
        ))
        for text_name in args.texts:
            text = (TEXTS / ("code.py.txt" if text_name == "code" else "prose.txt")).read_text(
                encoding="utf-8"
            )
            ids = session.tokenizer.encode(text, add_bos=session.tokenizer.add_bos, parse_special=False)[
                : args.ctx
            ]
            started = time.perf_counter()
            with_cache(session, "f16", "f16", False, False)
            ref = all_logits(session, ids)
            ref_logp = torch.log_softmax(ref[:-1], -1)
            base = score(ref, ids)[0]
            row = {"model": key, "text": text_name, "n": len(ids), "chunk": args.chunk}
            row.update({"threads": args.threads, "f16": base, "kl": {}})
            for pair in args.pairs:
                kv_k, kv_v = pair.split("/")
                for rotate, smooth, equalize in itertools.product(args.rotate, args.smooth, args.equalize):
                    with_cache(session, kv_k, kv_v, bool(rotate), bool(smooth), bool(equalize))
                    name = cell_name(pair, rotate, smooth, equalize)
                    row[name], row["kl"][name] = score(all_logits(session, ids), ids, ref_logp)
                    print(f"  {key} {text_name} {name}: {row[name]:.4f} KL {row['kl'][name]:.4f}", flush=True)
                # the defaults a session resolves for this pair (rotation on: skip-WHT is off by default)
                default = cell_name(
                    pair, True, resolve_k_smooth("auto", kv_k), resolve_k_equalize("auto", kv_k)
                )
                if default not in row:
                    with_cache(session, kv_k, kv_v, True, resolve_k_smooth("auto", kv_k),
                               resolve_k_equalize("auto", kv_k))
                    row[default], row["kl"][default] = score(all_logits(session, ids), ids, ref_logp)
                row[f"default {pair}"] = row[default]
                row["kl"][f"default {pair}"] = row["kl"][default]
                smooth, equalize = resolve_k_smooth("auto", kv_k), resolve_k_equalize("auto", kv_k)
                for name, sinks, cache_class in (
                    (f"default {pair} no sinks", 0, KVCache),
                    (f"run 2 default {pair}", 0, KOnlyScalesCache),
                ):
                    with_cache(session, kv_k, kv_v, True, smooth, equalize, sinks, cache_class)
                    row[name], row["kl"][name] = score(all_logits(session, ids), ids, ref_logp)
                    print(f"  {key} {text_name} {name}: {row[name]:.4f} KL {row['kl'][name]:.4f}", flush=True)
            if not args.no_llama:
                row["llama.cpp f16"] = llama_cpp_ppl(path, ids, 1, 1, args.threads)
                for pair in args.pairs:
                    kv_k, kv_v = pair.split("/")
                    if kv_k in GGML_TYPES and kv_v in GGML_TYPES:
                        row[f"llama.cpp {pair}"] = llama_cpp_ppl(
                            path, ids, GGML_TYPES[kv_k], GGML_TYPES[kv_v], args.threads
                        )
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    print_tables(rows)


def _cell(row: dict, key: str) -> str:
    v = row.get(key)
    ref = row.get("llama.cpp f16") if key.startswith("llama.cpp") else row["f16"]
    if v is None:
        return "n/a"
    if key in ("f16", "llama.cpp f16") or not ref:
        return f"{v:.3f}"
    return f"{v:.3f} ({100 * (v / ref - 1):+.1f}%)"


def print_tables(rows: list[dict]) -> None:
    """Per K/V pair: perplexity (change against our f16; llama.cpp's against its own f16), then mean KL."""
    references = ("default", "run 2")
    pairs = list(dict.fromkeys(k.split(" ")[0] for k in rows[0]["kl"] if not k.startswith(references)))
    for pair in pairs:
        runs = [k for k in rows[0]["kl"] if k.startswith(pair + " ")] + [f"default {pair}"]
        runs += [k for k in (f"default {pair} no sinks", f"run 2 default {pair}") if k in rows[0]["kl"]]
        keys = ["f16", *runs, *(k for k in ("llama.cpp f16", f"llama.cpp {pair}") if k in rows[0])]
        print(f"\n{pair}: perplexity (change against f16)\n")
        print("| model | text | " + " | ".join(k.removeprefix(pair + " ") for k in keys) + " |")
        print("|---|---|" + "---|" * len(keys))
        for r in rows:
            print(f"| {r['model']} | {r['text']} | " + " | ".join(_cell(r, k) for k in keys) + " |")
        print(f"\n{pair}: mean KL divergence from the f16 cache's next-token distribution (nats/token)\n")
        print("| model | text | " + " | ".join(k.removeprefix(pair + " ") for k in runs) + " |")
        print("|---|---|" + "---|" * len(runs))
        for r in rows:
            print(f"| {r['model']} | {r['text']} | " + " | ".join(f"{r['kl'][k]:.4f}" for k in runs) + " |")


if __name__ == "__main__":
    main()
