"""The floor of a decode step made of dependent kernels: a chain of N trivial kernels, each reading what the
previous one wrote, captured in one CUDA graph (as the engine's step), PDL on and off.

    python3 -m tests.tools.launch_chain_gpu [--n 270]

Each kernel: wait for the previous (griddepcontrol, with PDL), load a float32 row of `width` values that
the previous kernel wrote, add 1, store it to the other buffer. Programs: 1 (a norm-like reader), 132
and 528 (GEMV-like grids, each program a slice). Reports us per kernel (graph replays back to back).
Measured on an H200 in session 16: BENCHMARKS.md, GPU, "What a chain of dependent kernels costs by itself".
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_supported, wait_for_previous


@triton.jit
def _hop(src, dst, width, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < width
    tl.store(dst + offs, tl.load(src + offs, mask=mask, other=0.0) + 1.0, mask=mask)


def chain_us(n: int, programs: int, block: int, pdl: bool, replays: int = 50) -> float:
    """us a kernel of a graph of n dependent `_hop` launches of `programs` programs, median of 5 x replays."""
    a = torch.zeros(programs * block, device="cuda")
    b = torch.zeros_like(a)
    width = a.numel()
    extra = {"launch_pdl": True} if pdl else {}

    def run():
        for i in range(n):
            src, dst = (a, b) if i % 2 == 0 else (b, a)
            _hop[(programs,)](src, dst, width, BLOCK=block, PDL=pdl, num_warps=4, **extra)

    run()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            run()
    torch.cuda.synchronize()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / replays / n)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=270)
    args = p.parse_args()
    pdl_ok = pdl_supported(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: chain of {args.n} dependent kernels in one graph, us a kernel")
    for programs, block in ((1, 2048), (132, 256), (528, 256)):
        row = [f"{programs:4d} programs x {block:4d} floats:"]
        for pdl in (False, True):
            if pdl and not pdl_ok:
                continue
            row.append(f"PDL {'on ' if pdl else 'off'} {chain_us(args.n, programs, block, pdl):.2f}")
        print("  ".join(row), flush=True)


if __name__ == "__main__":
    main()
