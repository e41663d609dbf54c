"""Benchmark of kernels.qmatmul on CUDA: GEMV (decode / verify rows) and GEMM (prefill) per GGUF type.

    python -m kernels.bench_qmatmul                     # all types, Qwen2.5-1.5B shapes, table
    python -m kernels.bench_qmatmul --types Q4_K Q6_K   # some types
    python -m kernels.bench_qmatmul --sweep             # launch-parameter sweep (tuning)
    python -m kernels.bench_qmatmul --compile-only      # run every launch once (fills Triton's cache)
    python -m kernels.bench_qmatmul --ab-meta           # plain vs vector-metadata layout, engine GEMVs
    python -m kernels.bench_qmatmul --ab-l2             # engine GEMVs, weight from memory vs from L2
    python -m kernels.bench_qmatmul --ab-split-output   # engine GEMVs, K-splits added by GEMV vs reader
    python -m kernels.bench_qmatmul --sweep-gemv --hot  # the sweep with the weight in L2

GEMV times are per call inside a CUDA graph (as the engine decodes), cycling over enough copies of
the weight that they do not fit in L2 (a decode step reads every weight from memory once). GB/s
is the weight's bytes over that time. GEMM is M = 2048 rows, TFLOP/s = 2 M N K / time. The
baseline is torch F.linear on the same weight dequantized to fp16 (cuBLAS), timed the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys

import torch
import torch.nn.functional as F
import triton
from gguf import GGMLQuantizationType as QT

from engine.gpu_bench import timed_seconds
from engine.quants import BLOCK_TABLE
from kernels.qmatmul import (
    DENSE_TYPES,
    KERNEL_TYPES,
    KernelConfig,
    QuantizedWeight,
    default_gemv_config,
    qmatmul,
)
from kernels.qmatmul_layouts import FIELDS

# Qwen2.5-1.5B linears as (N out, K in): gate/up, down, q/o, k/v, LM head.
SHAPES = [(8960, 1536), (1536, 8960), (1536, 1536), (256, 1536), (151936, 1536)]
GEMV_ROWS = (1, 4, 8, 16)
GEMM_ROWS = 2048
DEVICE = "cuda"
# fp16 fields (byte offsets in a block) of the types not in FIELDS.
_EXTRA_F16_FIELDS = {QT.Q2_K: (80, 82), QT.Q3_K: (108,)}


def random_gguf_bytes(qtype: QT, shape: tuple[int, int], device: str, scale: float = 0.01) -> torch.Tensor:
    """Valid random GGUF bytes for a (N, K) tensor: random quants, finite fp16 scales |d| < scale."""
    n, k = shape
    gen = torch.Generator(device=device).manual_seed(n * 7 + k)
    if qtype in (QT.F16, QT.BF16, QT.F32):
        dtype = {QT.F16: torch.float16, QT.BF16: torch.bfloat16, QT.F32: torch.float32}[qtype]
        w = torch.randn(n, k, device=device, generator=gen) * scale
        return w.to(dtype).view(torch.uint8).reshape(-1)
    block_elems, block_bytes = BLOCK_TABLE[qtype]
    blocks = torch.randint(0, 256, (n * k // block_elems, block_bytes), device=device, dtype=torch.uint8,
                           generator=gen)
    if qtype in FIELDS:
        offsets = [f.start for f in FIELDS[qtype] if f.dtype == torch.float16]
    else:
        offsets = list(_EXTRA_F16_FIELDS[qtype])
    for off in offsets:
        vals = (torch.rand(blocks.shape[0], device=device, generator=gen) * 2 - 1) * scale
        blocks[:, off : off + 2] = vals.to(torch.float16).view(torch.uint8).reshape(-1, 2)
    return blocks.reshape(-1)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _copies_for(nbytes: int, l2_bytes: int, cap: int = 512) -> int:
    """Copies so that cycling through them reads at least 4x the L2 size from memory."""
    return max(1, min(cap, math.ceil(4 * l2_bytes / max(nbytes, 1))))


def _time_graph(fn, reps: int = 10) -> float:
    """Seconds per replay of a CUDA graph of fn(), median of `reps` timed replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm (compiles outside the capture)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def _time_eager(fn, reps: int = 10) -> float:
    return statistics.median(timed_seconds(fn, reps))


def copy_bandwidth(device: str) -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * (1 << 30) / _time_eager(lambda: dst.copy_(src)) / 1e9


def gemv_time(weights: list[QuantizedWeight], m: int, config: KernelConfig | None = None,
              split_output: bool = False) -> float:
    """Seconds per qmatmul call of m rows (graph, cycling over the weight copies); split_output: the GEMV
    alone, leaving its K-split partials (kernels/split_output.py)."""
    k = weights[0].shape[1]
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    calls = lambda: [qmatmul(x, w, config=config, split_output=split_output) for w in weights]  # noqa: E731
    return _time_graph(calls) / len(weights)


def dense_gemv_time(dense: list[torch.Tensor], m: int) -> float:
    x = torch.randn(m, dense[0].shape[1], device=DEVICE, dtype=torch.float16)
    return _time_graph(lambda: [F.linear(x, w) for w in dense]) / len(dense)


def gemm_tflops(fn, m: int, n: int, k: int) -> float:
    return 2 * m * n * k / _time_eager(fn) / 1e12


def _gemm_pair(w: QuantizedWeight, dense: torch.Tensor) -> tuple[float, float]:
    """TFLOP/s of qmatmul and of F.linear on the fp16 weight, M = GEMM_ROWS."""
    n, k = w.shape
    x = torch.randn(GEMM_ROWS, k, device=DEVICE, dtype=torch.float16)
    return (gemm_tflops(lambda: qmatmul(x, w), GEMM_ROWS, n, k),
            gemm_tflops(lambda: F.linear(x, dense), GEMM_ROWS, n, k))


def _gemm_config_tflops(w: QuantizedWeight, x: torch.Tensor, cfg: KernelConfig) -> float:
    n, k = w.shape
    return gemm_tflops(lambda: qmatmul(x, w, config=cfg), x.shape[0], n, k)


HOT_CALLS = 8  # calls of the one weight per graph when it stays in L2 (`hot`)


def _weights(qtype: QT, shape, l2_bytes: int, vector_meta: bool | None = None, hot: bool = False
             ) -> list[QuantizedWeight]:
    """Enough copies of one random weight to miss L2 when cycled; vector_meta: its layout (None: default).
    hot: the one weight HOT_CALLS times instead (it stays in L2 between the calls)."""
    raw = random_gguf_bytes(qtype, shape, DEVICE)
    first = QuantizedWeight.from_bytes(raw, qtype, shape, DEVICE, vector_meta=vector_meta)
    if hot:
        return [first] * HOT_CALLS
    n_copies = _copies_for(first.nbytes, l2_bytes)
    return [first] + [QuantizedWeight.from_bytes(raw, qtype, shape, DEVICE, vector_meta=vector_meta)
                      for _ in range(n_copies - 1)]


def bench_type(qtype: QT, shapes, l2_bytes: int, compile_only: bool) -> list[dict]:
    rows = []
    for shape in shapes:
        n, k = shape
        if compile_only:
            w = QuantizedWeight.from_bytes(random_gguf_bytes(qtype, shape, DEVICE), qtype, shape, DEVICE)
            x1 = torch.randn(1, k, device=DEVICE, dtype=torch.float16)
            qmatmul(x1, w)
            qmatmul(x1, w, config=dataclasses.replace(w.gemv_config, fast=False))
            qmatmul(torch.randn(GEMM_ROWS, k, device=DEVICE, dtype=torch.float16), w)
            _sync()
            continue
        weights = _weights(qtype, shape, l2_bytes)
        w = weights[0]
        row = {"type": qtype.name, "shape": f"{n}x{k}", "MB": w.nbytes / 1e6, "copies": len(weights)}
        for m in GEMV_ROWS:
            row[f"t{m}"] = gemv_time(weights, m)
        row["GBps"] = w.nbytes / row["t1"] / 1e9
        row["t1_portable"] = gemv_time(weights, 1, dataclasses.replace(w.gemv_config, fast=False))
        dense0 = w.dequantize().to(torch.float16)  # (N, K)
        dense = [dense0] + [dense0.clone() for _ in range(_copies_for(dense0.numel() * 2, l2_bytes, 16) - 1)]
        row["torch_t1"] = dense_gemv_time(dense, 1)
        row["tflops"], row["torch_tflops"] = _gemm_pair(w, dense0)
        rows.append(row)
        print(_format_row(row), flush=True)
        weights = dense = dense0 = None  # free before the next shape
        torch.cuda.empty_cache()
    return rows


HEADER = (f"{'type':<6} {'N x K':>12} {'MB':>7} | {'M=1 us':>7} {'GB/s':>6} {'M=4':>6} {'M=8':>6} "
          f"{'M=16':>6} {'16/1':>5} {'f32 M=1':>7} | {'torch M=1':>9} | {'GEMM TF/s':>9} {'torch TF/s':>10}")


def _format_row(r: dict) -> str:
    return (f"{r['type']:<6} {r['shape']:>12} {r['MB']:7.2f} | {r['t1'] * 1e6:7.2f} {r['GBps']:6.0f} "
            f"{r['t4'] * 1e6:6.2f} {r['t8'] * 1e6:6.2f} {r['t16'] * 1e6:6.2f} {r['t16'] / r['t1']:5.2f} "
            f"{r['t1_portable'] * 1e6:7.2f} | "
            f"{r['torch_t1'] * 1e6:9.2f} | {r['tflops']:9.1f} {r['torch_tflops']:10.1f}")


# ---------------------------------------------------------------------------------------------
# Sweep of launch parameters (tuning)

SWEEP_TYPES = [QT.Q4_0, QT.Q8_0, QT.Q4_K, QT.Q6_K]
SWEEP_SHAPES = [(8960, 1536), (1536, 8960), (151936, 1536)]
GEMV_SWEEP = [  # (block_n, block_k, programs_per_sm, num_warps, num_stages)
    (64, 128, 4, 4, 2), (64, 128, 2, 4, 3), (64, 128, 8, 4, 2), (128, 128, 4, 4, 2), (128, 128, 2, 4, 3),
    (64, 256, 4, 4, 2),
]
GEMM_SWEEP = [  # (block_m, block_n, block_k, num_warps, num_stages)
    (128, 128, 128, 8, 3), (128, 128, 128, 4, 3), (128, 64, 128, 4, 3), (128, 256, 128, 8, 3),
    (64, 128, 128, 4, 3),
]


def sweep(l2_bytes: int, compile_only: bool, types=SWEEP_TYPES) -> None:
    for qtype in types:
        for shape in SWEEP_SHAPES:
            n, k = shape
            if compile_only:
                raw = random_gguf_bytes(qtype, shape, DEVICE)
                weights = [QuantizedWeight.from_bytes(raw, qtype, shape, DEVICE)]
            else:
                weights = _weights(qtype, shape, l2_bytes)
            cells = []
            for bn, bk, pps, nw, ns in GEMV_SWEEP:
                cfg = default_gemv_config(qtype, shape, DEVICE, block_n=bn, block_k=bk, programs_per_sm=pps,
                                          num_warps=nw, num_stages=ns)
                if compile_only:
                    qmatmul(torch.randn(1, k, device=DEVICE, dtype=torch.float16), weights[0], config=cfg)
                    continue
                t1, t16 = gemv_time(weights, 1, cfg), gemv_time(weights, 16, cfg)
                gbps = weights[0].nbytes / t1 / 1e9
                cells.append(f"bn{bn} bk{bk} pps{pps} w{nw} s{ns} split{cfg.split_k}: "
                             f"{t1 * 1e6:.2f}/{t16 * 1e6:.2f} us {gbps:.0f} GB/s")
            if shape[0] != 151936:
                x = torch.randn(GEMM_ROWS, k, device=DEVICE, dtype=torch.float16)
                for bm, bn, bk, nw, ns in GEMM_SWEEP:
                    cfg = KernelConfig(block_n=bn, block_m=bm, block_k=bk, split_k=1, num_warps=nw,
                                       num_stages=ns)
                    try:
                        if compile_only:
                            qmatmul(x[:128], weights[0], config=cfg)
                            continue
                        tf = _gemm_config_tflops(weights[0], x, cfg)
                        cells.append(f"GEMM bm{bm} bn{bn} bk{bk} w{nw} s{ns}: {tf:.0f} TF/s")
                    except Exception as exc:  # out of shared memory and the like: report and go on
                        cells.append(f"GEMM bm{bm} bn{bn} bk{bk} w{nw} s{ns}: failed {type(exc).__name__}")
            _sync()
            if not compile_only:
                print(f"sweep {qtype.name} {n}x{k}:\n  " + "\n  ".join(cells), flush=True)
            del weights
            torch.cuda.empty_cache()


# The GEMVs of a Qwen2.5-1.5B Q4_K_M decode step as the engine launches them: fused gate/up (17920 x 1536)
# and Q/K (1792 x 1536), V (Q6_K), the output projection, FFN-down (Q4_K or Q6_K), the LM head; plus
# the unfused 8960 x 1536 and a Q4_0 shape.
GEMV_KERNEL_SHAPES = [(QT.Q4_K, (17920, 1536)), (QT.Q4_K, (1792, 1536)), (QT.Q4_K, (8960, 1536)),
                      (QT.Q4_K, (1536, 8960)), (QT.Q6_K, (1536, 8960)), (QT.Q4_K, (1536, 1536)),
                      (QT.Q6_K, (256, 1536)), (QT.Q4_0, (8960, 1536)), (QT.Q6_K, (151936, 1536))]
GEMV_KERNEL_SWEEP = [  # (block_n, block_k, programs_per_sm, num_warps, num_stages)
    (64, 128, 4, 4, 2), (64, 128, 2, 4, 2), (64, 128, 8, 4, 2), (64, 128, 12, 4, 2), (64, 128, 8, 4, 3),
    (128, 128, 4, 4, 3), (128, 128, 8, 4, 2), (64, 128, 4, 4, 3), (64, 128, 2, 4, 3),
    # deeper pipelines, untimed so far: with the metadata loads now cp.async (vector layout) every byte of
    # a K-tile can be in flight stages ahead; compiled for sm_90 with Triton 3.6 without spills (Q4_K / Q6_K:
    # block_k 256 108-128 registers, 4 CTAs an SM; 4 stages 67-80 registers, 35-37 KB shared, 6 CTAs an SM)
    (64, 256, 4, 4, 2), (64, 256, 2, 4, 3), (64, 128, 4, 4, 4), (64, 128, 2, 4, 4),
    # other warp counts (session 6, Triton 3.6 sm_90 SASS of the gate/up K loop): 8 warps = two warpgroups,
    # wgmma 64x8 from shared memory, 2 waits instead of 8, 5 CTA barriers instead of 9; 2 warps = mma.sync
    # (no wgmma waits, 9 barriers)
    (64, 128, 8, 8, 2), (128, 128, 8, 8, 2), (64, 128, 4, 8, 3), (64, 128, 16, 8, 2),
    (32, 128, 8, 2, 2), (32, 128, 16, 2, 2), (64, 128, 8, 2, 2),
]


def sweep_gemv_kernels(l2_bytes: int, rows=(1, 16), hot: bool = False, split_output: bool = False) -> None:
    """GEMV launch parameters (split of K, tile sizes, stages) per shape of a Qwen2.5-1.5B layer;
    hot: with the weight in L2; split_output: the GEMV leaving its split partials (as the engine's decode
    step launches it, kernels/split_output.py; the reader's share is not in these times)."""
    for qtype, shape in GEMV_KERNEL_SHAPES:
        weights = _weights(qtype, shape, l2_bytes, hot=hot)
        lines = []
        for bn, bk, pps, nw, ns in GEMV_KERNEL_SWEEP:
            cfg = default_gemv_config(qtype, shape, DEVICE, block_n=bn, block_k=bk, programs_per_sm=pps,
                                      num_warps=nw, num_stages=ns)
            try:
                times = [gemv_time(weights, m, cfg, split_output) * 1e6 for m in rows]
            except Exception as exc:  # out of resources and the like: report and go on
                lines.append(f"bn{bn} bk{bk} pps{pps} w{nw} s{ns}: failed {type(exc).__name__}")
                continue
            gbps = weights[0].nbytes / times[0] / 1e3
            cells = " ".join(f"M{m}={t:6.2f}" for m, t in zip(rows, times, strict=True))
            lines.append(f"bn{bn:<3} bk{bk} pps{pps:<2} w{nw} s{ns} split{cfg.split_k:<3}: {cells} us  "
                         f"{gbps:5.0f} GB/s")
        print(f"gemv {qtype.name} {shape[0]}x{shape[1]} ({weights[0].nbytes / 1e6:.2f} MB):\n  "
              + "\n  ".join(lines), flush=True)
        del weights
        torch.cuda.empty_cache()


def _ab_two(names: tuple[str, str], weights_for, time_for, rows=(1, 16), shapes=None, note=None) -> None:
    """An A/B per shape (GEMV_KERNEL_SHAPES unless given) in the order A, B, B, A. weights_for(qtype,
    shape, b): the weight list of side b (False = A); time_for(weights, m, b): seconds per call;
    note(sets): an extra word on the shape's line (run before the timing). Prints us per call (mean of the
    two runs, then each run's M = rows[0] figure), B / A, and the sums over the shapes."""
    totals = {False: [0.0] * len(rows), True: [0.0] * len(rows)}
    for qtype, shape in shapes or GEMV_KERNEL_SHAPES:
        sets = {side: weights_for(qtype, shape, side) for side in (False, True)}
        extra = f"; {note(sets)}" if note else ""
        times: dict[bool, list[list[float]]] = {False: [], True: []}
        for side in (False, True, True, False):
            times[side].append([time_for(sets[side], m, side) * 1e6 for m in rows])
        lines, means = [], {}
        for side, runs in times.items():
            means[side] = [statistics.mean(r[i] for r in runs) for i in range(len(rows))]
            totals[side] = [a + b for a, b in zip(totals[side], means[side], strict=True)]
            cells = " ".join(f"M{m}={t:6.2f}" for m, t in zip(rows, means[side], strict=True))
            spread = " ".join(f"{r[0]:.2f}" for r in runs)
            gbps = sets[side][0].nbytes / means[side][0] / 1e3
            lines.append(f"{names[side]:8}: {cells} us ({spread}) {gbps:5.0f} GB/s")
        ratio = " ".join(f"M{m} {means[True][i] / means[False][i]:.3f}" for i, m in enumerate(rows))
        cfg = sets[True][0].gemv_config
        mb = sets[True][0].nbytes / 1e6
        title = (f"gemv {qtype.name} {shape[0]}x{shape[1]} bn{cfg.block_n} w{cfg.num_warps} "
                 f"s{cfg.num_stages} split{cfg.split_k} prefetch {cfg.prefetch} ({mb:.2f} MB)")
        print(title + ":\n  " + "\n  ".join(lines) + f"\n  {names[True]} / {names[False]}: {ratio}{extra}",
              flush=True)
        del sets
        torch.cuda.empty_cache()
    cells = " ".join(f"M{m}: {names[False]} {totals[False][i]:.1f} {names[True]} {totals[True][i]:.1f} us"
                     for i, m in enumerate(rows))
    print(f"sum over the shapes above (one of each): {cells}", flush=True)


def ab_l2(l2_bytes: int) -> None:
    """The default GEMV launch with its weight read from memory (copies cycled) and from L2 (one weight,
    called again and again), per shape of a Qwen2.5-1.5B decode step: what keeping weights in L2 could win
    at most per GEMV (session 6: nothing; kernels/README.md)."""
    _ab_two(("memory", "L2"), lambda qtype, shape, hot: _weights(qtype, shape, l2_bytes, hot=hot),
            lambda weights, m, hot: gemv_time(weights, m))


def ab_split_output(l2_bytes: int) -> None:
    """The default GEMV launch adding its K-splits itself (last program of a column tile, after an atomic)
    and leaving them as partials (split_output; the reader's extra loads are not in these times), per
    shape of a Qwen2.5-1.5B decode step."""
    _ab_two(("epilogue", "partials"), lambda qtype, shape, split: _weights(qtype, shape, l2_bytes),
            lambda weights, m, split: gemv_time(weights, m, split_output=split))


PREFETCH_VARIANTS = [(False, False), (True, False), (False, True), (True, True)]  # (prefetch, pdl)


def ab_prefetch(l2_bytes: int, rows=(1, 16)) -> None:
    """The default GEMV launch with and without the L2 prefetch and PDL (kernels/qmatmul_prefetch.py),
    per shape of a Qwen2.5-1.5B layer; the variants run in one order, then in the reverse order."""
    for qtype, shape in GEMV_KERNEL_SHAPES:
        weights = _weights(qtype, shape, l2_bytes)
        base = weights[0].gemv_config
        order = PREFETCH_VARIANTS + PREFETCH_VARIANTS[::-1]
        times: dict[tuple[bool, bool], list[list[float]]] = {v: [] for v in PREFETCH_VARIANTS}
        for prefetch, pdl in order:
            cfg = dataclasses.replace(base, prefetch=prefetch, pdl=pdl)
            times[(prefetch, pdl)].append([gemv_time(weights, m, cfg) * 1e6 for m in rows])
        lines = []
        for (prefetch, pdl), runs in times.items():
            cells = " ".join(f"M{m}={statistics.mean(r[i] for r in runs):6.2f}" for i, m in enumerate(rows))
            spread = " ".join(f"{r[0]:.2f}" for r in runs)
            gbps = weights[0].nbytes / statistics.mean(r[0] for r in runs) / 1e3
            lines.append(f"prefetch {prefetch!s:5} pdl {pdl!s:5}: {cells} us ({spread}) {gbps:5.0f} GB/s")
        mb = weights[0].nbytes / 1e6
        title = f"gemv {qtype.name} {shape[0]}x{shape[1]} split{base.split_k} ({mb:.2f} MB)"
        print(title + ":\n  " + "\n  ".join(lines), flush=True)
        del weights
        torch.cuda.empty_cache()


# The GEMVs of a Qwen2.5-1.5B Q4_K_M decode step whose metadata layout changes (Q4_K, Q6_K): fused Q/K,
# fused gate/up, output projection, FFN-down (Q4_K and Q6_K layers), V, LM head.
META_AB_SHAPES = [(QT.Q4_K, (1792, 1536)), (QT.Q4_K, (17920, 1536)), (QT.Q4_K, (1536, 1536)),
                  (QT.Q4_K, (1536, 8960)), (QT.Q4_K, (256, 1536)), (QT.Q6_K, (1536, 8960)),
                  (QT.Q6_K, (256, 1536)), (QT.Q6_K, (151936, 1536))]


def ab_meta(l2_bytes: int) -> None:
    """The default GEMV launch on the same weight in the plain layout and in the vector-metadata one
    (kernels/qmatmul_layouts.py: metadata loads pipelined as cp.async; Q4_K with its precomputed scales),
    per shape of a Qwen2.5-1.5B decode step. Both layouts give the same bits (GPU test; checked here too)."""

    def same_bits(sets) -> str:
        vector, plain = sets[True][0], sets[False][0]
        assert vector.vector_meta and not plain.vector_meta
        x16 = torch.randn(16, plain.shape[1], device=DEVICE, dtype=torch.float16)
        return f"same bits (M=16): {torch.equal(qmatmul(x16, vector), qmatmul(x16, plain))}"

    _ab_two(("plain", "vector"), lambda qtype, shape, vec: _weights(qtype, shape, l2_bytes, vector_meta=vec),
            lambda weights, m, vec: gemv_time(weights, m), shapes=META_AB_SHAPES, note=same_bits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="*", default=None, help="GGUF type names (default: all)")
    parser.add_argument("--sweep", action="store_true", help="sweep launch parameters instead")
    parser.add_argument("--compile-only", action="store_true", help="run each launch once, no timing")
    parser.add_argument("--probe", nargs=4, metavar=("TYPE", "N", "K", "M"), default=None,
                        help="just run one qmatmul shape 20 times (for a profiler such as ncu)")
    parser.add_argument("--sweep-gemv", action="store_true",
                        help="GEMV launch parameters on the shapes of a Qwen2.5-1.5B layer")
    parser.add_argument("--ab-prefetch", action="store_true",
                        help="default GEMV with / without the L2 prefetch and programmatic dependent launch")
    parser.add_argument("--hot", action="store_true",
                        help="with --sweep-gemv: the weight stays in L2 (one copy, called again and again)")
    parser.add_argument("--split-output", action="store_true",
                        help="with --sweep-gemv: GEMVs leave their K-split partials (as in engine steps)")
    parser.add_argument("--ab-l2", action="store_true",
                        help="default GEMV on engine shapes, weight read from memory vs from L2")
    parser.add_argument("--ab-split-output", action="store_true",
                        help="default GEMV on engine shapes, adding its K-splits vs leaving them to a reader")
    parser.add_argument("--ab-meta", action="store_true",
                        help="default GEMV, plain vs vector-metadata layout (Q4_K / Q6_K engine shapes)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_qmatmul needs a CUDA device", file=sys.stderr)
        return 2
    types = [QT[t] for t in args.types] if args.types else list(KERNEL_TYPES + DENSE_TYPES[:2])
    props = torch.cuda.get_device_properties(0)
    l2_bytes = props.L2_cache_size
    if args.probe:
        qtype, n, k, m = QT[args.probe[0]], *(int(v) for v in args.probe[1:])
        w = QuantizedWeight.from_bytes(random_gguf_bytes(qtype, (n, k), DEVICE), qtype, (n, k), DEVICE)
        x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
        for _ in range(20):
            qmatmul(x, w)
        _sync()
        return 0
    device = (f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2_bytes >> 20} MiB, "
              f"torch {torch.__version__}, triton {triton.__version__}")
    for flag, ab in (("ab_meta", ab_meta), ("ab_split_output", ab_split_output), ("ab_l2", ab_l2),
                     ("ab_prefetch", ab_prefetch)):
        if getattr(args, flag):
            print(device, flush=True)
            ab(l2_bytes)
            return 0
    if args.sweep_gemv:
        print(f"{device}; copy bandwidth {copy_bandwidth('cuda'):.0f} GB/s", flush=True)
        sweep_gemv_kernels(l2_bytes, hot=args.hot, split_output=args.split_output)
        return 0
    if args.sweep:
        chosen = [t for t in types if t in SWEEP_TYPES] if args.types else SWEEP_TYPES
        sweep(l2_bytes, args.compile_only, chosen)
        return 0
    if not args.compile_only:
        print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2_bytes >> 20} MiB, "
              f"torch {torch.__version__}; copy bandwidth {copy_bandwidth('cuda'):.0f} GB/s", flush=True)
        print(HEADER, flush=True)
    rows = []
    for qtype in types:
        rows += bench_type(qtype, SHAPES, l2_bytes, args.compile_only)
    if rows:
        print("\n" + HEADER)
        for r in rows:
            print(_format_row(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
