"""FBGEMM's dynamic int8 linear on the CPU, against the engine's int4 op: speed, then quality (session 16).

    OMP_WAIT_POLICY=ACTIVE .venv/bin/python -m tests.tools.cpu_int8_probe speed
    .venv/bin/python -m tests.tools.cpu_int8_probe quality --model smollm2-135m --variants int4,int8,w8,a7

`torch.ops.quantized.linear_dynamic` takes per-channel int8 weights and quantizes each call's input to
7-bit unsigned on the fly; it is the fastest quantized matmul we found reachable from torch on an AVX2
CPU. `speed` times it against `_weight_int4pack_mm_for_cpu` (what engine.linear.Int4Linear calls) on the
Qwen2.5-1.5B shapes, one row, random weights. `quality` teacher-forces the first --n tokens of each eval
text through the model with every layer linear replaced (the LM head stays the engine's, re-scored), in
prefill chunks of 64 so no layer takes the exact float32 path of 128+ rows, and reports perplexity and
the share of greedy picks equal to the float32 model's (`cpu_weights="exact"`). Variants:
- int4: the engine as it is;
- int8: FBGEMM for every layer linear, one activation scale per row (a row's result then does not depend
  on the other rows, as verify blocks need); int8-gG: the same per group of G input columns, summed;
- w8, a7, a8 (float32 emulations, to tell the two roundings apart): per-channel int8 weights alone;
  exact weights with each row's input quantized as FBGEMM does (affine over [min(x, 0), max(x, 0)], 127
  levels); the same with 255 levels;
- a8bB: exact weights, each row's input as symmetric int8 per block of B columns with fp16 block scales
  (llama.cpp's activation rounding for its integer dot products at B = 32), for the quality such a kernel
  would have.
Results: BENCHMARKS.md, "An int8 path through FBGEMM".
"""

from __future__ import annotations

import argparse
import math
import statistics
import warnings

import torch

SHAPES = [(1536, 1536), (8960, 1536), (1536, 8960), (17920, 1536), (151936, 1536)]


def _per_call_us(fn, reps: int) -> float:
    """us a call: the median of 5 rounds of `reps` calls (one round untimed first)."""
    from engine.gpu_bench import timed_seconds

    rounds = timed_seconds(lambda: [fn() for _ in range(reps)], repeats=5, warmup=1, device="cpu")
    return statistics.median(rounds) / reps * 1e6


def _pack_int8(w: torch.Tensor):
    """(N, K) float32 -> FBGEMM's packed per-channel int8 weight."""
    scales = (w.abs().amax(1) / 127).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # torch marks quantized tensors deprecated; the op itself is current
        warnings.simplefilter("ignore", UserWarning)
        qw = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qw, None)


def _time_shape(n: int, k: int, reps: int) -> tuple[float, float]:
    """us a call of (N, K) at M = 1: FBGEMM dynamic int8, the int4 op."""
    packed = _pack_int8(torch.randn(n, k) * 0.02)
    x = torch.randn(1, k)
    int8 = _per_call_us(lambda: torch.ops.quantized.linear_dynamic(x, packed, True), reps)
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_zeros = torch.rand(k // 32, n, 2).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    op4 = _per_call_us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, int4, 32, scales_zeros), reps)
    return int8, op4


def speed(threads: int) -> None:
    torch.set_num_threads(threads)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {threads} threads; us a call, M = 1")
    for engine in ("fbgemm", "x86"):
        if engine not in torch.backends.quantized.supported_engines:
            continue
        torch.backends.quantized.engine = engine
        for n, k in SHAPES:
            reps = 2 if n > 100000 else 20
            int8, op4 = _time_shape(n, k, reps)
            print(f"{engine} {n}x{k}: int8 dynamic {int8:8.0f} ({n * k / int8 / 1e3:5.1f} GB/s of int8)   "
                  f"int4 op {op4:8.0f} ({n * k / 2 / op4 / 1e3:4.1f} GB/s of int4)", flush=True)


class DynamicInt8Linear(torch.nn.Module):
    """A GGUF weight requantized per channel (per group of `group` input columns) to int8, through FBGEMM."""

    def __init__(self, info, bias: torch.Tensor | None, group: int) -> None:
        from engine.quants import dequantize

        super().__init__()
        w = dequantize(info.data, info.qtype, info.shape)  # (N, K) float32
        self.n, self.k = (int(s) for s in info.shape)
        self.group = group or self.k
        self.bias = None if bias is None else bias.float()
        self.packs = [_pack_int8(w[:, k0 : k0 + self.group].contiguous())
                      for k0 in range(0, self.k, self.group)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k).float()  # (M, K)
        out = torch.empty(x2.shape[0], self.n)
        for r in range(x2.shape[0]):  # one activation scale per row (and group)
            y = None
            for i, packed in enumerate(self.packs):
                part = torch.ops.quantized.linear_dynamic(
                    x2[r : r + 1, i * self.group : (i + 1) * self.group].contiguous(), packed, True)
                y = part if y is None else y + part
            out[r] = y[0]
        if self.bias is not None:
            out += self.bias
        return out.reshape(*lead, self.n)


class EmulatedLinear(torch.nn.Module):
    """float32 emulation of one of the two roundings: w8 (weights), a7 / a8 (each row's input)."""

    def __init__(self, info, bias: torch.Tensor | None, what: str) -> None:
        from engine.quants import dequantize

        super().__init__()
        w = dequantize(info.data, info.qtype, info.shape)  # (N, K) float32
        if what == "w8":
            s = (w.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
            w = torch.round(w / s).clamp(-127, 127) * s
        self.w, self.what, self.k = w, what, int(info.shape[1])
        self.bias = None if bias is None else bias.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k).float()  # (M, K)
        if self.what.startswith("a8b"):  # symmetric int8 per block of B columns, fp16 block scales
            blocks = x2.reshape(x2.shape[0], -1, int(self.what[3:]))  # (M, K / B, B)
            d = (blocks.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-30).to(torch.float16).float()
            x2 = (torch.round(blocks / d).clamp(-127, 127) * d).reshape_as(x2)
        elif self.what in ("a7", "a8"):
            levels = 127 if self.what == "a7" else 255
            lo = x2.amin(1, keepdim=True).clamp_max(0)
            hi = x2.amax(1, keepdim=True).clamp_min(0)
            scale = ((hi - lo) / levels).clamp_min(1e-12)
            zero = torch.round(-lo / scale)
            x2 = (torch.clamp(torch.round(x2 / scale) + zero, 0, levels) - zero) * scale
        y = x2 @ self.w.T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, -1)


def _linear_factory(variant: str):
    if variant in ("w8", "a7", "a8") or variant.startswith("a8b"):
        return lambda info, bias=None, device="cpu", mode=None: EmulatedLinear(info, bias, variant)
    if variant == "int8" or variant.startswith("int8-g"):
        group = int(variant.split("-g")[1]) if "-g" in variant else 0
        return lambda info, bias=None, device="cpu", mode=None: DynamicInt8Linear(info, bias, group)
    raise SystemExit(f"unknown variant {variant!r}")


def _teacher_forced(session, text_path, n: int) -> tuple[torch.Tensor, float]:
    """(argmax picks (n,), perplexity) over the first n tokens of a text."""
    ids = session.tokenizer.encode(text_path.read_text(), add_bos=session.tokenizer.add_bos)[:n]
    logits = session.prefill(ids, 0, logits_for="all").float()  # (n, vocab)
    nll = -torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logits.argmax(-1), math.exp(float(nll.mean()))


def quality(model: str, variants: list[str], n: int, threads: int) -> None:
    import engine.models.transformer as transformer
    from engine.api import EngineConfig
    from engine.model_catalog import locate
    from engine.session import Engine
    from tests.tools.head_agreement import TEXTS

    torch.backends.quantized.engine = "fbgemm"
    path = str(locate(model))
    exact = Engine.load(EngineConfig(model=path, context_length=n + 8, cpu_weights="exact", threads=threads))
    want = {text: _teacher_forced(exact, p, n) for text, p in TEXTS.items()}
    exact.close()
    print(f"{model}: float32 perplexity " + ", ".join(f"{t} {ppl:.4f}" for t, (_, ppl) in want.items()))
    print("| model | variant | " + " | ".join(f"{t}: picks = float32, ppl vs float32" for t in TEXTS) + " |")
    for variant in variants:
        original = transformer.make_linear
        if variant != "int4":
            transformer.make_linear = _linear_factory(variant)
        try:
            session = Engine.load(EngineConfig(model=path, context_length=n + 8, prefill_chunk=64,
                                               threads=threads))
        finally:
            transformer.make_linear = original
        cells = []
        for text, p in TEXTS.items():
            picks, ppl = _teacher_forced(session, p, n)
            agree = float((picks == want[text][0]).float().mean())
            cells.append(f"{agree:.1%}, {(ppl / want[text][1] - 1) * 100:+.2f} %")
        session.close()
        print(f"| {model} | {variant} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("speed")
    q = sub.add_parser("quality")
    q.add_argument("--model", default="smollm2-135m")
    q.add_argument("--variants", default="int4,int8,w8,a7")
    q.add_argument("--n", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.what == "speed":
        speed(args.threads)
    else:
        quality(args.model, args.variants.split(","), args.n, args.threads)


if __name__ == "__main__":
    main()
