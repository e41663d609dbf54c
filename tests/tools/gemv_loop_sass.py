"""Instructions in the main loop of a decode GEMV compiled for sm_90, counted without a GPU.

    python -m tests.tools.gemv_loop_sass Q4_K 17920x1536 --warps 2 --split 3   # one launch, opcode histogram

What a GEMV's K-loop issues per weight can be read on this CPU machine: the launch is recorded and
compiled as tests.tools.compile_sm90 does (the fast dequantization and PDL switched on, as on CUDA),
disassembled with Triton's nvdisasm, and the instructions between the longest loop's label and its
backward branch are counted. Environment switches that pick the kernel's code apply as at a launch. The
count depends on the Triton release that compiles (the GPU machine's may differ from this one's): say
which. A shorter loop is a lead, not a result: 16-bit quant loads cut the 2-warp Q4_K loop 543 -> 489
(Triton 3.6) and the decode step did not move (kernels/README.md, session 10); four quant bytes a PTX
call cut it 495 -> 360 (8-row tiles, Triton 3.6) and the step went 3.4 % faster (session 17).
To see the GPU machine's code, compile with its Triton: `pip download triton==3.6.0 --no-deps -d D`,
`pip install --no-deps --target T D/triton-*.whl`, then run this with `PYTHONPATH=T:.`.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

import torch

_ADDRESS = re.compile(r"/\*([0-9a-f]{4,})\*/")
_OPCODE = re.compile(r"\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_.]*)")
_BRANCH = re.compile(r"\bBRA\s+`?\(?(\.L_x_\d+)")


def compile_gemv(qtype_name: str, n: int, k: int, warps: int, split: int, stages: int = 2,
                 row_tile: int | None = None):
    """The GEMV launch qmatmul makes for (N, K) in that type with these launch parameters, compiled for
    sm_90 -> Triton's CompiledKernel. row_tile: as `default_gemv_config` picks it for the warps unless
    given."""
    import numpy as np
    from gguf import GGMLQuantizationType as QT

    import kernels.qmatmul as qm
    from tests.engine.gguf_builders import random_blocks
    from tests.tools.compile_sm90 import compile_call, recording

    qtype = QT[qtype_name]
    raw = random_blocks(qtype, (n, k), np.random.default_rng(0), max_abs=0.01)
    w = qm.QuantizedWeight.from_bytes(raw, qtype, (n, k), "cpu")
    row_tile = row_tile or (qm.GEMV_ROW_TILE if warps == 2 else qm.GEMV_ROWS_MAX)
    cfg = qm.KernelConfig(block_n=64, block_m=qm.GEMV_ROWS_MAX, block_k=128, split_k=split, num_warps=warps,
                          num_stages=stages, pdl=True, row_tile=row_tile)
    with recording(qm, "_qmatmul_kernel") as rec:
        qm.qmatmul(torch.zeros(1, k, dtype=torch.float16), w, config=cfg, split_output=True)
    args, kwargs = rec.calls[0]
    return compile_call(rec.kernel, args, kwargs, {"FAST": qtype in qm.FAST_TYPES, "USE_GDC": True,
                                                   "launch_pdl": True, "PRESCALED": w.prescaled})


def disassemble(compiled) -> str:
    from tests.tools.compile_sm90 import cubin_tool

    return cubin_tool(compiled, "nvdisasm", "-c")


def loop_opcodes(sass: str) -> collections.Counter:
    """Opcodes of the instructions from the longest backward branch's target to that branch."""
    lines = sass.splitlines()
    labels = {}  # label -> address of the instruction after it
    for i, line in enumerate(lines):
        if line.startswith(".L_x_") and i + 1 < len(lines) and (m := _ADDRESS.search(lines[i + 1])):
            labels[line.rstrip(":").strip()] = int(m.group(1), 16)
    best = None
    for line in lines:
        branch, address = _BRANCH.search(line), _ADDRESS.search(line)
        if branch and address and branch.group(1) in labels:
            span = (labels[branch.group(1)], int(address.group(1), 16))
            if span[0] < span[1] and (best is None or span[1] - span[0] > best[1] - best[0]):
                best = span
    if best is None:
        raise ValueError("no loop found in the SASS")
    counts: collections.Counter = collections.Counter()
    for line in lines:
        address, opcode = _ADDRESS.search(line), _OPCODE.search(line)
        if address and opcode and best[0] <= int(address.group(1), 16) <= best[1]:
            counts[opcode.group(1).split(".")[0]] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    import triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("qtype", help="GGUF type name, e.g. Q4_K")
    parser.add_argument("shape", help="NxK, e.g. 17920x1536")
    parser.add_argument("--warps", type=int, default=2)
    parser.add_argument("--split", type=int, default=3)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--row-tile", type=int, default=None, choices=(8, 16),
                        help="rows of the tensor-core tile (default: the engine's for the warps)")
    args = parser.parse_args(argv)
    n, k = (int(v) for v in args.shape.split("x"))
    compiled = compile_gemv(args.qtype, n, k, args.warps, args.split, args.stages, args.row_tile)
    counts = loop_opcodes(disassemble(compiled))
    total = sum(counts.values())
    per_weight = total * 32 * args.warps / (64 * 128)  # a K-tile: 64 rows x 128 weights
    print(f"{args.qtype} {n}x{k} warps {args.warps} split {args.split} (Triton {triton.__version__}): "
          f"{total} loop instructions a K-tile, {per_weight:.2f} per weight and thread")
    print("  " + ", ".join(f"{op} {c}" for op, c in counts.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
