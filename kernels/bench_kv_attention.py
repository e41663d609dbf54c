"""Time the KV-cache kernels at Qwen2.5-Coder-1.5B attention shapes (12 query heads, 2 KV heads,
head_dim 128) on a CUDA GPU:  python -m kernels.bench_kv_attention [--json]

Prints, per K/V type pair: decode attention (one query, context L; CUDA-graph timing, so launch
overhead excluded) and the effective bandwidth of the K/V bytes it reads, next to torch SDPA over an
f16 cache; prefill-chunk attention (512 queries after a 4096-token prefix); K and V writes of 512
tokens (CUDA-graph timing).
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
from triton.testing import do_bench, do_bench_cudagraph

from engine import hadamard, kv_quant
from kernels.decode_attention import decode_attention
from kernels.k_write import k_write
from kernels.prefill_attention import prefill_attention
from kernels.v_write import v_write

log = logging.getLogger(__name__)

HQ, HKV, DIM = 12, 2, 128
PAIRS = [
    ("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q4_1", "q4_1"), ("q4_0", "q8_0"), ("q8_0", "f16"),
]


def _stores(k_type: str, v_type: str, positions: int) -> tuple[kv_quant.KVStore, kv_quant.KVStore]:
    k = torch.randn(1, HKV, positions, DIM, device="cuda")  # (1, Hkv, P, D)
    v = torch.randn(1, HKV, positions, DIM, device="cuda")  # (1, Hkv, P, D)
    return kv_quant.quantize(k, k_type), kv_quant.quantize(v, v_type)


def run(contexts: list[int]) -> list[dict]:
    rows = []
    rot = hadamard.make_rotation(DIM).to("cuda")
    for ctx in contexts:
        q = torch.randn(1, HQ, DIM, device="cuda", dtype=torch.float16)  # (1, Hq, D)
        kf = torch.randn(1, HKV, ctx, DIM, device="cuda", dtype=torch.float16)  # (1, Hkv, L, D)

        def sdpa(q=q, kf=kf):
            return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kf, kf, enable_gqa=True)

        sdpa_us = do_bench_cudagraph(sdpa) * 1e3
        for k_type, v_type in PAIRS:
            ks, vs = _stores(k_type, v_type, ctx)
            us = do_bench_cudagraph(lambda ks=ks, vs=vs, q=q, ctx=ctx: decode_attention(q, ks, vs, ctx)) * 1e3
            read = ks.nbytes() + vs.nbytes()
            rows.append({"op": "decode", "ctx": ctx, "k": k_type, "v": v_type, "us": round(us, 1),
                         "kv_GB_per_s": round(read / us / 1e3, 1), "sdpa_f16_us": round(sdpa_us, 1)})
    start, t = 4096, 512
    for k_type, v_type in PAIRS:
        ks, vs = _stores(k_type, v_type, start + t)
        q = torch.randn(1, HQ, t, DIM, device="cuda", dtype=torch.float16)  # (1, Hq, T, D)
        ms = do_bench(lambda ks=ks, vs=vs, q=q: prefill_attention(q, ks, vs, start))
        flops = 4 * HQ * t * (start + t / 2) * DIM
        knew = torch.randn(1, HKV, t, DIM, device="cuda", dtype=torch.float16)  # (1, Hkv, T, D)
        rotation = rot if kv_quant.kv_type(k_type).quantized else None
        kw = do_bench_cudagraph(lambda ks=ks, knew=knew, rot=rotation: k_write(knew, ks, start, rotation=rot))
        vw = do_bench_cudagraph(lambda vs=vs, knew=knew: v_write(knew, vs, start))
        rows.append({"op": "prefill", "ctx": start, "chunk": t, "k": k_type, "v": v_type, "ms": round(ms, 4),
                     "TFLOP_per_s": round(flops / (ms / 1e3) / 1e12, 1), "k_write_us": round(kw * 1e3, 1),
                     "v_write_us": round(vw * 1e3, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    rows = run(args.ctx)
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print("  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
