"""GPU benchmark, one command: our engine, llama.cpp's llama-bench and transformers (bf16) on the same
random-weight model in the same run, and one table of ratios (issue 5; BENCHMARKS.md, "GPU").

Runs on the GPU machine, from the repository root, with `.bench/` carried (see BENCHMARKS.md):

    python3 tests/tools/bench_gpu.py --header .bench/qwen2.5-coder-1.5b.header.gguf --out-dir $OUT \\
        --acceptance 'draft-model code=5.29@7+draft' --acceptance 'ngram edit=5.76@9' \\
        --acceptance-source 'BENCHMARKS.md, Speculative decoding, CPU medians 2026-11-27'

Steps, in this order:
1. The model: `engine.random_gguf` writes a GGUF with the header's exact layout and random valid
   weights (made here from the real file with `python -m engine gguf-header`).
2. llama-bench: `.bench/llama-bench` (or its xz parts `.bench/llama-bench.xz.*`, as --save-llama-bench
   writes them) if carried, else built from `.bench/llama.cpp-src.tar.xz` with
   tests/tools/gpu_bench/build_llama_bench.sh. The build runs in the background while the steps that
   only load the GPU run (model file, copy bandwidth, transformers prefill); everything that is timed
   on the CPU side (decode loops) waits for it.
3. Copy bandwidth (device-to-device, bytes read + written) -> the decode floor = bandwidth / bytes
   of weights read per token.
4. Ours: `engine.gpu_bench.measure(...)` (contract in `run_our_engine`).
5. llama-bench with flash attention, all layers on the GPU, per cache type (f16/f16, q4_0/q4_0):
   pp1, pp4, pp8, pp16 (its verify-step equivalent), pp2048 and tg128, at depth 0 and 4096; JSON.
   pp2048 runs twice: with llama-bench's default micro-batch (n_ubatch 512) and with the whole prompt
   in one micro-batch (-ub 2048 -b 2048, as our engine's 2048-token chunk); the table takes the faster.
6. transformers: `AutoModelForCausalLM.from_config` of the equivalent config (random bf16 weights,
   sdpa): prefill, eager decode (dynamic cache), and decode through `torch.compile` with a static
   cache ("reduce-overhead": CUDA graphs) when there is time; CUDA events.
7. The table; full results as JSON in --out-dir.

Projected speculative decoding = acceptance length / (our verify step for that many rows [+ the
draft model's decode steps]) where acceptance lengths come from --acceptance (measured on CPU with
real models; --acceptance-source says where they came from and is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `python3 tests/tools/bench_gpu.py` from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engine import random_gguf  # noqa: E402
from engine.gpu_bench import timed_seconds  # noqa: E402

BENCH_DIR = REPO / ".bench"
BUILD_SCRIPT = REPO / "tests" / "tools" / "gpu_bench" / "build_llama_bench.sh"
CACHE_TYPES = ("f16", "q4_0")  # K and V get the same type
VERIFY_ROWS = (1, 4, 8, 16)
STARTED = time.monotonic()
DEVICE = "cuda"  # the CPU smoke test (tests/tools/test_bench_gpu.py) sets "cpu"


def log(msg: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {msg}", flush=True)


def seconds_left(args: argparse.Namespace) -> float:
    return args.deadline_s - (time.monotonic() - STARTED)


# ---------------------------------------------------------------------------------------------
# Model file and memory bandwidth


def weight_bytes_per_token(layout: random_gguf.HeaderLayout) -> int:
    """Bytes of weights one decode step reads: every tensor, but only one row of an untied embedding."""
    names = {t.name for t in layout.tensors}
    total = 0
    for t in layout.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            total += t.n_bytes // t.shape[0]
        else:
            total += t.n_bytes
    return total


def copy_bandwidth(n_bytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy in bytes/s (read + written), median of `reps` after warm-up."""
    src = torch.randint(0, 255, (n_bytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n_bytes / statistics.median(times)


# ---------------------------------------------------------------------------------------------
# llama-bench


def find_llama_bench(args: argparse.Namespace) -> Path | None:
    """A ready llama-bench: --llama-bench, .bench/llama-bench, or .bench/llama-bench.xz.* unpacked."""
    if args.llama_bench:
        return Path(args.llama_bench)
    plain = BENCH_DIR / "llama-bench"
    if plain.is_file():
        plain.chmod(0o755)
        return plain
    parts = sorted(BENCH_DIR.glob("llama-bench.xz.*"))
    if parts:
        out = Path(args.work_dir) / "llama-bench"
        with open(out, "wb") as f:
            cat = subprocess.Popen(["cat", *map(str, parts)], stdout=subprocess.PIPE)
            subprocess.run(["xz", "-d", "-c"], stdin=cat.stdout, stdout=f, check=True)
            cat.wait()
        out.chmod(0o755)
        log(f"llama-bench unpacked from {len(parts)} carried parts")
        return out
    return None


def start_llama_build(args: argparse.Namespace) -> subprocess.Popen:
    build_dir = Path(args.work_dir) / "llama-build"
    log(f"building llama-bench in the background ({BUILD_SCRIPT.name} {build_dir})")
    return subprocess.Popen(
        ["bash", str(BUILD_SCRIPT), str(build_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so a build out of time can be stopped whole
    )


def finish_llama_build(
    build: subprocess.Popen, started: float, args: argparse.Namespace
) -> tuple[Path | None, dict]:
    try:
        out, err = build.communicate(timeout=max(1.0, seconds_left(args) - args.llama_bench_reserve_s))
    except subprocess.TimeoutExpired:
        os.killpg(build.pid, signal.SIGTERM)
        out, err = build.communicate()
        seconds = round(time.monotonic() - started, 1)
        log(f"llama-bench build stopped after {seconds} s: no time left for it (--deadline-s)")
        return None, {"seconds": seconds, "returncode": None, "log": (err or "")[-4000:], "stopped": True}
    info = {
        "seconds": round(time.monotonic() - started, 1),
        "returncode": build.returncode,
        "log": err[-4000:],
    }
    if build.returncode != 0:
        log(f"llama-bench build FAILED after {info['seconds']} s:\n{err[-3000:]}")
        return None, info
    binary = Path(out.strip().splitlines()[-1])
    log(f"llama-bench built in {info['seconds']} s ({err.strip().splitlines()[-1]})")
    if args.save_llama_bench:
        info["saved"] = save_binary(binary, Path(args.save_llama_bench))
    return binary, info


def save_binary(binary: Path, folder: Path, part_bytes: int = 15 << 20) -> list[str]:
    """xz the binary into parts of at most 15 MiB (the device's files-back limit is 16 MiB a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    packed = subprocess.run(["xz", "-6", "-T0", "-c", str(binary)], capture_output=True, check=True).stdout
    names = []
    for i in range(0, len(packed), part_bytes):
        name = f"llama-bench.xz.{i // part_bytes:02d}"
        (folder / name).write_bytes(packed[i : i + part_bytes])
        names.append(name)
    log(f"saved llama-bench ({binary.stat().st_size >> 20} MiB, xz {len(packed) >> 20} MiB) as {names}")
    return names


def run_llama_bench(binary: Path, model: Path, args: argparse.Namespace) -> dict:
    """Every llama-bench test per cache type: {"f16": [test dicts], "q4_0": [...]}, plus the command."""
    results: dict = {"commands": [], "tests": {}}
    prompts = ",".join(str(n) for n in sorted(set(VERIFY_ROWS) | {args.n_prompt}))
    for ctype in CACHE_TYPES:
        cmd = [
            str(binary),
            "-m",
            str(model),
            "-ngl",
            "99",
            "-fa",
            "1",
            "-ctk",
            ctype,
            "-ctv",
            ctype,
            "-p",
            prompts,
            "-n",
            str(args.n_gen),
            "-d",
            f"0,{args.depth}",
            "-r",
            str(args.llama_reps),
            "-o",
            "json",
        ]
        results["commands"].append(" ".join(cmd))
        log(f"llama-bench {ctype}/{ctype}")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60, seconds_left(args)))
        if proc.returncode != 0:
            results["tests"][ctype] = {"error": proc.stderr[-3000:]}
            log(f"llama-bench {ctype} failed:\n{proc.stderr[-2000:]}")
            continue
        results["tests"][ctype] = json.loads(proc.stdout)
        # the prompt in one micro-batch too (llama-bench's default n_ubatch is 512; ours takes 2048 at once)
        whole = [str(binary), "-m", str(model), "-ngl", "99", "-fa", "1", "-ctk", ctype, "-ctv", ctype,
                 "-p", str(args.n_prompt), "-n", "0", "-d", "0", "-b", str(args.n_prompt), "-ub",
                 str(args.n_prompt), "-r", str(args.llama_reps), "-o", "json"]
        results["commands"].append(" ".join(whole))
        proc = subprocess.run(whole, capture_output=True, text=True, timeout=max(60, seconds_left(args)))
        if proc.returncode == 0:
            results["tests"][ctype] += json.loads(proc.stdout)
        else:
            log(f"llama-bench {ctype} with -ub {args.n_prompt} failed:\n{proc.stderr[-2000:]}")
    return results


def llama_lookup(llama: dict, ctype: str, n_prompt: int, n_gen: int, depth: int) -> dict | None:
    """llama-bench's test of that shape; where it ran several (pp2048 with two micro-batch sizes), the
    fastest."""
    tests = llama.get("tests", {}).get(ctype)
    found = [t for t in (tests if isinstance(tests, list) else [])
             if (t["n_prompt"], t["n_gen"], t["n_depth"]) == (n_prompt, n_gen, depth)]
    return max(found, key=lambda t: float(t["avg_ts"]), default=None)


def llama_tok_s(llama: dict, ctype: str, n_prompt: int, n_gen: int, depth: int) -> float | None:
    test = llama_lookup(llama, ctype, n_prompt, n_gen, depth)
    return None if test is None else float(test["avg_ts"])


# ---------------------------------------------------------------------------------------------
# transformers


def hf_config(layout: random_gguf.HeaderLayout):
    """The transformers config of the GGUF's model (llama, qwen2, qwen3)."""
    import transformers

    md, arch = layout.metadata, layout.architecture
    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
    if arch not in classes:
        raise ValueError(f"no transformers config for architecture {arch!r} in this tool")
    shapes = {t.name: t.shape for t in layout.tensors}

    def get(key: str, default=None):
        return md.get(f"{arch}.{key}", default)

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    kwargs = dict(
        vocab_size=shapes["token_embd.weight"][0],
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=max(int(get("context_length", 4096)), 16384),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in shapes,
    )
    if arch == "qwen3":
        kwargs["head_dim"] = int(get("attention.key_length", hidden // n_heads))
    return getattr(transformers, classes[arch])(**kwargs)


def device_time(fn, reps: int, warmup: int = 2) -> list[float]:
    """Seconds per call of fn, timed with CUDA events (a host clock on CPU), after `warmup` calls."""
    return timed_seconds(fn, reps, warmup, DEVICE)


def run_transformers(
    layout: random_gguf.HeaderLayout, args: argparse.Namespace, wait_for_cpu, before_compile=None
) -> dict:
    """Prefill and decode tok/s of transformers bf16 (sdpa) on a random model of the same config.

    wait_for_cpu() runs before the decode loops; before_compile() after the eager decode and before
    the (slow, optional) torch.compile step, so what it measures does not depend on the compile.
    """
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    out: dict = {"version": transformers.__version__, "dtype": "bfloat16", "attn": "sdpa"}
    config = hf_config(layout)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    vocab = config.vocab_size
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def tokens(n: int) -> torch.Tensor:
        return torch.randint(min(100, vocab - 1), vocab, (1, n), device=DEVICE, generator=gen)  # (1, n)

    with torch.inference_mode():
        prompt = tokens(args.n_prompt)
        times = device_time(lambda: model(input_ids=prompt, use_cache=False, logits_to_keep=1), reps=5)
        out["prefill_tok_s"] = args.n_prompt / statistics.median(times)
        log(f"transformers prefill pp{args.n_prompt}: {out['prefill_tok_s']:.0f} tok/s")

        wait_for_cpu()  # decode loops are launch-bound: no build beside them

        def eager_decode(depth: int) -> float:
            cache = DynamicCache(config=config)
            first = model(
                input_ids=tokens(max(depth, 1)), past_key_values=cache, use_cache=True, logits_to_keep=1
            )
            tok = first.logits[:, -1:].argmax(-1)  # (1, 1)

            def loop():
                nonlocal tok
                for _ in range(args.n_gen):
                    tok = (
                        model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                    )

            (seconds,) = device_time(loop, reps=1, warmup=0)
            return args.n_gen / seconds

        eager_decode(1)  # warm-up
        out["eager_decode_tok_s"] = eager_decode(1)
        out["eager_decode_depth_tok_s"] = eager_decode(args.depth)
        log(
            f"transformers eager decode: {out['eager_decode_tok_s']:.1f} tok/s, "
            f"at depth {args.depth}: {out['eager_decode_depth_tok_s']:.1f} tok/s"
        )

    if before_compile is not None:
        before_compile()
    if args.hf_compile == "off" or (args.hf_compile == "auto" and seconds_left(args) < args.hf_compile_min_s):
        out["compiled"] = f"skipped ({seconds_left(args):.0f} s left, --hf-compile {args.hf_compile})"
        log(f"transformers compiled decode {out['compiled']}")
        return out
    try:
        out.update(compiled_decode(model, config, tokens, args))
    except Exception as exc:  # a compile failure must not lose the other numbers
        out["compiled"] = f"failed: {type(exc).__name__}: {str(exc)[:500]}"
        log(f"transformers compiled decode {out['compiled']}")
    return out


def compiled_decode(model, config, tokens, args: argparse.Namespace) -> dict:
    """Decode through torch.compile(mode="reduce-overhead") with a static cache (CUDA graphs).

    The static cache attends over its whole length at every step, so its cost hardly depends on the
    depth; both depths are measured on one cache of depth + n_gen + 64 positions.
    """
    from transformers import StaticCache

    max_len = args.depth + args.n_gen + 64
    cache = StaticCache(config=config, max_cache_len=max_len)
    positions = torch.arange(max_len, device=DEVICE)  # (max_len,)

    def step(tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    result = {}
    with torch.inference_mode():
        for label, depth in (("", 1), ("_depth", args.depth)):
            cache.reset()
            prompt = tokens(depth)
            first = model(
                input_ids=prompt, past_key_values=cache, cache_position=positions[:depth], logits_to_keep=1
            )
            tok = first.logits[:, -1:].argmax(-1)  # (1, 1)
            t0 = time.monotonic()
            for i in range(3):  # compile (first depth only) and capture
                tok = compiled(tok, positions[depth + i : depth + i + 1])[:, -1:].argmax(-1).clone()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            if not label:
                result["compile_seconds"] = round(time.monotonic() - t0, 1)
            start_pos = depth + 3

            def loop(start_pos: int = start_pos) -> None:
                nonlocal tok
                for i in range(args.n_gen):
                    p = start_pos + i
                    tok = compiled(tok, positions[p : p + 1])[:, -1:].argmax(-1).clone()

            (seconds,) = device_time(loop, reps=1, warmup=0)
            result[f"compiled_decode{label}_tok_s"] = args.n_gen / seconds
            log(f"transformers compiled decode (depth {depth}): {args.n_gen / seconds:.1f} tok/s")
    result["compiled"] = "torch.compile(mode='reduce-overhead', fullgraph=True), StaticCache"
    return result


# ---------------------------------------------------------------------------------------------
# Our engine


def run_our_engine(model: Path, args: argparse.Namespace, verify_rows: tuple[int, ...]) -> dict:
    """Our engine through `engine.gpu_bench.measure`, once per cache type at depth 0 and at --depth.

    Returns {"caches": {"f16/f16": {...}, ...}} with, per cache pair:
        prefill_tok_s       n_prompt tokens from an empty cache (depth-0 run)
        decode_tok_s        n_gen greedy steps at position 1 as Session.generate runs them (each step
                            queued before the host reads the pick of the one before)
        decode_sync_tok_s   the same with the host waiting for each pick before the next step
        decode_depth_tok_s  the same after `depth` tokens
        verify_ms           {rows: ms} one verify step of `rows` rows at depth 0 (rows=1: a decode step),
                            the host uploading its rows and reading its picks as speculative decoding does
        verify_depth_ms     the same at `depth`
        verify_gpu_ms, verify_depth_gpu_ms: the same steps' graphs replayed back to back (GPU time only)
        runs                measure()'s own dicts (decode_gpu_ms, GB/s, weight bytes, ...)
    """
    try:
        from engine import gpu_bench
    except ImportError as exc:
        return {"status": f"not run: engine.gpu_bench is missing ({exc})"}
    caches = {}
    for c in CACHE_TYPES:
        log(f"ours {c}/{c}: depth 0")
        at_zero = gpu_bench.measure(
            str(model), c, c, n_prompt=args.n_prompt, n_gen=args.n_gen, depth=0, verify_sizes=verify_rows
        )
        log(f"ours {c}/{c}: depth {args.depth}")
        at_depth = gpu_bench.measure(
            str(model), c, c, n_prompt=0, n_gen=args.n_gen, depth=args.depth, verify_sizes=verify_rows
        )
        caches[f"{c}/{c}"] = {
            "prefill_tok_s": at_zero.get("prefill_tok_per_s"),
            "decode_tok_s": at_zero["decode_tok_per_s"],
            "decode_sync_tok_s": at_zero.get("decode_sync_tok_per_s"),
            "decode_depth_tok_s": at_depth["decode_tok_per_s"],
            "verify_ms": at_zero["verify_ms"],
            "verify_depth_ms": at_depth["verify_ms"],
            "verify_gpu_ms": at_zero.get("verify_gpu_ms"),
            "verify_depth_gpu_ms": at_depth.get("verify_gpu_ms"),
            "runs": [at_zero, at_depth],
        }
    return {"caches": caches}


def measure_draft(draft_model: Path, args: argparse.Namespace) -> dict:
    """Our engine's decode step on the draft model (f16 cache): what one drafted token costs."""
    from engine import gpu_bench

    log("ours: draft model decode step")
    run = gpu_bench.measure(str(draft_model), "f16", "f16", n_prompt=0, n_gen=args.n_gen, verify_sizes=(1,))
    return {"caches": {"f16/f16": {"decode_tok_s": run["decode_tok_per_s"], "verify_ms": run["verify_ms"]}}}


def ours(engine: dict, ctype: str, key: str):
    return engine.get("caches", {}).get(f"{ctype}/{ctype}", {}).get(key)


def our_verify_ms(engine: dict, ctype: str, rows: int, key: str = "verify_ms") -> float | None:
    table = ours(engine, ctype, key) or {}
    value = table.get(str(rows), table.get(rows))
    return None if value is None else float(value)


# ---------------------------------------------------------------------------------------------
# Speculative projection


ACCEPTANCE = re.compile(r"^(?P<name>[^=]+)=(?P<length>[0-9.]+)@(?P<rows>[0-9]+)(?P<draft>\+draft)?$")


def parse_acceptance(spec: str) -> dict:
    """'NAME=LENGTH@ROWS[+draft]': acceptance length per verify step of ROWS rows (max draft + 1);
    +draft: a draft model runs ROWS - 1 decode steps per verify step (else drafting is free, e.g. n-gram).
    """
    m = ACCEPTANCE.match(spec.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"--acceptance {spec!r}: expected NAME=LENGTH@ROWS[+draft]")
    return {
        "name": m["name"].strip(),
        "length": float(m["length"]),
        "rows": int(m["rows"]),
        "draft_model": bool(m["draft"]),
    }


def project_speculative(
    specs: list[dict], engine: dict, draft_engine: dict, llama_decode: float | None
) -> list[dict]:
    rows_out = []
    draft_step = our_verify_ms(draft_engine, "f16", 1) if draft_engine else None
    for spec in specs:
        verify = our_verify_ms(engine, "f16", spec["rows"])
        row = dict(spec)
        if verify is None:
            row["note"] = "our verify step for these rows was not measured"
        elif spec["draft_model"] and draft_step is None:
            row["note"] = "needs --draft-header (the draft model's decode step) and our engine"
        else:
            draft_ms = (spec["rows"] - 1) * draft_step if spec["draft_model"] else 0.0
            row.update(verify_ms=verify, draft_ms=draft_ms, tok_s=spec["length"] / (verify + draft_ms) * 1000)
            if llama_decode:
                row["vs_llama_decode"] = row["tok_s"] / llama_decode
        rows_out.append(row)
    return rows_out


# ---------------------------------------------------------------------------------------------
# Report


def fmt(x, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def ratio(a, b) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def build_table(res: dict, args: argparse.Namespace) -> list[dict]:
    engine, llama, hf = res.get("ours", {}), res.get("llama_bench", {}), res.get("transformers", {})
    rows = []

    def add(metric, o, lm, h, target=None):
        rows.append(
            {
                "metric": metric,
                "ours": o,
                "llama": lm,
                "hf": h,
                "ours/llama": ratio(o, lm),
                "ours/hf": ratio(o, h),
                "target": target,
            }
        )

    n, g, d = args.n_prompt, args.n_gen, args.depth
    for c in CACHE_TYPES:
        add(
            f"decode tg{g} {c}/{c}",
            ours(engine, c, "decode_tok_s"),
            llama_tok_s(llama, c, 0, g, 0),
            hf.get("compiled_decode_tok_s") or hf.get("eager_decode_tok_s") if c == "f16" else None,
            ">= 1.5x llama",
        )
        add(
            f"  host waits each step {c}/{c}",
            ours(engine, c, "decode_sync_tok_s"),
            llama_tok_s(llama, c, 0, g, 0),
            None,
            None,
        )
        add(
            f"decode tg{g} @{d} {c}/{c}",
            ours(engine, c, "decode_depth_tok_s"),
            llama_tok_s(llama, c, 0, g, d),
            hf.get("compiled_decode_depth_tok_s") or hf.get("eager_decode_depth_tok_s")
            if c == "f16"
            else None,
            ">= 1.5x llama" if c == "q4_0" else None,
        )
        add(
            f"prefill pp{n} {c}/{c}",
            ours(engine, c, "prefill_tok_s"),
            llama_tok_s(llama, c, n, 0, 0),
            hf.get("prefill_tok_s") if c == "f16" else None,
            ">= 0.8x llama",
        )
    return rows


def verify_table(res: dict, depth: int) -> list[dict]:
    """Verify step of k rows relative to one decode step, at depth 0 and `depth`: ours as speculative decoding
    runs it (host upload and read included) and as the GPU runs it (graphs back to back), and llama.cpp's
    batch of k tokens (llama-bench pp-k at that depth, the same work as verifying k drafted rows)."""
    engine, llama = res.get("ours", {}), res.get("llama_bench", {})
    out = []
    for c in CACHE_TYPES:
        for d, key in ((0, "verify_ms"), (depth, "verify_depth_ms")):
            gpu_key = key.replace("_ms", "_gpu_ms")
            base_ours, base_gpu = our_verify_ms(engine, c, 1, key), our_verify_ms(engine, c, 1, gpu_key)
            l1 = llama_tok_s(llama, c, 1, 0, d)
            l_base = None if l1 is None else 1000 / l1
            for k in VERIFY_ROWS:
                o, g = our_verify_ms(engine, c, k, key), our_verify_ms(engine, c, k, gpu_key)
                lk = llama_tok_s(llama, c, k, 0, d)
                l_ms = None if lk is None else k / lk * 1000
                out.append(
                    {
                        "cache": f"{c}/{c}",
                        "depth": d,
                        "rows": k,
                        "ours_ms": o,
                        "ours_x_step": ratio(o, base_ours),
                        "ours_gpu_ms": g,
                        "ours_gpu_x_step": ratio(g, base_gpu),
                        "llama_ms": l_ms,
                        "llama_x_step": ratio(l_ms, l_base),
                    }
                )
    return out


def print_report(res: dict, args: argparse.Namespace) -> None:
    env = res["environment"]
    print()
    print(
        f"GPU benchmark: {env['gpu']} | torch {env['torch']} | model {res['model']['header']} "
        f"(random weights, seed {args.seed}, "
        f"{res['model']['weight_bytes_per_token'] / 2**20:.0f} MiB weights/token)"
    )
    if "ours" in res and "status" in res["ours"]:
        print(f"ours: {res['ours']['status']}")
    print()
    head = f"{'metric':<30} {'ours':>9} {'llama.cpp':>10} {'HF bf16':>9} {'ours/llama':>11} {'ours/HF':>8}"
    print(head + "  target")
    for r in res["table"]:
        print(
            f"{r['metric']:<30} {fmt(r['ours']):>9} {fmt(r['llama']):>10} {fmt(r['hf']):>9} "
            f"{fmt(r['ours/llama'], '.2f'):>11} {fmt(r['ours/hf'], '.2f'):>8}  {r['target'] or ''}"
        )
    print()
    print(f"{'verify step':<30} {'ours ms':>9} {'x step':>7} {'GPU ms':>8} {'x step':>7} {'llama ms':>10} "
          f"{'x step':>7}")
    for r in res["verify"]:
        label = f"{r['cache']} @{r['depth']} k={r['rows']}"
        print(
            f"{label:<30} {fmt(r['ours_ms'], '.3f'):>9} "
            f"{fmt(r['ours_x_step'], '.2f'):>7} {fmt(r.get('ours_gpu_ms'), '.3f'):>8} "
            f"{fmt(r.get('ours_gpu_x_step'), '.2f'):>7} {fmt(r['llama_ms'], '.3f'):>10} "
            f"{fmt(r['llama_x_step'], '.2f'):>7}"
        )
    print("target: ours k=16 <= 1.3x one decode step (ours: host upload and read included; GPU: the step's "
          "graph replayed back to back)")
    floor = res["bandwidth"]
    our_dec = ours(res.get("ours", {}), "f16", "decode_tok_s")
    llama_dec = llama_tok_s(res.get("llama_bench", {}), "f16", 0, args.n_gen, 0)
    print()
    print(
        f"bandwidth floor: {floor['copy_GBps']:.0f} GB/s copy (read+write) / "
        f"{res['model']['weight_bytes_per_token'] / 1e9:.3f} GB = {floor['floor_tok_s']:.0f} tok/s; "
        f"ours f16 decode = {fmt(ratio(our_dec, floor['floor_tok_s']), '.1%')} of it (target >= 40%); "
        f"llama.cpp = {fmt(ratio(llama_dec, floor['floor_tok_s']), '.1%')}"
    )
    if res["speculative"]:
        print()
        print(f"projected speculative decode (f16 cache), acceptance from: {args.acceptance_source}")
        for s in res["speculative"]:
            if "tok_s" in s:
                print(
                    f"  {s['name']:<22} acc.len {s['length']:.2f} @{s['rows']} rows: "
                    f"verify {s['verify_ms']:.3f} ms + draft {s['draft_ms']:.3f} ms "
                    f"-> {s['tok_s']:.0f} tok/s = "
                    f"{fmt(s.get('vs_llama_decode'), '.2f')}x llama.cpp plain decode (target >= 3x)"
                )
            else:
                print(f"  {s['name']:<22} acc.len {s['length']:.2f} @{s['rows']} rows: {s['note']}")
    hf = res.get("transformers", {})
    if hf:
        print(
            f"\nHF decode column: {'compiled static cache' if hf.get('compiled_decode_tok_s') else 'eager'} "
            f"({hf.get('compiled', '')}); eager {fmt(hf.get('eager_decode_tok_s'))} tok/s"
        )


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    fmt_cls = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt_cls)
    p.add_argument("--header", required=True, help="header file from `python -m engine gguf-header`")
    p.add_argument("--draft-header", help="header of a draft model (for '+draft' projections)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=os.environ.get("OUT", "."), help="where bench_gpu.json goes")
    p.add_argument("--work-dir", default="/tmp/bench_gpu", help="random GGUFs and the llama.cpp build")
    p.add_argument("--n-prompt", type=int, default=2048)
    p.add_argument("--n-gen", type=int, default=128)
    p.add_argument("--depth", type=int, default=4096)
    p.add_argument("--llama-reps", type=int, default=5)
    p.add_argument("--llama-bench", help="path of a built llama-bench (default: .bench/, else build)")
    p.add_argument("--save-llama-bench", help="after building, store llama-bench.xz.NN parts here")
    p.add_argument("--skip", default="", help="comma list of: ours, llama, hf")
    p.add_argument("--hf-compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument(
        "--hf-compile-min-s", type=float, default=150, help="auto: compile only with this much left"
    )
    p.add_argument("--deadline-s", type=float, default=520, help="time budget of the whole run")
    p.add_argument(
        "--llama-bench-reserve-s",
        type=float,
        default=90,
        help="a build must end this long before the deadline",
    )
    p.add_argument(
        "--acceptance",
        action="append",
        default=[],
        type=parse_acceptance,
        help="NAME=LENGTH@ROWS[+draft], measured on CPU with real models (repeatable)",
    )
    p.add_argument(
        "--acceptance-source", default="(not given)", help="where the acceptance figures come from"
    )
    args = p.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; run it on the GPU machine", file=sys.stderr)
        return 2

    res: dict = {
        "args": {k: v for k, v in vars(args).items()},
        "environment": {
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "host_cpus": os.cpu_count(),
        },
    }
    # 1. llama-bench binary: carried, or a background build.
    build, build_started, binary = None, 0.0, None
    if "llama" not in skip:
        binary = find_llama_bench(args)
        if binary is None:
            build, build_started = start_llama_build(args), time.monotonic()

    def wait_for_build() -> None:
        nonlocal build, binary
        if build is not None:
            log("waiting for the llama-bench build")
            binary, res["llama_build"] = finish_llama_build(build, build_started, args)
            build = None

    # 2. Random model files.
    t0 = time.monotonic()
    model = work / "model.gguf"
    layout = random_gguf.write_random_gguf(args.header, model, seed=args.seed)
    res["model"] = {
        "header": Path(args.header).name,
        "architecture": layout.architecture,
        "file_bytes": layout.file_size,
        "weight_bytes_per_token": weight_bytes_per_token(layout),
        "write_seconds": round(time.monotonic() - t0, 1),
    }
    log(f"random GGUF {model} ({layout.file_size >> 20} MiB) in {res['model']['write_seconds']} s")
    draft_model = None
    if args.draft_header:
        draft_model = work / "draft.gguf"
        random_gguf.write_random_gguf(args.draft_header, draft_model, seed=args.seed + 1)

    # 3. Bandwidth floor.
    bw = copy_bandwidth()
    res["bandwidth"] = {"copy_GBps": bw / 1e9, "floor_tok_s": bw / res["model"]["weight_bytes_per_token"]}
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s -> floor {res['bandwidth']['floor_tok_s']:.0f} tok/s")

    # 4-6. transformers prefill (overlaps the build) and eager decode (waits for it); then ours and
    # llama-bench; then the optional transformers compile, which only has the time left.
    verify_rows = tuple(sorted(set(VERIFY_ROWS) | {s["rows"] for s in args.acceptance if s["rows"] <= 16}))
    draft_engine: dict = {}
    others_done = False

    def ours_and_llama() -> None:
        nonlocal others_done, draft_engine
        others_done = True
        wait_for_build()
        if "ours" not in skip:
            try:
                res["ours"] = run_our_engine(model, args, verify_rows)
                if draft_model is not None and "status" not in res["ours"]:
                    draft_engine = measure_draft(draft_model, args)
                    res["ours_draft"] = draft_engine
            except Exception as exc:  # keep the other columns; the traceback goes to the log and JSON
                res["ours"] = {
                    "status": f"failed: {type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                }
                log(f"our engine failed:\n{res['ours']['traceback']}")
        if binary is not None:
            res["llama_bench"] = run_llama_bench(binary, model, args)

    if "hf" not in skip:
        try:
            res["transformers"] = run_transformers(layout, args, wait_for_build, ours_and_llama)
        except Exception as exc:
            res["transformers"] = {
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
            log(f"transformers failed:\n{res['transformers']['traceback']}")
        torch.cuda.empty_cache()
    if not others_done:
        ours_and_llama()

    # 7. Report.
    res["table"] = build_table(res, args)
    res["verify"] = verify_table(res, args.depth)
    llama_decode = llama_tok_s(res.get("llama_bench", {}), "f16", 0, args.n_gen, 0)
    res["speculative"] = project_speculative(args.acceptance, res.get("ours", {}), draft_engine, llama_decode)
    res["acceptance_source"] = args.acceptance_source
    res["seconds"] = round(time.monotonic() - STARTED, 1)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_gpu.json").write_text(json.dumps(res, indent=1, default=str))
    print_report(res, args)
    print(f"\nfull results: {out_dir / 'bench_gpu.json'} ({res['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
