"""Microbenchmark of the CPU linear paths on a real GGUF's layer shapes.

    .venv/bin/python tests/tools/bench_linear.py [--model PATH] [--threads 2] [--repack-all]

Prints ms per call (median and min of the repeats; min is the figure to trust on a loaded
machine) for each path at M = 1, 8, 512 rows, the projected decode time per token for the whole
model (every layer's tensors with their real types, plus the LM head), and with --repack-all the
time to build the int4 modules of every linear weight of the model.

Paths: dense = float32 F.linear on the dequantized weight (exact); int4 = lossless repack, float32
op (exact, scalar kernel; timed at M=1 only); int4-bf16 = same repack, bfloat16 op (lossy);
bf16-dense = F.linear on bf16-rounded weights and inputs (lossy, for comparison).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.gguf_file import GGUFModelFile, TensorInfo  # noqa: E402
from engine.linear import make_linear  # noqa: E402

logger = logging.getLogger("bench_linear")

DEFAULT_MODEL = Path.home() / ".local/share/tandem/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
ROWS = (1, 8, 512)


def time_call(fn: Callable[[], object], min_seconds: float = 1.0, max_reps: int = 100) -> tuple[float, float]:
    """(median, min) milliseconds per call, after one warm-up call."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_seconds and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def bench_tensor(info: TensorInfo, rows: tuple[int, ...]) -> dict[tuple[str, int], tuple[float, float]]:
    out_f, in_f = info.shape
    results: dict[tuple[str, int], tuple[float, float]] = {}
    modules = {mode: make_linear(info, mode=mode) for mode in ("dense", "int4", "int4-bf16")}
    weight_bf16 = modules["dense"].weight.to(torch.bfloat16)  # (out, in)
    for m in rows:
        x = torch.randn(m, in_f)  # (M, K)
        xb = x.to(torch.bfloat16)
        results[("dense", m)] = time_call(lambda x=x: modules["dense"](x))
        results[("int4-bf16", m)] = time_call(lambda x=x: modules["int4-bf16"](x))
        results[("bf16-dense", m)] = time_call(lambda xb=xb: torch.nn.functional.linear(xb, weight_bf16))
        if m == 1:
            results[("int4", m)] = time_call(lambda x=x: modules["int4"](x), min_seconds=0.0)
    return results


def sweep(tensors: dict[str, TensorInfo], n_layers: int, head: TensorInfo, modes: tuple[str, ...],
          passes: int = 6) -> None:
    """Per-token time of every linear layer in layer order, for each mode (median / min ms of
    `passes`, modes alternated ABBA): unlike the per-tensor table, no weight stays in cache."""
    built: dict[str, list[torch.nn.Module]] = {}
    for mode in modes:
        t0 = time.perf_counter()
        built[mode] = [make_linear(tensors[f"blk.{i}.{role}.weight"], mode=mode)
                       for i in range(n_layers) for role in ROLES] + [make_linear(head, mode=mode)]
        elapsed = time.perf_counter() - t0
        print(f"sweep: built {len(built[mode])} {mode} modules in {elapsed:.2f} s", flush=True)
    for m in (1, 8):
        widths = {mod.in_features for mod in built[modes[0]]}
        inputs = {k: torch.randn(m, k) for k in widths}  # (M, K) per input width
        layer_ms: dict[str, list[float]] = {mode: [] for mode in modes}
        head_ms: dict[str, list[float]] = {mode: [] for mode in modes}
        for i in range(passes):
            for mode in modes if i % 2 == 0 else modes[::-1]:
                *layers, lm_head = built[mode]
                t = time.perf_counter()
                for mod in layers:
                    mod(inputs[mod.in_features])
                layer_ms[mode].append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                lm_head(inputs[lm_head.in_features])
                head_ms[mode].append((time.perf_counter() - t) * 1e3)
        for mode in modes:
            lay, hd = layer_ms[mode], head_ms[mode]
            print(f"sweep M={m} {mode:>10}: {n_layers} layers "
                  f"{statistics.median(lay):7.1f} / {min(lay):7.1f} ms, "
                  f"LM head {statistics.median(hd):6.1f} / {min(hd):6.1f} ms, "
                  f"total {statistics.median(lay) + statistics.median(hd):7.1f} ms (median)", flush=True)


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repack-all", action="store_true", help="also time repacking every linear weight")
    parser.add_argument("--sweep", action="store_true",
                        help="time passes through int4-bf16 modules of the whole model, in layer order "
                             "(weights streamed from memory as in real decoding)")
    parser.add_argument("--only-sweep", action="store_true", help="skip the per-tensor table")
    parser.add_argument("--sweep-modes", default="int4-bf16,dense", help="comma-separated make_linear modes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = GGUFModelFile.open(args.model)
    tensors = model.tensors
    n_layers = sum(1 for name in tensors if name.endswith(".attn_q.weight"))
    # Distinct (role, type, shape) combinations and how often each occurs per token.
    per_token: Counter[tuple[str, str, tuple[int, ...]]] = Counter()
    sample: dict[tuple[str, str, tuple[int, ...]], TensorInfo] = {}
    for i in range(n_layers):
        for role in ROLES:
            info = tensors[f"blk.{i}.{role}.weight"]
            key = (role, info.qtype.name, info.shape)
            per_token[key] += 1
            sample.setdefault(key, info)
    head = tensors.get("output.weight", tensors["token_embd.weight"])
    head_key = ("lm_head", head.qtype.name, head.shape)
    per_token[head_key] += 1
    sample[head_key] = head

    if args.sweep or args.only_sweep:
        sweep(tensors, n_layers, head, tuple(args.sweep_modes.split(",")))
    if args.only_sweep:
        return
    print(f"model {args.model.name}, {n_layers} layers, torch {torch.__version__}, threads {args.threads}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("ms per call, median / min; '-' = not timed")
    paths = ("dense", "int4", "int4-bf16", "bf16-dense")
    header = f"{'tensor':<10}{'type':<6}{'N x K':>14}{'M':>5}" + "".join(f"{p:>20}" for p in paths)
    print(header)
    timings: dict[tuple[str, str, tuple[int, ...]], dict[tuple[str, int], tuple[float, float]]] = {}
    for key in sorted(sample, key=lambda k: (k[0] == "lm_head", k[0], k[1])):
        role, qtype, shape = key
        rows = (1, 8) if role == "lm_head" else ROWS  # only the last prefill row reaches the head
        timings[key] = bench_tensor(sample[key], rows)
        for m in rows:
            cells = []
            for p in paths:
                t = timings[key].get((p, m))
                cells.append(f"{t[0]:9.2f} /{t[1]:8.2f}" if t else f"{'-':>19}")
            label = f"{role:<10}{qtype:<6}{f'{shape[0]}x{shape[1]}':>14}{m:>5}"
            print(label + "".join(f"{c:>20}" for c in cells), flush=True)

    print("\nprojected per-token time of all linear layers (sum of min times x occurrences), ms")
    for m in (1, 8):
        line = [f"M={m}:"]
        for p in paths:
            if any((p, m) not in t for t in timings.values()):
                continue
            total = sum(timings[k][(p, m)][1] * n for k, n in per_token.items())
            line.append(f"{p} {total:8.1f}")
        print("  ".join(line))
    prefill = {p: sum(timings[k][(p, 512)][1] * n for k, n in per_token.items() if k[0] != "lm_head")
               for p in ("dense", "int4-bf16", "bf16-dense")}
    print("prefill, 512-row chunk, layers only (ms per token): "
          + "  ".join(f"{p} {v / 512:.2f}" for p, v in prefill.items()))

    if args.repack_all:
        names = [n for n, t in tensors.items() if len(t.shape) == 2 and n != "token_embd.weight"]
        for mode in ("int4-bf16", "dense"):
            t0, c0 = time.perf_counter(), time.process_time()
            for name in names:
                make_linear(tensors[name], mode=mode)
            print(f"build all {len(names)} linear modules, mode {mode}: {time.perf_counter() - t0:.2f} s "
                  f"(process CPU time {time.process_time() - c0:.2f} s)")


if __name__ == "__main__":
    main()
