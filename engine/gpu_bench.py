"""Throughput of the GPU engine path: prefill, decode at a depth, and speculative verify steps.

    from engine.gpu_bench import measure
    measure("model.gguf", "q4_0", "q4_0", n_prompt=2048, n_gen=128, depth=4096)

or `python -m engine.gpu_bench --model M --ctk f16 --ctv f16 --depth 4096 [--json]`. Every figure is
timed with CUDA events after a warm-up (which also captures the step graphs) and is the median of
`repeats` runs:
- prefill: `Session.prefill` of n_prompt random tokens at position 0 (chunks of prefill_chunk).
- decode: n_gen greedy steps starting at position `depth` (the cache first prefilled to that depth)
  through `Session.decode_greedy`, as `Session.generate` runs them: each step queued before the host
  reads the pick of the one before (the host's per-token work included, overlapped with the GPU's).
  `decode_sync_*` is the same with the host waiting for each pick before queuing the next step (no
  step ahead), and `decode_gpu_ms` the step's graph replayed back to back without reads: the device
  time of a step alone.
- verify: a step of R rows at `depth` (R = 1 is the decode step), read back as speculative
  verification reads it; `verify_ratio` is each over the 1-row step.
`weight_bytes` is what one step reads of the weights; with the KV bytes at that depth it gives the
memory bandwidth a step achieves (`decode_gpu_gb_per_s`).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable

import torch

from engine.api import VERIFY_ROWS_MAX, EngineConfig

log = logging.getLogger(__name__)

CONTEXT_ROUND = 256


def timed_seconds(
    fn: Callable[[], object], repeats: int, warmup: int = 1, device: str = "cuda"
) -> list[float]:
    """Seconds of fn() per run after `warmup` untimed runs: CUDA events on a CUDA device, the host
    clock otherwise (the CPU smoke tests of the benchmark tools)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def _cuda_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    return [t * 1e3 for t in timed_seconds(fn, repeats)]


def _weight_bytes(model) -> int:
    from engine.linear import GpuLinear

    linears = [model.lm_head]
    for layer in model.layers:
        linears += layer.qkv.groups + layer.gate_up.groups + [layer.wo, layer.down]
    assert all(isinstance(lin, GpuLinear) for lin in linears)
    return sum(lin.weight.gemv_bytes for lin in linears)


def _kv_bytes_read(cache, n_positions: int) -> int:
    per_position = sum(s.nbytes() for s in cache.k + cache.v) / cache.max_len
    return int(per_position * n_positions)


def measure(
    model_path: str,
    ctk: str = "f16",
    ctv: str = "f16",
    n_prompt: int = 512,
    n_gen: int = 128,
    depth: int = 0,
    verify_sizes: tuple[int, ...] = (1, 4, 8, 16),
    repeats: int = 5,
    prefill_chunk: int = 0,
    seed: int = 0,
) -> dict:
    """Load the model on CUDA with a K/V cache of ctk/ctv and time prefill, decode and verify steps."""
    from engine.session import Engine

    if not torch.cuda.is_available():
        raise RuntimeError("engine.gpu_bench needs a CUDA GPU")
    if max(verify_sizes, default=1) > VERIFY_ROWS_MAX:
        raise ValueError(f"verify steps take at most {VERIFY_ROWS_MAX} rows")
    start = max(depth, 1)  # decode needs one token in the cache
    needed = max(n_prompt, start + max(n_gen, max(verify_sizes, default=1))) + 1
    context = -(-needed // CONTEXT_ROUND) * CONTEXT_ROUND
    config = EngineConfig(
        model=str(model_path),
        kv_k=ctk,
        kv_v=ctv,
        device="cuda",
        context_length=context,
        prefill_chunk=prefill_chunk,
    )
    session = Engine.load(config)
    model, cache = session.model, session.cache
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(
        0, model.config.vocab_size, (max(n_prompt, start) + VERIFY_ROWS_MAX,), generator=gen
    ).tolist()
    result: dict = {
        "model": str(model_path),
        "gpu": torch.cuda.get_device_name(0),
        "device_reason": session.device_reason,
        "kv_k": ctk,
        "kv_v": ctv,
        "k_rotated": cache.rotation is not None,
        "k_smooth": cache.k_smooth,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "depth": depth,
        "prefill_chunk": session.config.prefill_chunk,
        "context_length": context,
        "repeats": repeats,
    }
    with torch.inference_mode():
        # -- prefill ----------------------------------------------------------------------------------
        if n_prompt:
            times = _cuda_ms(lambda: session.prefill(tokens[:n_prompt], 0), repeats)
            result["prefill_ms"] = statistics.median(times)
            result["prefill_tok_per_s"] = n_prompt / (result["prefill_ms"] / 1e3)
        # -- decode at depth ----------------------------------------------------------------------------
        session.prefill(tokens[:start], 0)  # the cache holds `start` tokens (smoothing means set too)
        first = tokens[start]

        def decode_run(ahead: bool) -> None:
            session.cached_ids = session.cached_ids[:start]
            token = first
            for i in range(n_gen):
                token = session.decode_greedy(token, ahead and i + 1 < n_gen)

        for name, ahead in (("decode", True), ("decode_sync", False)):
            times = _cuda_ms(lambda ahead=ahead: decode_run(ahead), repeats)
            result[f"{name}_ms"] = statistics.median(times)
            result[f"{name}_tok_per_s"] = n_gen / (result[f"{name}_ms"] / 1e3)
            result[f"{name}_runs_tok_per_s"] = [n_gen / (t / 1e3) for t in times]
        # -- the decode graph replayed back to back: device time per step -------------------------------
        model.step([first], start, cache)
        graph = model.graphs.graphs[model.graphs.key(1, start, cache)] if model.graphs is not None else None
        if graph is not None:
            n = 50  # each repeat from `start` (the 1-row step advances its own inputs)
            times = _cuda_ms(lambda: [graph.rewind()] + [graph.replay() for _ in range(n)], repeats)
            result["decode_gpu_ms"] = statistics.median(times) / n
            moved = _weight_bytes(model) + _kv_bytes_read(cache, start)
            result["decode_gpu_gb_per_s"] = moved / (result["decode_gpu_ms"] / 1e3) / 1e9
        result["weight_bytes"] = _weight_bytes(model)
        result["kv_bytes_at_depth"] = _kv_bytes_read(cache, start)
        # -- verify steps -------------------------------------------------------------------------------
        verify_ms = {}
        steps = 20
        for rows in verify_sizes:
            block = tokens[start : start + rows]

            def verify_run(block=block) -> None:
                for _ in range(steps):
                    model.step(block, start, cache).argmax.tolist()  # the read verification makes

            verify_ms[rows] = statistics.median(_cuda_ms(verify_run, repeats)) / steps
        result["verify_ms"] = verify_ms
        if 1 in verify_ms:
            result["verify_ratio"] = {rows: ms / verify_ms[1] for rows, ms in verify_ms.items()}
        # -- the same steps as the GPU runs them: each row count's graph replayed back to back -----------
        # (without the host's upload and read of each step above, whose time varies from run to run)
        if model.graphs is not None and torch.cuda.is_available():
            gpu_ms = {}
            for rows in verify_sizes:
                model.step(tokens[start : start + rows], start, cache)  # its graph, captured if new
                g = model.graphs.graphs[model.graphs.key(rows, start, cache)]
                # 20 replays each repeat, from `start` (a 1-row step advances its own inputs)
                times = _cuda_ms(lambda g=g: [g.rewind()] + [g.replay() for _ in range(20)], repeats)
                gpu_ms[rows] = statistics.median(times) / 20
            result["verify_gpu_ms"] = gpu_ms
    session.close()  # the model and cache go with this frame; measure() loads afresh each time
    return result


def summary_line(r: dict) -> str:
    verify = " ".join(f"{rows}:{ms:.3f}" for rows, ms in r.get("verify_ms", {}).items())
    return (
        f"{r['kv_k']}/{r['kv_v']} depth {r['depth']:>5}: "
        f"pp{r['n_prompt']} {r.get('prefill_tok_per_s', 0):8.0f} tok/s | "
        f"tg{r['n_gen']} {r['decode_tok_per_s']:6.0f} tok/s "
        f"(GPU {r.get('decode_gpu_ms', 0) * 1e3:.0f} us/step, {r.get('decode_gpu_gb_per_s', 0):.0f} GB/s) | "
        f"verify ms {verify}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.gpu_bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--ctk", default="f16", help="K cache types, comma-separated (each paired with --ctv's)")
    p.add_argument("--ctv", default="f16")
    p.add_argument("--n-prompt", type=int, default=512)
    p.add_argument("--n-gen", type=int, default=128)
    p.add_argument("--depth", default="0", help="decode depths, comma-separated")
    p.add_argument("--verify", default="1,4,8,16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=0, help="prefill chunk (0 = the engine's auto: 2048 on CUDA)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    results = []
    for ctk, ctv in zip(args.ctk.split(","), args.ctv.split(","), strict=True):
        for depth in (int(d) for d in args.depth.split(",")):
            r = measure(
                args.model,
                ctk,
                ctv,
                args.n_prompt,
                args.n_gen,
                depth,
                tuple(int(v) for v in args.verify.split(",")),
                args.repeats,
                args.chunk,
            )
            results.append(r)
            print(summary_line(r), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
