"""Time speculative-verify attention on a CUDA GPU: R rows over one cache, `verify_attention` (each tile
read once for all rows) against `decode_attention` with the rows as sequences sharing the cache (the
previous path), at Qwen2.5-Coder-1.5B attention shapes (Hq 12, Hkv 2, D 128):

    python -m kernels.bench_verify_attention [--depth 4096 16384] [--rows 4 8 16] [--pairs f16/f16,q4_0/q4_0]
                                             [--capacity 32768]

Each call is timed in a CUDA graph cycling through copies of the cache until 256 MiB were read (cold L2,
as a verify step finds it), with the split the engine uses for a cache of --capacity positions (32768 unless
given), both kernels (split and merge); verify_attention as it chooses for that launch, then each of its
forms ((row, head) pairs 32 or 16 a program in one 2-D tile; packed 16 a warp, with 2, 4 and 8 warps a
program). Every
configuration is timed twice, in the order A, B, ..., then reversed; the table shows both. The one-row
decode at the same depth is timed too (what a verify step is compared with).
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench_cudagraph

from engine import kv_quant
from kernels.decode_attention import decode_attention, default_split_size
from kernels.verify_attention import verify_attention

HQ, HKV, DIM, BLOCK_N = 12, 2, 128, 64
CAPACITY = 32768  # the engine's cache size for these runs: its split size follows from it
COLD_BYTES = 256 << 20


def _cache(k_type: str, v_type: str, positions: int, copies: int) -> list[tuple[kv_quant.KVStore, ...]]:
    out = []
    for _ in range(copies):
        k = torch.randn(1, HKV, positions, DIM, device="cuda")  # (1, Hkv, P, D)
        v = torch.randn(1, HKV, positions, DIM, device="cuda")
        out.append((kv_quant.quantize(k, k_type), kv_quant.quantize(v, v_type)))
    return out


def _sinks(rows: int, quantized: bool) -> torch.Tensor | None:
    if not quantized:
        return None
    return torch.randn(1, HKV, 4, DIM, device="cuda", dtype=torch.float16).expand(rows, -1, -1, -1)


def time_variants(k_type: str, v_type: str, depth: int, n_rows: int, capacity: int = CAPACITY
                  ) -> dict[str, list[float]]:
    """us per call of each variant, A..Z then Z..A."""
    per_copy = sum(kv_quant.allocate(t, (1, HKV, depth), DIM).nbytes() for t in (k_type, v_type))
    copies = max(1, min(32, -(-COLD_BYTES // per_copy)))
    caches = _cache(k_type, v_type, capacity, copies)
    split = default_split_size(torch.device("cuda"), HKV, capacity, BLOCK_N)
    q = torch.randn(n_rows, HQ, DIM, device="cuda", dtype=torch.float16)  # (R, Hq, D)
    out = torch.empty_like(q)
    lengths = torch.arange(depth - n_rows + 1, depth + 1, dtype=torch.int32, device="cuda")  # (R,)
    quantized = (kv_quant.kv_type(k_type).quantized, kv_quant.kv_type(v_type).quantized)
    k_sink, v_sink = _sinks(n_rows, any(quantized)), _sinks(n_rows, any(quantized))
    if not quantized[0]:
        k_sink = None
    common = dict(max_length=capacity, split_size=split, block_n=BLOCK_N, out=out)
    one = dict(max_length=capacity, split_size=split, block_n=BLOCK_N, out=out[:1],
               k_sink=None if k_sink is None else k_sink[:1], v_sink=None if v_sink is None else v_sink[:1])

    def decode_rows():
        for ks, vs in caches:
            decode_attention(q, ks.shared_by(n_rows), vs.shared_by(n_rows), lengths, k_sink=k_sink,
                             v_sink=v_sink, **common)

    def verify(**launch):
        def run():
            for ks, vs in caches:
                verify_attention(q, ks.shared_by(n_rows), vs.shared_by(n_rows), lengths, k_sink=k_sink,
                                 v_sink=v_sink, **launch, **common)
        return run

    def decode_one():
        for ks, vs in caches:
            decode_attention(q[:1], ks, vs, lengths[-1:], **one)

    variants = {"decode 1 row": decode_one, f"rows as sequences ({n_rows})": decode_rows}
    variants["verify_attention, its choice"] = verify()
    for tile in (32, 16):
        variants[f"verify_attention, tile {tile}"] = verify(form="tile", tile_rows=tile)
    for warps in (2, 4, 8):
        variants[f"verify_attention packed, {warps} warps"] = verify(form="packed", warps_per_program=warps)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for order in (list(variants), list(reversed(variants))):
        for name in order:
            times[name].append(do_bench_cudagraph(variants[name]) * 1e3 / copies)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, nargs="+", default=[4096])
    parser.add_argument("--rows", type=int, nargs="+", default=[16])
    parser.add_argument("--pairs", default="f16/f16,q4_0/q4_0")
    parser.add_argument("--capacity", type=int, default=CAPACITY,
                        help="the cache's positions: its split size and split count follow from it")
    args = parser.parse_args()
    split = default_split_size(torch.device("cuda"), HKV, args.capacity)
    print(f"device {torch.cuda.get_device_name()}; split {split} (cache of {args.capacity}); us per call "
          "(both kernels), order A..Z / Z..A", flush=True)
    for pair in args.pairs.split(","):
        k_type, v_type = pair.split("/")
        for depth in args.depth:
            for n_rows in args.rows:
                for name, (a, b) in time_variants(k_type, v_type, depth, n_rows, args.capacity).items():
                    line = f"{pair:10} depth {depth:6d} R {n_rows:2d}  {name:38} {a:8.2f} {b:8.2f}"
                    print(line, flush=True)


if __name__ == "__main__":
    main()
