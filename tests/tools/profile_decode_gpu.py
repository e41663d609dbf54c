"""Where a GPU decode step's time goes: kernel by kernel, from the CUDA profiler (issue 5).

    python3 -m tests.tools.profile_decode_gpu --model M.gguf [--ctk f16 --ctv f16] [--depth 1024] [--rows 1]
    python3 -m tests.tools.profile_decode_gpu --model M.gguf --pdl --ab TANDEM_SPLIT_OUTPUT  # a switch's A/B

Loads the model on CUDA, fills the cache to `depth`, captures the 1-row decode graph (or the graph of
a `rows`-token speculative verify step), replays it
`steps` times under torch.profiler and prints, per kernel name, launches and device microseconds per
step, then the step's wall time (graph replays back to back) against the sum of kernel times: the
difference is time the GPU spent between kernels.

Programmatic dependent launch (kernels/pdl.py) is turned off unless --pdl is given: with it a kernel
starts before the previous one ends and waits inside, so its profiled duration includes that wait (the
per-kernel times then overlap and add up to more than the wall time; measured on an H200 in session 4:
add + RMSNorm 10.4 us "each" instead of 1.8).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import defaultdict

import torch


def _load(model_path: str, ctk: str, ctv: str, depth: int, rows: int, context: int | None = None):
    """An engine on CUDA with the cache filled to `depth`, and the `rows` tokens of the step to time."""
    from engine.api import EngineConfig
    from engine.session import Engine

    context = context or -(-(depth + 64) // 256) * 256
    session = Engine.load(EngineConfig(model=model_path, kv_k=ctk, kv_v=ctv, device="cuda",
                                       context_length=context))
    gen = torch.Generator().manual_seed(0)
    vocab = session.model.config.vocab_size
    tokens = torch.randint(0, vocab, (depth + rows,), generator=gen)  # (depth + rows,)
    session.prefill(tokens[:depth].tolist(), 0)
    return session, tokens[depth:].tolist()


def _captured(session, step_ids: list[int], depth: int):
    """The step's CUDA graph, captured now (any captured before is dropped), warmed by 5 replays."""

    model = session.model
    model.graphs.graphs.clear()
    model.step(step_ids, depth, session.cache)  # captures the step's graph
    graph = model.graphs.graphs[model.graphs.key(len(step_ids), depth, session.cache)]
    for _ in range(5):
        graph.replay()
    graph.rewind()
    torch.cuda.synchronize()
    return graph


def _wall_us(graph, steps: int) -> float:
    """Us a step over `steps` replays from the graph's position (a 1-row step advances one a replay)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.rewind()
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / steps


def profile(model_path: str, ctk: str, ctv: str, depth: int, steps: int, rows: int = 1,
            context: int | None = None) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.inference_mode():
        session, step_ids = _load(model_path, ctk, ctv, depth, rows, context)
        model = session.model
        graph = _captured(session, step_ids, depth)
        wall_us = _wall_us(graph, steps)
        graph.rewind()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                graph.replay()
            torch.cuda.synchronize()
    per_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_name[evt.name][0] += 1
            per_name[evt.name][1] += evt.device_time
    session.close()
    rows = sorted(((name, count / steps, us / steps) for name, (count, us) in per_name.items()),
                  key=lambda r: -r[2])
    return {"wall_us": wall_us, "rows": rows, "n_layers": model.config.n_layers}


def ab_switch(model_path: str, ctk: str, ctv: str, depth: int, steps: int, rows: int, name: str,
              rounds: int = 2, context: int | None = None) -> dict[str, list[float]]:
    """Wall us per step with the environment switch `name` "1" and "0", in the order 1, 0, 0, 1 (and again
    for more rounds), the step's graph captured anew for each (switches are read when a step is captured).
    Returns {"1": [...], "0": [...]}."""
    walls: dict[str, list[float]] = {"1": [], "0": []}
    with torch.inference_mode():
        session, step_ids = _load(model_path, ctk, ctv, depth, rows, context)
        os.environ[name] = "1"
        _wall_us(_captured(session, step_ids, depth), steps)  # untimed: the first pass ran 20-30 us slow
        for value in ("1", "0", "0", "1") * rounds:
            os.environ[name] = value
            walls[value].append(_wall_us(_captured(session, step_ids, depth), steps))
        session.close()
    return walls


def add_step_arguments(parser: argparse.ArgumentParser, depth: int, steps: int) -> None:
    """The arguments of the tools that time a step of a model on CUDA (this one, tune_decode_gpu,
    decode_bounds_gpu): the model, the cache types, the depth the cache is filled to, replays timed."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--ctk", default="f16")
    parser.add_argument("--ctv", default="f16")
    parser.add_argument("--depth", type=int, default=depth)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--context", type=int, default=None,
                        help="the cache's positions (default: depth + 64 rounded up to 256)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser, depth=1024, steps=20)
    parser.add_argument("--rows", type=int, default=1, help="tokens per step: 1 = decode, more = verify")
    parser.add_argument("--pdl", action="store_true",
                        help="keep programmatic dependent launch on (per-kernel times then include waits)")
    parser.add_argument("--ab", metavar="SWITCH", default=None,
                        help="instead of profiling: wall time per step with the environment switch SWITCH "
                             "=1 and =0 (order 1 0 0 1 1 0 0 1, graph captured anew each time)")
    args = parser.parse_args(argv)
    if not args.pdl:
        os.environ["TANDEM_PDL"] = "0"  # read at the first kernel launch (kernels/pdl.py)
    if not torch.cuda.is_available():
        print("profile_decode_gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    what = "decode step" if args.rows == 1 else f"{args.rows}-row verify step"
    pdl = "PDL on" if args.pdl else "PDL off"
    if args.ab:
        walls = ab_switch(args.model, args.ctk, args.ctv, args.depth, args.steps, args.rows, args.ab,
                           context=args.context)
        on, off = (statistics.mean(walls[v]) for v in ("1", "0"))
        print(f"{what} ({pdl}), {args.ctk}/{args.ctv} cache at depth {args.depth}, wall us: "
              f"{args.ab}=1 {on:.0f} ({' '.join(f'{w:.0f}' for w in walls['1'])}), "
              f"=0 {off:.0f} ({' '.join(f'{w:.0f}' for w in walls['0'])}); 1/0 = {on / off:.3f}")
        return 0
    res = profile(args.model, args.ctk, args.ctv, args.depth, args.steps, args.rows, args.context)
    kernel_us = sum(r[2] for r in res["rows"])
    launches = sum(r[1] for r in res["rows"])
    print(f"{what} ({pdl}), {args.ctk}/{args.ctv} cache at depth {args.depth}: "
          f"wall {res['wall_us']:.0f} us, "
          f"kernels {kernel_us:.0f} us in {launches:.0f} launches "
          f"({launches / res['n_layers']:.1f} per layer), between kernels "
          f"{res['wall_us'] - kernel_us:.0f} us")
    print(f"{'us/step':>8} {'share':>6} {'launches':>8} {'us each':>8}  kernel")
    for name, count, us in res["rows"]:
        print(f"{us:8.1f} {us / res['wall_us']:6.1%} {count:8.1f} {us / max(count, 1e-9):8.2f}  {name[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
