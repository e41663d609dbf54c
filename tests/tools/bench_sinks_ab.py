"""A/B cost of the attention sinks in the KV-cache attention kernels on a CUDA GPU:

    python3 tests/tools/bench_sinks_ab.py [--ctx 16384] [--batch 1 16] [--pairs q4_0/q4_0,q8_0/q8_0] \
        [--json FILE]

A = with sinks (f16 copies of the first SINK_TOKENS positions of K and V, as engine.cuda_kv_cache passes
them), B = without (the kernels compile without the sink code then). Decode: the call engine.cuda_kv_cache
makes (max_length and split size of a 32768-position cache, block_n 64), timed by
kernels.bench_kv_attention.time_decode (CUDA graph over cache copies, cold L2; plus the two kernels' own
device times). Prefill: a 512-query chunk at position 0 (every query block's first tile holds the sinks)
and at 4096 (only the first tile of each block does), triton's do_bench. Both run orders (A-B and B-A);
diff = (A - B) / B of the medians. Run on the GPU machine from the repository root.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `python3 tests/tools/bench_sinks_ab.py` from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from engine.cuda_kv_cache import BLOCK_N  # noqa: E402
from engine.kv_cache import SINK_TOKENS  # noqa: E402
from kernels.bench_kv_attention import DIM, ENGINE_CAPACITY, HKV, HQ, _stores, time_decode  # noqa: E402
from kernels.decode_attention import decode_attention, default_split_size  # noqa: E402
from kernels.prefill_attention import prefill_attention  # noqa: E402


def sinks(bsz: int) -> dict[str, torch.Tensor]:
    """k_sink / v_sink (B, Hkv, S, D) float16."""
    make = lambda: torch.randn(bsz, HKV, SINK_TOKENS, DIM, device="cuda").to(torch.float16)
    return {"k_sink": make(), "v_sink": make()}


def decode_arm(arm: str, k_type: str, v_type: str, bsz: int, ctx: int) -> dict:
    split = default_split_size(torch.device("cuda"), HKV, ENGINE_CAPACITY, BLOCK_N)
    impl = functools.partial(decode_attention, **(sinks(bsz) if arm == "A" else {}))
    row = time_decode(impl, k_type, v_type, bsz, ctx, ENGINE_CAPACITY, split_size=split, block_n=BLOCK_N)
    return {**row, "arm": arm}


def prefill_arm(arm: str, k_type: str, v_type: str, start: int, t: int = 512) -> dict:
    ks, vs = _stores(k_type, v_type, 1, start + t)
    q = torch.randn(1, HQ, t, DIM, device="cuda", dtype=torch.float16)  # (1, Hq, T, D)
    kw = sinks(1) if arm == "A" else {}
    ms = do_bench(lambda: prefill_attention(q, ks, vs, start, **kw))
    return {"op": "prefill", "arm": arm, "k": k_type, "v": v_type, "ctx": start, "chunk": t, "us": ms * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ctx", type=int, default=16384)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--pairs", default="q4_0/q4_0,q8_0/q8_0")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    pairs = [tuple(p.split("/")) for p in args.pairs.split(",")]
    rows = []
    for order in ("AB", "BA"):
        for k_type, v_type in pairs:
            for arm in order:
                for bsz in args.batch:
                    rows.append({**decode_arm(arm, k_type, v_type, bsz, args.ctx), "order": order})
                for start in (0, 4096):
                    rows.append({**prefill_arm(arm, k_type, v_type, start), "order": order})
    print(f"{torch.cuda.get_device_name()}; A = sinks, B = none; us per call (decode: graph, split kernel)")
    keys = sorted({(r["op"], r["k"], r["v"], r.get("batch", 1), r["ctx"]) for r in rows})
    for key in keys:
        arms = {}
        for arm in "AB":
            picked = [r for r in rows if (r["op"], r["k"], r["v"], r.get("batch", 1), r["ctx"]) == key
                      and r["arm"] == arm]
            fields = [f for f in ("us", "split_us") if f in picked[0]]
            arms[arm] = {f: statistics.median(r[f] for r in picked) for f in fields}
        line = "  ".join(f"{f} A {arms['A'][f]:.2f} B {arms['B'][f]:.2f} diff "
                         f"{(arms['A'][f] - arms['B'][f]) / arms['B'][f]:+.1%}" for f in arms["A"])
        print(f"{key[0]} {key[1]}/{key[2]} batch {key[3]} ctx {key[4]}: {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
