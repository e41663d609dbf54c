"""Greedy picks of the CPU fast path, token by token, against float32 weights: what engine.lm_head buys.

    .venv/bin/python tests/tools/head_agreement.py                       # 4 models x code, prose, 256 tokens
    .venv/bin/python tests/tools/head_agreement.py --models smollm2-135m --texts prose --n 512

The first --n tokens of each text (tokenized by our engine) are teacher-forced through two sessions of one
model: `cpu_weights="exact"` (float32 weights: the path checked against transformers) in one prefill with
logits for every row, and the default fast path one decode step a token, as a chat decodes. At every
step the fast path's LM head input is also run through the plain bfloat16 head (no re-scoring), so both
heads see the same hidden states. Reported per model and text: the share of positions whose fast pick
equals the float32 pick, for the plain and the re-scored head, and the re-scoring's cost per token.
A fast pick can still differ after re-scoring: the fast path's hidden state is not the float32 one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from engine.api import EngineConfig
from engine.lm_head import RescoredHead
from engine.model_catalog import locate
from engine.session import Engine

TEXT_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "eval_text"
TEXTS = {"code": TEXT_DIR / "code.py.txt", "prose": TEXT_DIR / "prose.txt"}
MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma-3-270m")


class BothHeads(torch.nn.Module):
    """The re-scored head, also recording what the plain bfloat16 head picks for the same input."""

    def __init__(self, head: RescoredHead) -> None:
        super().__init__()
        self.head, self.plain_picks, self.rescore_s = head, [], 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = self.head.linear(x)  # (1, vocab)
        self.plain_picks.append(int(plain[-1].argmax()))
        started = time.perf_counter()
        rows = plain.reshape(-1, self.head.out_features)
        for row, x_row in zip(rows, x.reshape(-1, self.head.in_features).float(), strict=True):
            self.head._rescore(row, x_row)
        self.rescore_s += time.perf_counter() - started
        return plain


def measure(model: str, text: str, n: int, threads: int) -> dict:
    path = str(locate(model))
    exact = Engine.load(EngineConfig(model=path, context_length=n + 8, cpu_weights="exact", threads=threads))
    ids = exact.tokenizer.encode(TEXTS[text].read_text(), add_bos=exact.tokenizer.add_bos)[:n]
    want = exact.prefill(ids, 0, logits_for="all").argmax(-1).tolist()  # (n,) float32 picks
    exact.close()
    fast = Engine.load(EngineConfig(model=path, context_length=n + 8, threads=threads))
    if not isinstance(fast.model.lm_head, RescoredHead):
        raise SystemExit(f"{model}: the fast path's LM head is not re-scored here")
    both = BothHeads(fast.model.lm_head)
    fast.model.lm_head = both
    rescored = [int(fast.prefill(ids[:1], 0)[0].argmax())]
    for token in ids[1:]:
        rescored.append(int(fast.decode_one(token)[0].argmax()))
    fast.close()
    return {
        "model": model, "text": text, "n": len(ids),
        "plain": sum(a == b for a, b in zip(both.plain_picks, want, strict=True)) / len(ids),
        "rescored": sum(a == b for a, b in zip(rescored, want, strict=True)) / len(ids),
        "rescore_ms": both.rescore_s / len(ids) * 1e3,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--texts", default="code,prose")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    print("| model | text | tokens | fast picks = float32, plain bf16 head | re-scored head "
          "| re-scoring ms/token |")
    print("|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for text in args.texts.split(","):
            r = measure(model, text, args.n, args.threads)
            print(f"| {r['model']} | {r['text']} | {r['n']} | {r['plain']:.1%} | {r['rescored']:.1%} | "
                  f"{r['rescore_ms']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
