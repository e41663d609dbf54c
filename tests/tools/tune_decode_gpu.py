"""Launch and layout variants of the GPU decode step, A/B in one process (issue 5, session 6).

    python3 -m tests.tools.tune_decode_gpu --model M.gguf --set readers [--ctk q4_0 --ctv q4_0] [--rows 16]
    python3 -m tests.tools.tune_decode_gpu --model M.gguf --set q4k-scales --prefill

Loads the model once on CUDA (cache filled to --depth), then for each variant of the chosen set changes the
launch parameters of the layer GEMVs (their `gemv_config`), the readers' launch rules (kernels.layer_ops
`norm_warps`, `activation_block`) or, for `q4k-scales`, swaps every Q4_K weight for a build of the same bytes
without its precomputed scales; captures the step's graph anew and times replays (PDL on). Variants run in
order, then in reverse order; the table gives both passes and the ratio to the first variant (the defaults).
A variant's numbers are only comparable within one run. With --prefill each variant also times pp2048
prefill (median of its 4 runs; the cache then holds that prompt, which changes no step time). The sets are
the ones measured in session 6 (BENCHMARKS.md, GPU runs 6-8; kernels/qmatmul.py `_gemv_tuning`), with
today's defaults as the first variant.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import triton

# GEMV weight groups of a layer: fused Q/K (or Q/K/V), V when its type differs, output projection, fused
# gate/up, FFN-down; and the LM head ("lm"). A variant maps group -> default_gemv_config overrides ("only":
# a GGUF type name).
SETS: dict[str, dict[str, dict]] = {
    "readers": {  # session 6, call 3: how the split-output readers launch (the defaults since then first)
        "defaults": {},
        "norm 8 warps (session 5)": {"norm_warps": lambda block: max(1, min(16, block // 256))},
        "norm 4 warps": {"norm_warps": lambda block: 4},
        "activation 2048 columns (session 5)": {
            "activation_block": lambda n, splits: min(2048, triton.next_power_of_2(n))},
        "activation 512 columns (split inputs)": {
            "activation_block": lambda n, splits: 512 if splits else None},
    },
    "gemv-splits": {  # session 6, call 3: K-splits now that the readers add them
        "defaults": {},
        "gate/up pps12": {"gemv": {"gu": dict(programs_per_sm=12)}},
        "gate/up pps16": {"gemv": {"gu": dict(programs_per_sm=16)}},
        "gate/up bn128 pps8 s2": {"gemv": {"gu": dict(block_n=128, programs_per_sm=8, num_stages=2)}},
        "down pps4": {"gemv": {"down": dict(programs_per_sm=4)}},
        "down pps1": {"gemv": {"down": dict(programs_per_sm=1)}},
        "q/k/v/o pps2": {"gemv": {k: dict(programs_per_sm=2) for k in ("qk", "v", "o")}},
        "q/k/v/o pps8": {"gemv": {k: dict(programs_per_sm=8) for k in ("qk", "v", "o")}},
        "o pps2 (session 8)": {"gemv": {"o": dict(programs_per_sm=2)}},
        "o pps8 (session 8)": {"gemv": {"o": dict(programs_per_sm=8)}},
    },
    "gemv-warps": {  # session 6, calls 4 and 6: 2- and 4-warp launches of the long Q4_K GEMVs
        "defaults": {},
        "gate/up 4 warps pps8 s2": {"gemv": {"gu": dict(programs_per_sm=8, num_warps=4, num_stages=2)}},
        "gate/up 4 warps bn128 pps4 s3": {"gemv": {"gu": dict(block_n=128, programs_per_sm=4, num_warps=4,
                                                              num_stages=3)}},
        "gate/up 2 warps pps12": {"gemv": {"gu": dict(programs_per_sm=12, num_warps=2, num_stages=2)}},
        "down Q4_K 4 warps pps2 s3": {"gemv": {"down": dict(only="Q4_K", programs_per_sm=2, num_warps=4,
                                                            num_stages=3)}},
        "down Q4_K 4 warps bn128 pps4 s3": {"gemv": {"down": dict(only="Q4_K", block_n=128, programs_per_sm=4,
                                                                  num_warps=4, num_stages=3)}},
        "q/k/o 2 warps pps8": {"gemv": {k: dict(programs_per_sm=8, num_warps=2, num_stages=2)
                                        for k in ("qk", "o")}},
        # session 17: the 2-warp Q4_K loop lost its byte shuffles (four quant bytes a PTX call: 2.81
        # instructions per weight and thread against 3.72 for these 4-warp launches, sm_90): again for Q/K/V/O
        "q/k/v/o Q4_K 2 warps": {"gemv": {k: dict(only="Q4_K", num_warps=2) for k in ("qk", "v", "o")}},
        "q/k/v/o Q4_K 2 warps pps8": {"gemv": {k: dict(only="Q4_K", programs_per_sm=8, num_warps=2)
                                               for k in ("qk", "v", "o")}},
    },
    "lm-head": {  # session 8: the LM head (Q6_K 151936 x 1536 in Qwen2.5-1.5B Q4_K_M, ~100 us of the step)
        "defaults": {},
        "lm 2 warps": {"gemv": {"lm": dict(num_warps=2)}},
        "lm 2 warps pps8": {"gemv": {"lm": dict(num_warps=2, programs_per_sm=8)}},
        "lm bn128": {"gemv": {"lm": dict(block_n=128)}},
        "lm 2 stages": {"gemv": {"lm": dict(num_stages=2)}},
        "lm 4 stages": {"gemv": {"lm": dict(num_stages=4)}},
        "lm bn32": {"gemv": {"lm": dict(block_n=32)}},
    },
    "gemv-stages": {  # session 16: deeper pipelines for the GEMVs whose programs walk several K-tiles
        # (gate/up 4, Q6_K FFN-down 7; Q/K/V/O and Q4_K FFN-down programs walk 1-2: stages change nothing).
        # Stages alone keep every bit; the pps variants change the K split (so the bits).
        "defaults": {},
        "gate/up 3 stages": {"gemv": {"gu": dict(num_stages=3)}},
        "gate/up 4 stages": {"gemv": {"gu": dict(num_stages=4)}},
        "gate/up pps4 4 stages (unsplit)": {"gemv": {"gu": dict(programs_per_sm=4, num_stages=4)}},
        "down Q6_K 4 stages": {"gemv": {"down": dict(only="Q6_K", num_stages=4)}},
        "down Q4_K pps4 4 stages": {"gemv": {"down": dict(only="Q4_K", programs_per_sm=4, num_stages=4)}},
        "gate/up + down Q6_K 4 stages": {"gemv": {"gu": dict(num_stages=4),
                                                  "down": dict(only="Q6_K", num_stages=4)}},
    },
    "q4k-scales": {  # session 6, call 5: Q4_K scales precomputed at load vs computed in every K-tile
        "precomputed (default)": {},
        "per K-tile": {"q4k_scales": False},
    },
}


def _groups(model) -> dict[str, list]:
    """The model's GpuLinears by GEMV group."""
    groups: dict[str, list] = {"qk": [], "v": [], "o": [], "gu": [], "down": [], "lm": [model.lm_head]}
    for layer in model.layers:
        qkv = layer.qkv.groups
        groups["qk"].append(qkv[0])
        groups["v"] += qkv[1:]
        groups["o"].append(layer.wo)
        groups["gu"] += layer.gate_up.groups
        groups["down"].append(layer.down)
    return groups


class Variants:
    """Applies one variant of a set to a loaded model and undoes the previous one."""

    def __init__(self, model) -> None:
        import kernels.layer_ops as lo
        from kernels.qmatmul import QuantizedWeight
        from kernels.qmatmul_layouts import to_gguf_bytes

        self.lo = lo
        self.groups = _groups(model)
        self.linears = [lin for group in self.groups.values() for lin in group]
        self.weights = {id(lin): lin.weight for lin in self.linears}
        self.configs = {id(lin): lin.weight.gemv_config for lin in self.linears}
        self.rules = (lo.norm_warps, lo.activation_block)
        self.unscaled = {}
        for lin in self.linears:
            w = lin.weight
            if w.prescaled:  # the same bytes without the precomputed scales, same launch
                alt = QuantizedWeight.from_bytes(to_gguf_bytes(w.fields, w.qtype, w.shape), w.qtype, w.shape,
                                                 w.device, vector_meta=True, q4k_scales=False)
                alt.gemv_config = w.gemv_config
                self.unscaled[id(lin)] = alt

    def apply(self, variant: dict) -> None:
        from kernels.qmatmul import default_gemv_config

        for lin in self.linears:
            use_alt = variant.get("q4k_scales") is False and id(lin) in self.unscaled
            lin.weight = self.unscaled[id(lin)] if use_alt else self.weights[id(lin)]
            lin.weight.gemv_config = self.configs[id(lin)]
        for key, overrides in variant.get("gemv", {}).items():
            overrides = dict(overrides)
            only = overrides.pop("only", None)
            for lin in self.groups[key]:
                w = lin.weight
                if only is None or w.qtype.name == only:
                    w.gemv_config = default_gemv_config(w.qtype, w.shape, w.device, **overrides)
        norm_rule, act_rule = self.rules
        norm = variant.get("norm_warps")
        act = variant.get("activation_block")
        self.lo.norm_warps = norm_rule if norm is None else norm
        self.lo.activation_block = act_rule if act is None else (
            lambda n, splits: act(n, splits) or act_rule(n, splits))


def _prefill_tok_s(session, tokens: list[int]) -> float:
    session.prefill(tokens, 0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    session.prefill(tokens, 0)
    torch.cuda.synchronize()
    return len(tokens) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    from tests.tools.profile_decode_gpu import _captured, _load, _wall_us, add_step_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser, depth=4096, steps=30)
    parser.add_argument("--set", choices=sorted(SETS), required=True)
    parser.add_argument("--rows", type=int, default=1, help="tokens per step: 1 = decode, more = verify")
    parser.add_argument("--prefill", action="store_true", help="also pp2048 prefill tok/s per variant")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_decode_gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    variants = SETS[args.set]
    with torch.inference_mode():
        session, step_ids = _load(args.model, args.ctk, args.ctv, args.depth, args.rows, args.context)
        switch = Variants(session.model)
        walls: dict[str, list[float]] = {name: [] for name in variants}
        prefill: dict[str, list[float]] = {name: [] for name in variants}
        prompt = torch.randint(0, session.model.config.vocab_size, (2048,),
                               generator=torch.Generator().manual_seed(1)).tolist()
        for order in (list(variants), list(variants)[::-1]):
            for name in order:
                switch.apply(variants[name])
                walls[name].append(_wall_us(_captured(session, step_ids, args.depth), args.steps))
                if args.prefill:
                    prefill[name] += [_prefill_tok_s(session, prompt) for _ in range(2)]
        switch.apply({})
        session.close()
    first = statistics.mean(walls[next(iter(variants))])
    what = "decode step" if args.rows == 1 else f"{args.rows}-row verify step"
    print(f"{what}, {args.ctk}/{args.ctv} cache at depth {args.depth}, set {args.set}: wall us (both passes)")
    for name, runs in walls.items():
        mean = statistics.mean(runs)
        line = f"  {name:34} {mean:7.1f}  ({' '.join(f'{w:.1f}' for w in runs)})  {mean / first:.3f}"
        if args.prefill:
            line += f"  prefill pp2048 {statistics.median(prefill[name]):.0f} tok/s"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
