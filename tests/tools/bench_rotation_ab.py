"""A/B cost of the K rotation in prefill on the CUDA engine (issue 3, "rotation fused into the
quantize-on-write costs < 1% of prefill time"):

    python3 tests/tools/bench_rotation_ab.py --header .bench/qwen2.5-coder-1.5b.header.gguf.xz \\
        --ctk q4_0 --ctv q4_0 --n-prompt 2048 512 --rounds 4 --repeats 5 [--json FILE]

A = rotation on (the default), B = skip_wht=True, which for a q4_0 K cache turns the rotation off
in both places it happens: K in the quantize-on-write kernel (`CudaKVCache.rotation` is None) and Q
in `layer_ops.rope_heads` (the model passes `cache.rotation`). Both arms load the same random-weight
GGUF (written here from the header, or --model) with everything else at its default (K smoothing,
equalization). After two warm-up prefills per arm, each order (A-B-A-B and B-A-B-A) runs `rounds`
rounds; a round is `repeats` back-to-back prefills of one arm at position 0, timed with CUDA events
(wall time of the GPU stream, so host-side launch time counts where the GPU waits for it). Per order
and prompt length the first table gives the median over that arm's samples, and diff = (A - B) / B.
The second gives the device time of the kernels alone (profiler; all kernels, the K write, RoPE with
the Q rotation) per prefill, in both orders. Run on the GPU machine from the repository root.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `python3 tests/tools/bench_rotation_ab.py` from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engine import random_gguf  # noqa: E402
from engine.api import EngineConfig  # noqa: E402

ARMS = {"A": "rotation on", "B": "rotation off (skip_wht)"}


def load_arm(model: Path, arm: str, ctk: str, ctv: str, context: int, chunk: int):
    from engine.session import Engine

    config = EngineConfig(model=str(model), kv_k=ctk, kv_v=ctv, device="cuda", context_length=context,
                          prefill_chunk=chunk, skip_wht=arm == "B")
    session = Engine.load(config)
    rotated = session.cache.rotation is not None
    if rotated != (arm == "A"):
        raise SystemExit(f"arm {arm}: expected the K rotation {'on' if arm == 'A' else 'off'}, got {rotated}")
    return session


def prefill_ms(session, tokens: list[int], repeats: int) -> list[float]:
    """`repeats` prefills of tokens at position 0, each timed with CUDA events (ms); the Python garbage
    collector runs before the round, not inside it."""
    times = []
    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                session.prefill(tokens, 0)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
    finally:
        gc.enable()
    return times


def kernel_ms(session, tokens: list[int], repeats: int) -> dict[str, float]:
    """Device time per prefill (ms) of all kernels, of the K-write kernel and of the RoPE (+ Q rotation)
    kernel, from the profiler over `repeats` prefills: the GPU's share without the host's."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        session.prefill(tokens, 0)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                session.prefill(tokens, 0)
            torch.cuda.synchronize()
    total = {"all": 0.0, "k_write": 0.0, "rope": 0.0}
    for evt in prof.key_averages():
        us = evt.device_time_total
        if evt.key.startswith(("cudaLaunch", "cuLaunch", "cudaMemcpy", "cudaDeviceSynchronize")):
            continue
        total["all"] += us
        if "_k_write_kernel" in evt.key:
            total["k_write"] += us
        if "_rope_heads_kernel" in evt.key:
            total["rope"] += us
    return {name: us / repeats / 1e3 for name, us in total.items()}


def summarize(samples: dict[str, list[float]]) -> dict:
    a, b = statistics.median(samples["A"]), statistics.median(samples["B"])
    return {"on_ms": a, "off_ms": b, "diff_pct": 100 * (a - b) / b,
            "on_spread_ms": max(samples["A"]) - min(samples["A"]),
            "off_spread_ms": max(samples["B"]) - min(samples["B"]), "n": len(samples["A"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--header", help="header file from `python -m engine gguf-header` (plain or .xz)")
    src.add_argument("--model", help="a GGUF to load instead of a random one")
    p.add_argument("--ctk", default="q4_0")
    p.add_argument("--ctv", default="q4_0")
    p.add_argument("--n-prompt", type=int, nargs="+", default=[2048, 512])
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--rounds", type=int, default=6, help="rounds per order (A-B-A-B... / B-A-B-A...)")
    p.add_argument("--repeats", type=int, default=5, help="prefills per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    if args.ctk != "q4_0":
        print("note: skip_wht only turns the rotation off for a q4_0 K cache", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else Path(tmp) / "model.gguf"
        if args.header:
            random_gguf.write_random_gguf(args.header, model, seed=args.seed)
        context = -(-(max(args.n_prompt) + 1) // 256) * 256
        sessions = {arm: load_arm(model, arm, args.ctk, args.ctv, context, args.chunk) for arm in ARMS}
        vocab = sessions["A"].model.config.vocab_size
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, vocab, (max(args.n_prompt),), generator=gen).tolist()
        results, device = [], []
        for n in args.n_prompt:
            for arm in ARMS:  # warm-up: kernels compiled, allocator settled
                prefill_ms(sessions[arm], tokens[:n], 2)
            for order in ("AB", "BA"):
                samples: dict[str, list[float]] = {"A": [], "B": []}
                for r in range(args.rounds):
                    arm = order[r % 2]
                    samples[arm] += prefill_ms(sessions[arm], tokens[:n], args.repeats)
                row = {"n_prompt": n, "order": "-".join(order[r % 2] for r in range(args.rounds)),
                       **summarize(samples), "samples": samples}
                results.append(row)
            both = {arm: sum((r["samples"][arm] for r in results if r["n_prompt"] == n), []) for arm in ARMS}
            results.append({"n_prompt": n, "order": "both", **summarize(both)})
        gpu = torch.cuda.get_device_name()
        print(f"\nK rotation A/B in prefill: {gpu}, K {args.ctk} / V {args.ctv}, chunk {args.chunk}, "
              f"{args.rounds} rounds x {args.repeats} prefills per order; A = {ARMS['A']}, B = {ARMS['B']}")
        head = ("prompt", "order", "on ms", "off ms", "diff %", "on spread", "off spread", "n")
        print("{:>6} {:>9} {:>9} {:>9} {:>8} {:>10} {:>10} {:>4}".format(*head))
        for r in results:
            print(f"{r['n_prompt']:>6} {r['order']:>9} {r['on_ms']:9.3f} {r['off_ms']:9.3f} "
                  f"{r['diff_pct']:+8.2f} {r['on_spread_ms']:10.3f} {r['off_spread_ms']:10.3f} {r['n']:>4}")
        sys.stdout.flush()
        for n in args.n_prompt:
            for order in ("AB", "BA"):  # device time of the kernels, profiled, in both orders
                for arm in order:
                    device.append({"n_prompt": n, "order": "-".join(order), "arm": arm,
                                   **kernel_ms(sessions[arm], tokens[:n], args.repeats)})
        for session in sessions.values():
            session.close()
    print("\ndevice time per prefill from the profiler (ms): all kernels, the K write, RoPE (+ Q rotation)")
    print("{:>6} {:>6} {:>4} {:>10} {:>9} {:>9}".format("prompt", "order", "arm", "all", "k_write", "rope"))
    for r in device:
        print(f"{r['n_prompt']:>6} {r['order']:>6} {r['arm']:>4} {r['all']:10.3f} {r['k_write']:9.4f} "
              f"{r['rope']:9.4f}")
    for n in args.n_prompt:
        on = [r["all"] for r in device if r["n_prompt"] == n and r["arm"] == "A"]
        off = [r["all"] for r in device if r["n_prompt"] == n and r["arm"] == "B"]
        if on and off and statistics.mean(off) > 0:
            diff = 100 * (statistics.mean(on) - statistics.mean(off)) / statistics.mean(off)
            print(f"pp{n}: kernel device time, rotation on vs off (mean of both orders): {diff:+.2f}%")
    if args.json:
        out = {"gpu": gpu, "args": vars(args), "results": results, "device_time": device}
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
