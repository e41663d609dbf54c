"""Speculative decoding benchmark: speculation on vs off vs llama.cpp plain decoding, same run.

    python -m engine bench --spec draft-model --draft qwen2.5-coder-0.5b \
        [--model qwen2.5-coder-1.5b] [--kinds code,chat,edit] [--max-tokens 128] [--threads 2] [--no-llama]

For every prompt of the fixed set (code, chat, input-grounded edits) it runs our plain greedy
decoding and our speculative decoding on the same loaded target (speculation toggled, order
alternating ABBA across prompts so drift on a loaded machine hits both), then llama.cpp
(llama-cpp-python, CPU) plain greedy decoding of the same chat. It prints decode tok/s per run,
the ratios spec/plain and spec/llama.cpp, the acceptance length, and whether the speculative
output is token-for-token the plain output. `--json` writes the rows to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time

from engine.api import DraftConfig, EngineConfig, Finished, SamplingParams, TextDelta

log = logging.getLogger("bench_spec")

CODE_SNIPPET = '''def load_users(path):
    users = []
    with open(path) as f:
        for line in f:
            name, age, email = line.strip().split(",")
            users.append({"name": name, "age": int(age), "email": email})
    return users
'''

PROMPTS = {
    "code": [
        "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
        "Write a Python class Stack with push, pop, peek and is_empty methods.",
        "Write a JavaScript function that debounces another function.",
    ],
    "chat": [
        "Explain in a few sentences what a hash table is.",
        "Give me three tips for writing readable code.",
    ],
    "edit": [
        "Add type hints to this function and change nothing else:\n\n" + CODE_SNIPPET,
        "Rename the variable `users` to `records` in this code and output the whole code:\n\n" + CODE_SNIPPET,
        "Add a docstring to this function and output the whole function:\n\n" + CODE_SNIPPET,
    ],
}


def run_ours(session, prompt: str, max_tokens: int) -> tuple[list[int], object]:
    ids, final = [], None
    session.cached_ids = []  # a cold prefill every time: both modes pay the same
    for event in session.chat([{"role": "user", "content": prompt}], SamplingParams(max_tokens=max_tokens)):
        if isinstance(event, TextDelta):
            ids += event.token_ids
        elif isinstance(event, Finished):
            final = event
    return ids, final.stats


def run_llama(llm, prompt: str, max_tokens: int) -> tuple[float, int]:
    """Decode tok/s of llama.cpp plain greedy decoding (time after the first token)."""
    first, n = None, 0
    for _ in llm.create_chat_completion([{"role": "user", "content": prompt}], temperature=0.0, top_k=1,
                                        max_tokens=max_tokens, stream=True):
        n += 1
        if first is None:
            first = time.perf_counter()
    return (n - 1) / max(time.perf_counter() - first, 1e-9), n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--spec", default="draft-model")
    p.add_argument("--draft")
    p.add_argument("--max-draft", type=int, default=8)
    p.add_argument("--block-size", type=int)
    p.add_argument("--kinds", default="code,chat,edit")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--per-kind", type=int, default=None, help="only the first N prompts of each kind")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-llama", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    import torch

    from engine.cli import resolve_model
    from engine.session import Engine

    torch.set_num_threads(args.threads)
    model = resolve_model(args.model)
    draft = resolve_model(args.draft) if args.spec == "draft-model" else args.draft
    config = EngineConfig(model=model, device="cpu", context_length=2048, threads=args.threads,
                          draft=DraftConfig(mode=args.spec, path=draft, max_draft=args.max_draft,
                                            block_size=args.block_size))
    session = Engine.load(config)
    drafter = session.drafter
    llm = None
    if not args.no_llama:
        from llama_cpp import Llama

        llm = Llama(model_path=model, n_ctx=2048, n_threads=args.threads, verbose=False)

    rows = []
    index = 0
    for kind in args.kinds.split(","):
        for prompt in PROMPTS[kind][: args.per_kind]:
            results = {}
            order = ("plain", "spec") if index % 2 == 0 else ("spec", "plain")  # ABBA across prompts
            for mode in order:
                session.drafter = drafter if mode == "spec" else None
                results[mode] = run_ours(session, prompt, args.max_tokens)
            session.drafter = drafter
            llama_tps = run_llama(llm, prompt, args.max_tokens)[0] if llm else float("nan")
            (plain_ids, plain), (spec_ids, spec) = results["plain"], results["spec"]
            row = {"kind": kind, "prompt": prompt[:40], "tokens": len(spec_ids),
                   "plain_tok_s": plain.decode_tok_per_s, "spec_tok_s": spec.decode_tok_per_s,
                   "llama_tok_s": llama_tps, "acceptance_length": spec.acceptance_length,
                   "identical": spec_ids == plain_ids,
                   "draft_s": spec.draft_seconds, "verify_s": spec.verify_seconds}
            rows.append(row)
            log.info("%s: plain %.2f, spec %.2f, llama.cpp %.2f tok/s, acceptance %.2f, identical %s "
                     "(spec: draft %.1f s, verify %.1f s; plain decode %.1f s)", kind, row["plain_tok_s"],
                     row["spec_tok_s"], llama_tps, row["acceptance_length"], row["identical"],
                     spec.draft_seconds, spec.verify_seconds, plain.decode_seconds)
            index += 1

    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'kind':6} {'prompt':42} {'tok':>4} {'plain':>7} {'spec':>7} {'llama':>7} {'s/plain':>7} "
          f"{'s/llama':>7} {'acc.len':>7} same")
    for r in rows:
        print(f"{r['kind']:6} {r['prompt']!r:42.42} {r['tokens']:4d} {r['plain_tok_s']:7.2f} "
              f"{r['spec_tok_s']:7.2f} {r['llama_tok_s']:7.2f} {r['spec_tok_s'] / r['plain_tok_s']:7.2f} "
              f"{r['spec_tok_s'] / r['llama_tok_s']:7.2f} {r['acceptance_length']:7.2f} {r['identical']}")
    for kind in args.kinds.split(","):
        sel = [r for r in rows if r["kind"] == kind]
        ratio = statistics.median(r["spec_tok_s"] / r["plain_tok_s"] for r in sel)
        accept = statistics.median(r["acceptance_length"] for r in sel)
        print(f"{kind}: median spec/plain {ratio:.2f}, median acceptance length {accept:.2f}")
    print(f"identical to plain greedy: {sum(r['identical'] for r in rows)}/{len(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
