"""Instructions in the main loop of the decode attention split kernel compiled for sm_90, without a GPU.

    python -m tests.tools.attention_loop_sass --types q4_0,f16 [--sequences 16 --length 16384]

The launch `kernels.decode_attention.decode_attention` makes for `--sequences` sequences of `--length`
positions (Qwen2.5-1.5B heads: 12 query, 2 KV, head_dim 128) on a 132-SM GPU is recorded, compiled as
tests.tools.compile_sm90 does (the inline-PTX dequantization and PDL on, as on CUDA), and the loop found
as in tests.tools.gemv_loop_sass is counted by opcode. The count depends on the Triton release that
compiles; say which (kernels/README.md, "Decode attention", session 16). Environment switches apply as at
a launch: the default 16-sequence launch is the one-warp one, which dequantizes V at the tensor-core
operand (`decode_attention.v_at_operand`); TANDEM_ATTN_V_AT_OPERAND=0 counts it with V dequantized where
loaded, and `--sequences 1 --length 4096` counts the four-warp launch of the engine's steps.
"""

from __future__ import annotations

import argparse

import torch


def loop_counts(kv_type: str, sequences: int, length: int) -> tuple[dict, dict]:
    """(the split kernel's launch keywords, loop opcode counts) for one cache type on both sides."""
    import kernels.decode_attention as da
    from engine import kv_quant
    from tests.tools.compile_sm90 import compile_call, recording
    from tests.tools.gemv_loop_sass import disassemble, loop_opcodes

    sm_count = da.sm_count
    da.sm_count = lambda device: 132  # the H200's launch, not the CPU's
    try:
        k_store = kv_quant.allocate(kv_type, (sequences, 2, length), 128, "cpu")
        v_store = kv_quant.allocate(kv_type, (sequences, 2, length), 128, "cpu")
        q = torch.zeros(sequences, 12, 128)
        lengths = torch.full((sequences,), length, dtype=torch.int32)
        with recording(da, "_decode_split_kernel") as split, recording(da, "_decode_reduce_kernel"):
            da.decode_attention(q, k_store, v_store, lengths, max_length=length)
    finally:
        da.sm_count = sm_count
    args, kwargs = split.calls[0]
    compiled = compile_call(split.kernel, args, kwargs, {"FAST": True, "PDL": True, "launch_pdl": True})
    return kwargs, loop_opcodes(disassemble(compiled))


def main() -> None:
    import triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="q4_0,f16", help="cache types (K and V alike)")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--length", type=int, default=16384)
    args = parser.parse_args()
    for kv_type in args.types.split(","):
        kwargs, counts = loop_counts(kv_type, args.sequences, args.length)
        total, block_n = sum(counts.values()), kwargs["BLOCK_N"]
        print(f"{kv_type}/{kv_type} (Triton {triton.__version__}; {kwargs['num_warps']} warp(s), "
              f"{kwargs['num_stages']} stages, block_n {block_n}): {total} loop instructions a tile, "
              f"{total / block_n:.1f} a position")
        print("  " + ", ".join(f"{op} {n}" for op, n in counts.most_common()))


if __name__ == "__main__":
    main()
