"""Upper bounds for the GPU decode step: what it costs with one kind of kernel left out.

    python3 -m tests.tools.decode_bounds_gpu --model M.gguf [--ctk f16 --ctv f16] [--depth 16] [--steps 40]

Loads the model on CUDA with the cache filled to `depth`, then captures the 1-row decode graph once per
variant and times back-to-back replays (PDL on, as the engine runs). A variant replaces one kind of
kernel by an empty output of the right shape (add + RMSNorm, the gated activation, decode attention, the
fused RoPE + K/V write, the LM head; or all but the GEMVs): the step's logits are then garbage, only its
time means something, and the saving against the full step is the most that making that kind of kernel
free could buy (with PDL a kernel's own duration overlaps its neighbours', so a profile does not say it).
Variants run in order, then in reverse order; both passes are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

KINDS = ("norm", "activation", "attention", "rope_write", "lm_head")
VARIANTS: dict[str, tuple[str, ...]] = {
    "full step": (),
    "no add + RMSNorm": ("norm",),
    "no gated activation": ("activation",),
    "no decode attention": ("attention",),
    "no RoPE + K/V write": ("rope_write",),
    "no LM head": ("lm_head",),
    "GEMVs and LM head only": ("norm", "activation", "attention", "rope_write"),
}


class Skips:
    """Replaces kinds of kernels of a loaded CudaTransformer and its cache by empty outputs; `apply(())`
    restores them all."""

    def __init__(self, model, cache) -> None:
        import kernels.layer_ops as lo

        self.lo, self.model, self.cache = lo, model, cache
        c = model.config
        device = model.device

        def no_norm(x, *args, out_dtype=torch.float16, **kwargs):
            return torch.empty(x.shape, dtype=out_dtype, device=x.device)  # (T, d_model)

        def no_activation(gate, up, *args, **kwargs):
            return torch.empty(gate.shape, dtype=torch.float16, device=device)  # (T, d_ff)

        def no_attention(*args, **kwargs):
            return None  # the output buffer stays as allocated

        def no_rope_write(layer, q, k, v, positions, *args, **kwargs):
            return torch.empty(positions.shape[0], c.n_heads, c.head_dim, dtype=torch.float32, device=device)

        def no_lm_head(rows, *args, **kwargs):
            return torch.empty(rows.shape[0], c.vocab_size, dtype=torch.float16, device=device)

        self.real = {"norm": lo.add_rms_norm, "activation": lo.gated_activation,
                     "attention": cache.attend_rows, "rope_write": cache.rope_write_rows,
                     "lm_head": model.lm_head.matmul}
        self.empty = {"norm": no_norm, "activation": no_activation, "attention": no_attention,
                      "rope_write": no_rope_write, "lm_head": no_lm_head}

    def apply(self, kinds: tuple[str, ...]) -> None:
        use = {kind: (self.empty if kind in kinds else self.real)[kind] for kind in KINDS}
        self.lo.add_rms_norm, self.lo.gated_activation = use["norm"], use["activation"]
        self.cache.attend_rows, self.cache.rope_write_rows = use["attention"], use["rope_write"]
        self.model.lm_head.matmul = use["lm_head"]


def main(argv: list[str] | None = None) -> int:
    from tests.tools.profile_decode_gpu import _captured, _load, _wall_us, add_step_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser, depth=16, steps=40)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_bounds_gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    walls: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with torch.inference_mode():
        session, step_ids = _load(args.model, args.ctk, args.ctv, args.depth, 1, args.context)
        skips = Skips(session.model, session.cache)
        for order in (list(VARIANTS), list(VARIANTS)[::-1]):
            for name in order:
                skips.apply(VARIANTS[name])
                walls[name].append(_wall_us(_captured(session, step_ids, args.depth), args.steps))
        skips.apply(())
        session.close()
    full = statistics.mean(walls["full step"])
    print(f"decode step, {args.ctk}/{args.ctv} cache at depth {args.depth}: wall us (both passes), saving")
    for name, runs in walls.items():
        mean = statistics.mean(runs)
        passes = " ".join(f"{w:.1f}" for w in runs)
        print(f"  {name:24} {mean:7.1f}  ({passes})  {full - mean:+7.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
