"""How much of a q4_0/q4_0 perplexity change is the luck of the rotation: K recipes over several rotation
seeds, per model and text.

    .venv/bin/python -m tests.tools.bench_kv_seeds smollm2-135m gemma-3-270m
    .venv/bin/python -m tests.tools.bench_kv_seeds smollm2-135m --chunk 32   # statistics of 32 tokens

The seed changes only the rotation's +-1 sign vectors; any of them is an equally valid rotation, so the
spread of the perplexity change over seeds is the noise floor of a 512-token measurement. The first
seed is the shipped one (engine.hadamard.ROTATION_SEED). Recipes (rotation and smoothing on in all):
  rot+smooth  no equalization, no attention sinks (run 1)
  run2        K-only equalization scales, no sinks (run 2's default)
  default     the cache's defaults: equalization scales from K and Q, attention sinks in f16 (run 3)
--chunk sets the prefill chunk, so the smoothing mean and the scales come from that many first tokens
and the rest of the text is scored with statistics it did not contribute to.
"""

from __future__ import annotations

import argparse

import torch

from engine.api import EngineConfig
from engine.cli import resolve_model
from engine.hadamard import ROTATION_SEED, make_rotation
from engine.kv_cache import KVCache
from engine.session import Engine
from tests.tools.bench_kv import TEXTS, KOnlyScalesCache, all_logits, score

SEEDS = [ROTATION_SEED, 1, 2, 3, 4, 5]
RECIPES = {  # name: (cache class, k_equalize, sink_tokens)
    "rot+smooth": (KVCache, False, 0),
    "run2": (KOnlyScalesCache, True, 0),
    "default": (KVCache, True, None),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--pair", default="q4_0/q4_0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk (the statistics' sample)")
    parser.add_argument("--recipes", nargs="+", default=["run2", "default"], choices=list(RECIPES))
    parser.add_argument("--texts", nargs="+", default=["code", "prose"], choices=["code", "prose"])
    args = parser.parse_args()
    kv_k, kv_v = args.pair.split("/")
    for key in args.models:
        config = EngineConfig(
            model=resolve_model(key), context_length=520, threads=args.threads, prefill_chunk=args.chunk
        )
        session = Engine.load(config)
        c = session.model.config
        for text_name in args.texts:
            name = "code.py.txt" if text_name == "code" else "prose.txt"
            text = (TEXTS / name).read_text(encoding="utf-8")
            ids = session.tokenizer.encode(text, add_bos=session.tokenizer.add_bos, parse_special=False)[:512]
            session.cache = KVCache(c.n_layers, c.n_kv_heads, c.head_dim, session.max_len, "f16", "f16")
            ref = all_logits(session, ids)
            ref_logp = torch.log_softmax(ref[:-1], -1)
            base = score(ref, ids)[0]
            for recipe in args.recipes:
                cache_class, equalize, sinks = RECIPES[recipe]
                changes, kls = [], []
                for seed in SEEDS:
                    session.cache = cache_class(
                        c.n_layers, c.n_kv_heads, c.head_dim, session.max_len, kv_k, kv_v,
                        rotate_k=True, k_smooth=True, k_equalize=equalize, sink_tokens=sinks,
                    )
                    session.cache.rotation = make_rotation(c.head_dim, seed)
                    ppl, kl = score(all_logits(session, ids), ids, ref_logp)
                    changes.append(100 * (ppl / base - 1))
                    kls.append(kl)
                print(
                    f"{key} {text_name} chunk={args.chunk} {recipe}: ppl change over {len(SEEDS)} seeds: "
                    + " ".join(f"{x:+.1f}" for x in changes)
                    + f" | mean {sum(changes) / len(changes):+.1f}%"
                    + f" min {min(changes):+.1f} max {max(changes):+.1f}"
                    + f" | KL mean {sum(kls) / len(kls):.4f} min {min(kls):.4f} max {max(kls):.4f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
