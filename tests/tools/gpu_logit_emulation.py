"""What the GPU LM head's float16 output costs greedy picks, emulated on the CPU with real models.

    .venv/bin/python -m tests.tools.gpu_logit_emulation [--n 512] [--models smollm2-135m,...]

Each model runs in float32 (`cpu_weights="exact"`), teacher-forced over the first --n tokens of each eval
text, and the LM head's input is recorded. A GPU-like head then takes it: input rounded to fp16, weight =
the exactly dequantized rows rounded to fp16, float32 accumulation, the output either rounded to fp16 (as
kernels.qmatmul stores the GPU's logits) or kept in float32. Reported: the share of positions whose pick
equals the float32 model's for both, and how many fp16 rows have an exact tie at the top. (The GPU's
hidden states are fp16 all the way, which this does not emulate: the table isolates the LM head.)
Results: BENCHMARKS.md, GPU, session 16.
"""

from __future__ import annotations

import argparse

import torch

from tests.tools.head_agreement import MODELS, TEXTS


def measure(model: str, n: int, threads: int) -> list[str]:
    from engine.api import EngineConfig
    from engine.model_catalog import locate
    from engine.session import Engine

    session = Engine.load(EngineConfig(model=str(locate(model)), context_length=n + 8, cpu_weights="exact",
                                       threads=threads))
    head = session.model.lm_head  # engine.linear.DenseLinear: float32 (vocab, d)
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].detach().reshape(-1, inputs[0].shape[-1])))
    w16 = head.weight.to(torch.float16).float()  # (vocab, d)
    rows = []
    for text, path in TEXTS.items():
        seen.clear()
        ids = session.tokenizer.encode(path.read_text(), add_bos=session.tokenizer.add_bos)[:n]
        want = session.prefill(ids, 0, logits_for="all").argmax(-1)  # (n,)
        h = torch.cat(seen)[-len(ids):]  # (n, d) float32
        wide = h.to(torch.float16).float() @ w16.T  # (n, vocab): the GPU head's float32 sums
        narrow = wide.to(torch.float16).float()  # as stored
        top2 = torch.topk(narrow, 2, -1).values
        ties = int((top2[:, 0] == top2[:, 1]).sum())
        rows.append(f"| {model} | {text} | {len(ids)} | {(narrow.argmax(-1) == want).float().mean():.1%} | "
                    f"{(wide.argmax(-1) == want).float().mean():.1%} | {ties} |")
    hook.remove()
    session.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print("| model | text | tokens | fp16 logits = float32 pick | float32 logits = float32 pick "
          "| exact fp16 ties at the top |")
    print("|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for row in measure(model, args.n, args.threads):
            print(row, flush=True)


if __name__ == "__main__":
    main()
