"""Time the KV-cache kernels at Qwen2.5-Coder-1.5B attention shapes (12 query heads, 2 KV heads,
head_dim 128) on a CUDA GPU:

    python -m kernels.bench_kv_attention [--ctx 16384] [--batch 1 16] [--sweep] [--json FILE]

Decode attention (one query per sequence, context L, B sequences) is timed three ways:
- `us`: a CUDA graph that runs the call on enough copies of the cache to miss L2 (so K/V come from
  device memory), divided by the copies: what a decode step pays, both kernels and the gap between them;
- `split_us` / `reduce_us`: the two kernels' own device times (profiler), same cold-L2 setup;
- bandwidth = bytes of K/V read ([0, L) of each sequence's KV heads, scales included) / time, next to
  the device-to-device copy bandwidth measured in the same run ((read + write) / time) and the
  device's spec sheet figure.
`--sweep` times every (block_n, num_warps, num_stages, split_size) of a grid; `--impl mod:fn` times
another implementation with the same call signature (e.g. a saved copy of an earlier kernel).
Without `--decode-only` it also times prefill-chunk attention (512 queries after 4096 positions) and
the K / V writes of 512 tokens (K with the rotation and without it, CUDA graph).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import statistics

import torch
from triton.testing import do_bench, do_bench_cudagraph

from engine import hadamard, kv_quant
from kernels.decode_attention import decode_attention, default_split_size
from kernels.k_write import k_write
from kernels.prefill_attention import prefill_attention
from kernels.v_write import v_write

log = logging.getLogger(__name__)

HQ, HKV, DIM = 12, 2, 128
PAIRS = [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q4_1", "q4_1"), ("q4_0", "q8_0")]
COLD_BYTES = 256 << 20  # the graph cycles through cache copies until it has read this much (L2: 50-60 MiB)
SPEC_GB_PER_S = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 NVL": 3900, "H100 PCIe": 2000}
SWEEP = {  # batch -> (block_n, num_warps, num_stages, maxnreg) configs x split sizes
    1: {"configs": [(32, 1, 3, None), (64, 2, 3, None), (64, 4, 3, None), (128, 4, 3, None)],
        "splits": [64, 128, 256]},
    16: {"configs": [(32, 1, 3, None), (64, 1, 3, None), (64, 2, 3, None), (64, 4, 3, None)],
         "splits": [256, 512, 1024]},
}
ENGINE_CAPACITY = 32768  # --engine rows: the call engine.cuda_kv_cache makes for a cache of this size


def spec_bandwidth(name: str) -> float | None:
    """The spec sheet's memory bandwidth in GB/s for a known device name, else None."""
    for key, gbps in SPEC_GB_PER_S.items():
        if key in name:
            return gbps
    return None


def copy_bandwidth(n_bytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy in GB/s counting bytes read + written, median of `reps` after warm-up."""
    src = torch.randint(0, 255, (n_bytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n_bytes / statistics.median(times) / 1e9


def _stores(k_type: str, v_type: str, bsz: int, positions: int) -> tuple[kv_quant.KVStore, kv_quant.KVStore]:
    k = torch.randn(bsz, HKV, positions, DIM, device="cuda")  # (B, Hkv, P, D)
    ks = kv_quant.quantize(k, k_type)
    del k
    v = torch.randn(bsz, HKV, positions, DIM, device="cuda")  # (B, Hkv, P, D)
    return ks, kv_quant.quantize(v, v_type)


def _bytes_per_position(k_type: str, v_type: str) -> int:
    """K + V bytes of one position of one KV head (values, scales, mins)."""
    return sum(kv_quant.allocate(t, (1, 1, 1), DIM).nbytes() for t in (k_type, v_type))


def _kernel_times_us(fn, names: tuple[str, ...], rounds: int = 5) -> dict[str, float]:
    """Mean device time of each named kernel over `rounds` calls of fn (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            fn()
        torch.cuda.synchronize()
    out = {}
    for name in names:
        total, count = 0.0, 0
        for evt in prof.key_averages():
            if name in evt.key:
                total += evt.device_time_total
                count += evt.count
        out[name] = total / count if count else float("nan")
    return out


def time_decode(impl, k_type: str, v_type: str, bsz: int, ctx: int, capacity: int | None = None,
                **kw) -> dict:
    """One decode configuration, cold L2: graph time per call and the kernels' device times.
    capacity: the stores' positions and the call's max_length (default ctx)."""
    capacity = capacity or ctx
    read = _bytes_per_position(k_type, v_type) * bsz * HKV * ctx
    copies = max(1, min(64, -(-COLD_BYTES // read)))
    stores = [_stores(k_type, v_type, bsz, capacity)]
    for _ in range(copies - 1):
        ks, vs = stores[0]
        stores.append(tuple(kv_quant.KVStore(s.kv_type, s.qs.clone(), None if s.d is None else s.d.clone(),
                                             None if s.m is None else s.m.clone()) for s in (ks, vs)))
    q = torch.randn(bsz, HQ, DIM, device="cuda", dtype=torch.float16)  # (B, Hq, D)
    out = torch.empty_like(q)
    lengths = torch.full((bsz,), ctx, dtype=torch.int32, device="cuda")

    def run_all() -> None:
        for ks, vs in stores:
            impl(q, ks, vs, lengths, max_length=capacity, out=out, **kw)

    us = do_bench_cudagraph(run_all) * 1e3 / copies
    kernels = _kernel_times_us(run_all, ("_decode_split_kernel", "_decode_reduce_kernel"))
    split_us = kernels["_decode_split_kernel"]
    reduce_us = kernels["_decode_reduce_kernel"]
    stores.clear()
    torch.cuda.empty_cache()
    return {"op": "decode", "k": k_type, "v": v_type, "batch": bsz, "ctx": ctx, "capacity": capacity, **kw,
            "kv_MB": round(read / 1e6, 2), "us": round(us, 2), "split_us": round(split_us, 2),
            "reduce_us": round(reduce_us, 2), "GB_per_s": round(read / us / 1e3, 1),
            "split_GB_per_s": round(read / split_us / 1e3, 1)}


def time_prefill_and_writes(pairs: list[tuple[str, str]]) -> list[dict]:
    rows = []
    rot = hadamard.make_rotation(DIM).to("cuda")
    start, t = 4096, 512
    for k_type, v_type in pairs:
        ks, vs = _stores(k_type, v_type, 1, start + t)
        q = torch.randn(1, HQ, t, DIM, device="cuda", dtype=torch.float16)  # (1, Hq, T, D)
        ms = do_bench(lambda ks=ks, vs=vs, q=q: prefill_attention(q, ks, vs, start))
        flops = 4 * HQ * t * (start + t / 2) * DIM
        knew = torch.randn(1, HKV, t, DIM, device="cuda", dtype=torch.float16)  # (1, Hkv, T, D)
        row = {"op": "prefill", "ctx": start, "chunk": t, "k": k_type, "v": v_type, "ms": round(ms, 4),
               "TFLOP_per_s": round(flops / (ms / 1e3) / 1e12, 1)}
        if kv_quant.kv_type(k_type).quantized:
            kw_rot = do_bench_cudagraph(lambda ks=ks, knew=knew: k_write(knew, ks, start, rotation=rot))
            row["k_write_rot_us"] = round(kw_rot * 1e3, 2)
        kw = do_bench_cudagraph(lambda ks=ks, knew=knew: k_write(knew, ks, start, rotation=None))
        row["k_write_us"] = round(kw * 1e3, 2)
        vw = do_bench_cudagraph(lambda vs=vs, knew=knew: v_write(knew, vs, start))
        row["v_write_us"] = round(vw * 1e3, 2)
        rows.append(row)
    return rows


def _load_impl(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or "decode_attention")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, nargs="+", default=[16384])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--pairs", default=",".join(f"{k}/{v}" for k, v in PAIRS),
                        help="K/V type pairs, e.g. q4_0/q4_0,f16/f16")
    parser.add_argument("--sweep", action="store_true", help="time the SWEEP grid of launch parameters")
    parser.add_argument("--engine", action="store_true",
                        help="batch 1 also as the engine calls it (max_length ENGINE_CAPACITY, its split)")
    parser.add_argument("--impl", default=None, help="module:function to time instead (baseline copies)")
    parser.add_argument("--decode-only", action="store_true")
    parser.add_argument("--prefill-only", action="store_true", help="only the prefill attention and writes")
    parser.add_argument("--json", default=None, help="also write every row to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    pairs = [tuple(p.split("/")) for p in args.pairs.split(",")]
    impl = _load_impl(args.impl) if args.impl else decode_attention
    split_rule = getattr(importlib.import_module(impl.__module__), "default_split_size", default_split_size)
    name = torch.cuda.get_device_name()
    copy = copy_bandwidth()
    spec = spec_bandwidth(name)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device {name}, {sms} SMs; copy bandwidth {copy:.0f} GB/s (read + write); "
          f"spec {spec or '?'} GB/s; impl {args.impl or 'kernels.decode_attention'}", flush=True)
    rows = []
    for ctx in [] if args.prefill_only else args.ctx:
        for bsz in args.batch:
            for k_type, v_type in pairs:
                grid = [{}]
                if args.sweep:
                    plan = SWEEP.get(bsz, SWEEP[16])
                    grid = [dict(block_n=bn, num_warps=nw, num_stages=ns, maxnreg=reg, split_size=sp)
                            for bn, nw, ns, reg in plan["configs"] for sp in plan["splits"] if sp % bn == 0]
                    if args.impl:  # another implementation takes only the sizes
                        grid = [{k: kw[k] for k in ("block_n", "num_warps", "split_size")}
                                for kw in grid if kw["maxnreg"] is None]
                if args.engine and bsz == 1:
                    split = split_rule(torch.device("cuda"), HKV, ENGINE_CAPACITY, 64)
                    grid.append({"capacity": ENGINE_CAPACITY, "block_n": 64, "split_size": split})
                for kw in grid:
                    try:
                        row = time_decode(impl, k_type, v_type, bsz, ctx, **kw)
                    except Exception as e:  # a sweep point that does not compile or fit: say so, go on
                        what = f"decode {k_type}/{v_type} B={bsz} L={ctx} {kw}"
                        print(f"{what}: FAILED {type(e).__name__}: {e}", flush=True)
                        continue
                    row["pct_of_copy"] = round(100 * row["GB_per_s"] / copy, 1)
                    row["pct_of_spec"] = round(100 * row["GB_per_s"] / spec, 1) if spec else None
                    row["split_pct_of_spec"] = round(100 * row["split_GB_per_s"] / spec, 1) if spec else None
                    rows.append(row)
                    print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if not args.decode_only:
        for row in time_prefill_and_writes(pairs):
            rows.append(row)
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            result = {"device": name, "copy_GB_per_s": copy, "spec_GB_per_s": spec, "rows": rows}
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
