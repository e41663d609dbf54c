"""`python -m engine`: generate, tokenize, perplexity, bench, models (DESIGN.md, "Engine API").

Machine-readable output (--json) goes to stdout; logs and human stats go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import threading
import time
from pathlib import Path

from engine.api import DraftConfig, EngineConfig, SamplingParams
from engine.errors import TandemError

log = logging.getLogger("engine.cli")


def resolve_model(name: str | None) -> str:
    """A path, or a catalogue key such as 'smollm2-135m'; None = the default target."""
    from engine import model_catalog

    keys = {entry.key for entry in model_catalog.catalog()}
    if name is None:
        return str(model_catalog.locate("qwen2.5-coder-1.5b"))
    if name in keys:
        return str(model_catalog.locate(name))
    return name


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="GGUF path or catalogue key (default: qwen2.5-coder-1.5b)")
    p.add_argument("--spec", default="none", help="speculative mode: none | draft-model | ngram | dflash")
    p.add_argument("--draft", help="draft GGUF path / catalogue key, or DFlash folder")
    p.add_argument("--max-draft", type=int, default=8)
    p.add_argument("--block-size", type=int)
    p.add_argument("--ctk", default="f16", help="K cache type: f16 | bf16 | q8_0 | q4_0 | q4_1")
    p.add_argument("--ctv", default="f16", help="V cache type")
    p.add_argument("--skip-wht", action="store_true", help="no K rotation for a q4_0 K cache")
    p.add_argument("--k-smooth", default="auto", help="auto | on | off")
    p.add_argument(
        "--k-equalize", default="auto", help="per-channel K scales: auto (on for quantized K) | on | off"
    )
    p.add_argument("--chunk", type=int, default=0, help="prefill chunk size (0 = auto: 512 CPU, 2048 GPU)")
    p.add_argument("--ctx", type=int, default=4096, help="context length")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--snapshot-dir")
    p.add_argument("--threads", type=int)
    p.add_argument("--cpu-weights", default="fast", help="fast (int4 repack, bf16 math) | exact (float32)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[])


def engine_config(args: argparse.Namespace) -> EngineConfig:
    draft_path = args.draft
    if draft_path and args.spec == "draft-model":
        draft_path = resolve_model(draft_path)
    return EngineConfig(
        model=resolve_model(args.model),
        draft=DraftConfig(
            mode=args.spec, path=draft_path, max_draft=args.max_draft, block_size=args.block_size
        ),
        kv_k=args.ctk,
        kv_v=args.ctv,
        skip_wht=args.skip_wht,
        k_smooth=args.k_smooth,
        k_equalize=args.k_equalize,
        prefill_chunk=args.chunk,
        context_length=args.ctx,
        device=args.device,
        snapshot_dir=args.snapshot_dir,
        threads=args.threads,
        cpu_weights=args.cpu_weights,
    )


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=args.stop,
    )


def load_session(args: argparse.Namespace):
    from engine.session import Engine

    return Engine.load(engine_config(args))


def print_stats(stats) -> None:
    parts = [
        f"prompt {stats.prompt_tokens} tok ({stats.cached_tokens} cached)",
        f"prefill {stats.prefill_tok_per_s:.1f} tok/s",
        f"ttft {stats.ttft_seconds * 1000:.0f} ms",
        f"{stats.new_tokens} new tok, decode {stats.decode_tok_per_s:.2f} tok/s",
    ]
    if stats.draft_steps:
        per_position = " ".join(f"{rate:.2f}" for rate in stats.per_position_acceptance)
        parts.append(
            f"acceptance length {stats.acceptance_length:.2f} ({stats.accepted}/{stats.drafted} drafts; "
            f"per position {per_position}; "
            f"draft {stats.draft_seconds:.2f} s, verify {stats.verify_seconds:.2f} s)"
        )
    parts.append(f"KV {stats.kv_bytes / 2**20:.1f} MiB")
    parts.append(f"{stats.device} ({stats.device_reason})")
    print("\n[" + " | ".join(parts) + "]", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.api import Finished, TextDelta

    session = load_session(args)
    params = sampling_params(args)
    if args.messages:
        messages = json.loads(Path(args.messages).read_text(encoding="utf-8"))
    else:
        messages = [{"role": "user", "content": args.prompt or ""}]
    if args.raw:
        ids = session.tokenizer.encode(args.prompt or "", add_bos=session.tokenizer.add_bos)
        events = session.generate(ids, params)
    else:
        events = session.chat(messages, params)
    token_ids, final = [], None
    for event in events:
        if isinstance(event, TextDelta):
            token_ids.extend(event.token_ids)
            if not args.json:
                print(event.text, end="", flush=True)
        elif isinstance(event, Finished):
            final = event
    if args.json:
        print(
            json.dumps(
                {
                    "text": final.text,
                    "token_ids": token_ids,
                    "stop_reason": final.stop_reason,
                    "stats": vars(final.stats),
                }
            )
        )
    else:
        print_stats(final.stats)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A terminal chat: type a message, get a streamed answer; empty line or Ctrl-D quits."""
    from engine.api import Finished, TextDelta

    session = load_session(args)
    params = sampling_params(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(
        f"Tandem terminal chat on {session.info['model']} ({session.device}). Empty line to quit.",
        file=sys.stderr,
    )
    while True:
        try:
            line = input("\nyou> ").strip()
        except EOFError:
            return 0
        if not line:
            return 0
        messages.append({"role": "user", "content": line})
        cancel = threading.Event()
        print("assistant> ", end="", flush=True)
        try:
            for event in session.chat(messages, params, cancel):
                if isinstance(event, TextDelta):
                    print(event.text, end="", flush=True)
                elif isinstance(event, Finished):
                    messages.append({"role": "assistant", "content": event.text})
                    print_stats(event.stats)
        except KeyboardInterrupt:
            cancel.set()


def cmd_tokenize(args: argparse.Namespace) -> int:
    from engine.gguf_file import GGUFModelFile
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(GGUFModelFile.open(resolve_model(args.model)))
    text = Path(args.text_file).read_text(encoding="utf-8") if args.text_file else args.text
    ids = tokenizer.encode(text, add_bos=args.bos, parse_special=not args.no_special)
    print(json.dumps({"ids": ids}) if args.json else " ".join(map(str, ids)))
    return 0


def read_eval_tokens(args: argparse.Namespace, session) -> list[int]:
    if args.tokens_file:
        ids = json.loads(Path(args.tokens_file).read_text())
    elif args.text_file:
        text = Path(args.text_file).read_text(encoding="utf-8")
        ids = session.tokenizer.encode(text, add_bos=session.tokenizer.add_bos, parse_special=False)
    else:
        raise TandemError("perplexity needs --text-file or --tokens-file.")
    return ids[: args.ctx]


def cmd_perplexity(args: argparse.Namespace) -> int:
    import torch

    session = load_session(args)
    ids = read_eval_tokens(args, session)
    if len(ids) < 2:
        raise TandemError("perplexity needs at least 2 tokens.")
    started = time.perf_counter()
    logits = session.prefill(ids, 0, logits_for="all").float()  # (n, vocab)
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(ids[1:], dtype=torch.long, device=logits.device)
    nll = -logprobs[:-1].gather(1, targets[:, None])[:, 0]  # (n - 1,)
    result = {
        "ppl": math.exp(float(nll.mean())),
        "n_tokens": len(ids),
        "device": session.device,
        "device_reason": session.device_reason,
        "nll": [float(x) for x in nll],
        "argmax": [int(x) for x in logits.argmax(-1)],
        "seconds": time.perf_counter() - started,
        **{key: session.info[key] for key in ("kv_k", "kv_v", "k_rotated", "k_smooth", "k_equalize")},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['ppl']:.4f} over {len(ids)} tokens ({result['seconds']:.1f} s) "
              f"on {session.device} ({session.device_reason})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.spec != "none":  # speculation on vs off vs llama.cpp over the fixed prompt set
        from engine import bench_spec

        argv = [
            "--spec",
            args.spec,
            "--max-draft",
            str(args.max_draft),
            "--threads",
            str(args.threads or 2),
            "--kinds",
            args.kinds,
            "--max-tokens",
            str(args.n_gen),
        ]
        argv += ["--model", args.model] if args.model else []
        argv += ["--draft", args.draft] if args.draft else []
        argv += ["--block-size", str(args.block_size)] if args.block_size else []
        argv += ["--per-kind", str(args.per_kind)] if args.per_kind else []
        argv += ["--json"] if args.json else []
        return bench_spec.main(argv)
    import torch

    session = load_session(args)
    vocab = session.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, min(vocab, 30000), (args.n_prompt,), generator=gen).tolist()
    results = {
        "model": Path(session.config.model).name,
        "n_prompt": args.n_prompt,
        "n_gen": args.n_gen,
        "device": session.device,
        "device_reason": session.device_reason,
        "kv_k": args.ctk,
        "kv_v": args.ctv,
        "threads": torch.get_num_threads(),
        "temperature": args.temp,
    }
    from engine.sampling import Sampler

    params = SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            seed=0 if args.seed is None else args.seed)
    prefill_runs, decode_runs = [], []
    for _ in range(args.repeats):
        session.cached_ids = []
        sampler = Sampler(params)
        t0 = time.perf_counter()
        logits = session.prefill(prompt, 0)
        token = int(logits[0].argmax())  # reading the result waits for the GPU
        prefill_runs.append(args.n_prompt / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for i in range(args.n_gen):
            if sampler.greedy:
                # on the GPU: a graph replay, the argmax read back while the next step runs
                token = session.decode_greedy(token, ahead=i + 1 < args.n_gen)
            elif sampler.graph_params is not None:  # as Session.generate samples (on the GPU: in the step)
                token = session.decode_sampled(token, sampler, ahead=i + 1 < args.n_gen)
            else:
                token = sampler.pick(session.decode_one(token)[0], session.cached_ids)
        decode_runs.append(args.n_gen / (time.perf_counter() - t0))
    results["prefill_tok_per_s"] = sorted(prefill_runs)[len(prefill_runs) // 2]
    results["decode_tok_per_s"] = sorted(decode_runs)[len(decode_runs) // 2]
    results["prefill_runs"], results["decode_runs"] = prefill_runs, decode_runs
    if args.json:
        print(json.dumps(results))
    else:
        sampled = f", sampled at temperature {args.temp}" if args.temp > 0 else ""
        print(
            f"prefill {results['prefill_tok_per_s']:.1f} tok/s (pp{args.n_prompt}), "
            f"decode {results['decode_tok_per_s']:.2f} tok/s (tg{args.n_gen}{sampled}), "
            f"{results['threads']} threads, "
            f"{session.device} ({session.device_reason})"
        )
    return 0


def cmd_needle(args: argparse.Namespace) -> int:
    from engine.needle import run_needle

    session = load_session(args)
    result = run_needle(session, count=args.needles, seed=args.seed)
    result.update(
        {
            "model": Path(session.config.model).name,
            "ctx": args.ctx,
            "kv_k": args.ctk,
            "kv_v": args.ctv,
            "k_rotated": session.info["k_rotated"],
            "k_smooth": session.info["k_smooth"],
            "k_equalize": session.info["k_equalize"],
        }
    )
    if args.json:
        print(json.dumps(result))
    else:
        for t in result["trials"]:
            print(
                f"vault {t['vault']:2d} depth {t['depth']:.2f}: {'found' if t['found'] else 'MISSED'} "
                f"({t['passphrase']!r} -> {t['answer'][:40]!r})"
            )
        print(f"recall {result['found']}/{result['total']}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from engine.model_catalog import models_command

    return models_command(args)


def cmd_gguf_header(args: argparse.Namespace) -> int:
    from engine.random_gguf import write_header_file

    layout = write_header_file(resolve_model(args.model), args.out)
    shown = f"{layout.data_offset} header bytes, {len(layout.tensors)} tensors"
    print(f"wrote {args.out}: {shown}", file=sys.stderr)
    return 0


def cmd_random_gguf(args: argparse.Namespace) -> int:
    from engine.random_gguf import write_random_gguf

    layout = write_random_gguf(args.header, args.out, seed=args.seed)
    shown = f"{layout.file_size / 2**20:.1f} MiB, random weights (seed {args.seed})"
    print(f"wrote {args.out}: {shown}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="Tandem engine command line")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate an answer to a prompt or chat messages")
    add_engine_flags(p)
    add_sampling_flags(p)
    p.add_argument("--prompt", help="user message (or raw text with --raw)")
    p.add_argument("--messages", help="JSON file with a list of {role, content}")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the prompt text")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat in the terminal")
    add_engine_flags(p)
    add_sampling_flags(p)
    p.add_argument("--system", help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("tokenize", help="print token ids of a text")
    p.add_argument("--model")
    p.add_argument("--text", default="")
    p.add_argument("--text-file")
    p.add_argument("--bos", action="store_true", help="prepend BOS")
    p.add_argument("--no-special", action="store_true", help="treat special-token text as plain text")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("perplexity", help="perplexity over one window of --ctx tokens")
    add_engine_flags(p)
    p.add_argument("--text-file")
    p.add_argument("--tokens-file", help="JSON list of token ids")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("bench", help="prefill and decode throughput")
    add_engine_flags(p)
    p.add_argument("--n-prompt", type=int, default=512)
    p.add_argument("--n-gen", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kinds", default="code,chat,edit", help="with --spec: prompt kinds to run")
    p.add_argument("--per-kind", type=int, help="with --spec: only the first N prompts of each kind")
    p.add_argument("--temp", type=float, default=0.0, help="> 0: decode by sampling (default greedy)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("needle", help="passphrase recall at several depths of a long text")
    add_engine_flags(p)
    p.add_argument("--needles", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_needle)

    p = sub.add_parser("models", help="list the default models and their state")
    p.add_argument("--json", action="store_true")
    p.add_argument("--assemble", action="store_true", help="assemble and verify the default models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("gguf-header", help="write a GGUF's header (metadata, tensor infos; no data)")
    p.add_argument("--model", help="GGUF path or catalogue key (default: qwen2.5-coder-1.5b)")
    p.add_argument("--out", required=True, help="the header file; a name ending in .xz is compressed")
    p.set_defaults(func=cmd_gguf_header)

    p = sub.add_parser("random-gguf", help="write a random-weight GGUF with the layout of a header file")
    p.add_argument("--header", required=True, help="a file written by gguf-header")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_random_gguf)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except TandemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
