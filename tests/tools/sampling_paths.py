"""Sampled decoding through `python -m engine bench --temp ...` with the sampler's earlier paths patched
back in, for an A/B on one machine:

    python3 -m tests.tools.sampling_paths MODE -- BENCH-ARGS
    python3 -m tests.tools.sampling_paths graph -- --model M.gguf --device cuda --n-gen 128 --temp 0.8

MODE:
  multinomial  the host draws each token with torch.multinomial on a host copy of the probabilities and
               the step returns its logits (the engine before the inverse-CDF draw)
  host         the host draws by inverse CDF on the device (engine.sampling.draw_with), the step still
               returns its logits (the engine before sampling inside the captured step)
  graph        the engine as it is: on a GPU the captured step samples by itself, one step ahead
Only sampling differs between the modes; greedy decoding (no --temp) is the same in all three.
"""

from __future__ import annotations

import sys

import torch

MODES = ("multinomial", "host", "graph")


def patch(mode: str) -> None:
    from engine.sampling import Sampler

    if mode not in MODES:
        raise SystemExit(f"mode must be one of {', '.join(MODES)}")
    if mode in ("multinomial", "host"):
        Sampler.graph_params = property(lambda self: None)  # generate and bench: the step's logits, then pick
    if mode == "multinomial":
        Sampler.draw = lambda self, probs: int(torch.multinomial(probs.cpu(), 1, generator=self.generator))


def main(argv: list[str] | None = None) -> int:
    from engine.cli import main as engine_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    patch(argv[0])
    return engine_main(["bench", *argv[split + 1 :]])


if __name__ == "__main__":
    sys.exit(main())
