"""Tandem's engine against llama.cpp on CPU: teacher-forced fidelity and prefill/decode speed.

    .venv/bin/python tests/tools/bench_fidelity.py                       # everything (~20 min on 2 cores)
    .venv/bin/python tests/tools/bench_fidelity.py --skip-speed          # fidelity table only
    .venv/bin/python tests/tools/bench_fidelity.py --skip-fidelity       # speed table only
    .venv/bin/python tests/tools/bench_fidelity.py --models smollm2-135m --texts code --json-out r.json
    .venv/bin/python tests/tools/bench_fidelity.py --skip-speed --emulate-llama-numerics \
        --llama-token-by-token                                          # llama.cpp's numerics

Fidelity (issue "Engine core", Targets: top-1 agreement >= 99 %, perplexity within 1 %): every
text in tests/fixtures/eval_text/ is tokenized ONCE with llama.cpp (vocab_only, BOS as the model's
metadata asks) and the first --n ids are fed to both engines, so tokenizer differences cannot
show up here. Both run one teacher-forced pass with logits for every position (ours through
`Session.prefill(ids, 0, logits_for="all")`, exactly what `python -m engine perplexity` does;
llama.cpp through `Llama(logits_all=True).eval`). Reported per model and text:
  top-1 agreement = share of the n positions where both argmaxes are the same token,
  ppl ours / ppl llama.cpp (ppl = exp(mean NLL of the n - 1 next tokens)),
  mean and max KL(llama.cpp || ours) per position, and for each disagreement llama.cpp's own
  logit margin between its top-1 and our top-1 (a tiny margin = a near-tie, not a bug).

--emulate-llama-numerics (an experiment, not product behaviour): our engine runs with float32
weights (cpu_weights=exact) and the f16 KV cache, once as it is and once with llama.cpp's CPU
roundings emulated by tests/tools/llama_numerics.py (activations fake-quantized to Q8_K / Q8_0 / Q8_1
before each weight matmul per the weight's GGUF type, Q and the attention probabilities rounded to
f16, ggml's f16 GELU table, ggml's float32 RoPE angle recurrence; --emulate-parts picks a subset).
Both passes are compared with the same llama.cpp logits, in the same run, and with each other.
Reading it: each emulated op reproduces llama.cpp's output of that op to float32 rounding when fed
llama.cpp's own input (tests/tools/llama_op_check.py), but over a whole forward pass 8-bit
activation quantization amplifies any float32-rounding difference (a value near a rounding boundary
flips by a whole quantum), so the emulated pass is another draw of the same noise, not llama.cpp's
draw: expect "emulated vs ours" to look like "llama.cpp vs ours", not "emulated vs llama.cpp" -> 100 %.
--llama-token-by-token measures that noise floor on llama.cpp itself: the same ids evaluated one
token at a time (n_ubatch=1, as llama.cpp decodes) against its own 512-token batch; --nudge-check
the same on our engine: every input embedding moved by one float32 ulp, plain and emulated.

Speed (target: decode >= 0.8x, prefill >= 0.5x llama.cpp on the same threads; load < 5 s): one
model (--speed-model) is loaded in this process by both engines. A run = prefill of the first
--n-prompt ids of the code text at position 0 (last-row logits only) then --n-gen greedy decode
steps. Runs alternate ours/llama.cpp in ABBA order after one untimed warm-up each; medians are
reported with min-max as the noise floor, and `uptime` before and after because the machine may
be shared. Load time = wall time of `Engine.load` (ours) / `Llama(...)` (llama.cpp) with the file
already in the page cache. On a machine shared with other jobs, set OMP_WAIT_POLICY=PASSIVE: torch's
spinning OpenMP threads otherwise slow our 2-thread figures by 10x or more (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.api import EngineConfig  # noqa: E402
from engine.cli import resolve_model  # noqa: E402
from engine.session import Engine  # noqa: E402
from tests.tools.llama_numerics import PARTS as NUMERICS_PARTS  # noqa: E402
from tests.tools.llama_numerics import LlamaNumerics, nudged_embeddings  # noqa: E402

logger = logging.getLogger("bench_fidelity")

TEXT_DIR = ROOT / "tests" / "fixtures" / "eval_text"
TEXTS = {"code": TEXT_DIR / "code.py.txt", "prose": TEXT_DIR / "prose.txt"}
MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma-3-270m")
NEAR_TIE_LOGIT_GAP = 0.05  # llama.cpp's own top-1 vs our top-1 logit gap below which a mismatch is a near-tie


@dataclass
class FidelityRow:
    model: str
    text: str
    n: int
    bos: bool
    agree: float  # share of positions with the same argmax
    ppl_ours: float
    ppl_llama: float
    kl_mean: float  # mean over positions of KL(llama.cpp || ours), nats
    kl_max: float
    kl_max_position: int
    nll_mae: float  # mean |NLL ours - NLL llama.cpp| over the n - 1 targets
    ratio_after_first: float  # ppl ratio without the first prediction (the BOS-less first token is special)
    seconds_ours: float
    seconds_llama: float
    disagreements: list[dict] = field(default_factory=list)  # position, tokens, margins
    # Against transformers on the same ids (fp32 weights dequantized by gguf-py), with --transformers:
    reference: dict = field(default_factory=dict)  # {"ours": {...}, "llama.cpp": {...}}: agree, ppl, kl_mean
    # With --emulate-llama-numerics: the same comparison for our engine with llama.cpp's roundings
    # emulated (FidelityRow fields: agree, ppl_ours, kl_mean, ..., disagreements), and its parts.
    emulated: dict = field(default_factory=dict)
    # With --llama-token-by-token: llama.cpp one token at a time (n_ubatch=1) vs its own batched logits
    llama_self: dict = field(default_factory=dict)  # agree, kl_mean

    @property
    def ratio(self) -> float:
        return self.ppl_ours / self.ppl_llama


@dataclass
class SpeedRow:
    model: str
    threads: int
    n_prompt: int
    n_gen: int
    prefill_ours: list[float]
    prefill_llama: list[float]
    decode_ours: list[float]
    decode_llama: list[float]
    load_ours_s: float
    load_llama_s: float
    order: list[str]
    uptime_before: str
    uptime_after: str


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load averages {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def llama_module():
    try:
        import llama_cpp
    except ImportError as exc:
        raise SystemExit("llama-cpp-python is not installed in this venv: pip install llama-cpp-python "
                         "(CPU build), then rerun.") from exc
    return llama_cpp


def tokenize_with_llamacpp(model_path: str, text: str) -> tuple[list[int], bool]:
    """Token ids of text by llama.cpp's own tokenizer, with BOS iff the model's metadata asks for it."""
    llama_cpp = llama_module()
    vocab = llama_cpp.Llama(model_path, vocab_only=True, verbose=False)
    ids = vocab.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    bos = vocab.token_bos()
    has_bos = bool(ids) and bos is not None and bos >= 0 and ids[0] == bos
    del vocab
    return ids, has_bos


def llama_logits(model_path: str, ids: list[int], threads: int,
                 ubatch: int = 512) -> tuple[torch.Tensor, float]:
    """(len(ids), vocab) float32 logits of llama.cpp for every position, and the seconds taken.

    ubatch: llama.cpp's micro-batch; 1 evaluates one token at a time, as it does when decoding."""
    llama_cpp = llama_module()
    llm = llama_cpp.Llama(model_path, n_ctx=len(ids) + 16, n_batch=512, n_ubatch=ubatch, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    started = time.perf_counter()
    llm.eval(ids)
    seconds = time.perf_counter() - started
    scores = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))  # (n, vocab)
    del llm
    gc.collect()
    return scores, seconds


ROW_CHUNK = 64  # rows per float64 block: 64 x 262144 (Gemma's vocabulary) x 8 bytes = 134 MB


def row_stats(ours: torch.Tensor, theirs: torch.Tensor, ids: list[int]) -> dict[str, torch.Tensor]:
    """Per-position statistics of two (n, vocab) logit tensors, computed in float64 blocks of ROW_CHUNK
    rows so a 262144-token vocabulary never needs several full-size float64 copies (every row's
    figures are independent of the others). nll_*: (n,) NLL of ids[i + 1] (NaN at the last row);
    kl: (n,) KL(theirs || ours); top_*: (n,) argmax."""
    n, vocab = ours.shape[0], min(ours.shape[-1], theirs.shape[-1])  # llama.cpp may pad nothing; guard
    targets = torch.tensor(ids[1:] + [0], dtype=torch.long)[:, None]  # (n, 1); the last row has none
    out = {k: torch.empty(n, dtype=torch.float64) for k in ("nll_ours", "nll_theirs", "kl")}
    out |= {k: torch.empty(n, dtype=torch.long) for k in ("top_ours", "top_theirs")}
    for lo in range(0, n, ROW_CHUNK):
        hi = min(n, lo + ROW_CHUNK)
        ours64, theirs64 = ours[lo:hi, :vocab].double(), theirs[lo:hi, :vocab].double()  # (rows, vocab)
        lp_ours, lp_theirs = ours64.log_softmax(-1), theirs64.log_softmax(-1)  # (rows, vocab)
        out["nll_ours"][lo:hi] = -lp_ours.gather(1, targets[lo:hi])[:, 0]
        out["nll_theirs"][lo:hi] = -lp_theirs.gather(1, targets[lo:hi])[:, 0]
        out["kl"][lo:hi] = (lp_theirs.exp() * (lp_theirs - lp_ours)).sum(-1)
        out["top_ours"][lo:hi], out["top_theirs"][lo:hi] = ours64.argmax(-1), theirs64.argmax(-1)
    out["nll_ours"][-1] = out["nll_theirs"][-1] = float("nan")
    return out


def compare(model: str, text: str, ids: list[int], bos: bool, ours: torch.Tensor, theirs: torch.Tensor,
            seconds_ours: float, seconds_llama: float) -> FidelityRow:
    """ours, theirs: (n, vocab) logits for the same ids."""
    stats = row_stats(ours, theirs, ids)
    nll_ours, nll_theirs = stats["nll_ours"][:-1], stats["nll_theirs"][:-1]  # (n - 1,)
    kl, top_ours, top_theirs = stats["kl"], stats["top_ours"], stats["top_theirs"]  # (n,)
    disagreements = []
    for pos in torch.nonzero(top_ours != top_theirs)[:, 0].tolist():
        a, b = int(top_ours[pos]), int(top_theirs[pos])
        mine, llama = ours[pos].double(), theirs[pos].double()  # (vocab,)
        disagreements.append({
            "position": pos, "ours": a, "llama": b,
            "llama_margin": float(llama[b] - llama[a]),  # >= 0: how sure llama.cpp was
            "ours_margin": float(mine[a] - mine[b]),
        })
    return FidelityRow(
        model=model, text=text, n=len(ids), bos=bos,
        agree=float((top_ours == top_theirs).double().mean()),
        ppl_ours=float(nll_ours.mean().exp()), ppl_llama=float(nll_theirs.mean().exp()),
        kl_mean=float(kl.mean()), kl_max=float(kl.max()), kl_max_position=int(kl.argmax()),
        nll_mae=float((nll_ours - nll_theirs).abs().mean()),
        ratio_after_first=float((nll_ours[1:].mean() - nll_theirs[1:].mean()).exp()),
        seconds_ours=seconds_ours, seconds_llama=seconds_llama, disagreements=disagreements,
    )


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Top-1 agreement and mean KL(b || a) of logits a, b: (n, vocab); b is the reference."""
    stats = row_stats(a, b, [0] * a.shape[0])
    return {"agree": float((stats["top_ours"] == stats["top_theirs"]).double().mean()),
            "kl_mean": float(stats["kl"].mean())}


def transformers_logits(model_path: str, id_sets: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """{text: (n, vocab) float32 logits} of transformers' float32 model built from the GGUF."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    path = Path(model_path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    out = {}
    with torch.inference_mode():
        for text, ids in id_sets.items():
            out[text] = model(torch.tensor([ids])).logits[0].float()  # (n, vocab)
    del model
    gc.collect()
    return out


def engine_config(path: str, context_length: int, threads: int, cpu_weights: str | None,
                  **kw: int) -> EngineConfig:
    config = EngineConfig(model=path, context_length=context_length, threads=threads, device="cpu", **kw)
    if cpu_weights:
        config.cpu_weights = cpu_weights  # fast (int4, bf16 math) | exact (float32); None: engine default
    return config


def run_fidelity(models: list[str], texts: list[str], n: int, threads: int,
                 with_transformers: bool = False, cpu_weights: str | None = None,
                 emulate_parts: tuple[str, ...] = (),
                 llama_token_by_token: bool = False, nudge_check: bool = False) -> list[FidelityRow]:
    """emulate_parts: non-empty -> also run ours with those llama.cpp numerics (needs cpu_weights exact).
    llama_token_by_token: also run llama.cpp with n_ubatch=1 and compare it with its own batched logits.
    nudge_check: also run ours plain and emulated with the embeddings one float32 ulp off."""
    rows = []
    for model in models:
        path = resolve_model(model)
        token_sets = {}
        for text in texts:
            ids, bos = tokenize_with_llamacpp(path, TEXTS[text].read_text(encoding="utf-8"))
            if len(ids) < n:
                raise SystemExit(f"{TEXTS[text]} has only {len(ids)} tokens for {model}; need {n}.")
            token_sets[text] = (ids[:n], bos)
        theirs = {}
        for text, (ids, _) in token_sets.items():
            logger.info("llama.cpp: %s on %s (%d tokens)", model, text, len(ids))
            theirs[text] = llama_logits(path, ids, threads)
        llama_self = {}
        if llama_token_by_token:
            for text, (ids, _) in token_sets.items():
                logger.info("llama.cpp one token at a time: %s on %s", model, text)
                single, _ = llama_logits(path, ids, threads, ubatch=1)
                llama_self[text] = agreement(single, theirs[text][0])
        logger.info("ours: loading %s", model)
        config = engine_config(path, max(n, 16), threads, cpu_weights, prefill_chunk=min(512, n))
        numerics = LlamaNumerics(emulate_parts) if emulate_parts else None
        if numerics is not None:
            if config.cpu_weights != "exact" or config.kv_k != "f16" or config.kv_v != "f16":
                raise SystemExit("--emulate-llama-numerics needs cpu_weights=exact and the f16/f16 KV cache")
            with numerics.loading():
                session = Engine.load(config)
        else:
            session = Engine.load(config)
        ours_logits, emulated_logits = {}, {}
        for text, (ids, bos) in token_sets.items():
            session.cached_ids = []
            started = time.perf_counter()
            ours = session.prefill(ids, 0, logits_for="all").float()  # (n, vocab)
            seconds = time.perf_counter() - started
            row = compare(model, text, ids, bos, ours, theirs[text][0], seconds, theirs[text][1])
            logger.info("%s/%s: agree %.4f, ppl %.4f vs %.4f, KL mean %.2e", model, text, row.agree,
                        row.ppl_ours, row.ppl_llama, row.kl_mean)
            if text in llama_self:
                row.llama_self = llama_self[text]
            rows.append(row)
            if with_transformers:
                ours_logits[text] = ours
            if numerics is not None:
                session.cached_ids = []
                started = time.perf_counter()
                with numerics.emulating():
                    emulated = session.prefill(ids, 0, logits_for="all").float()  # (n, vocab)
                seconds = time.perf_counter() - started
                emu = compare(model, text, ids, bos, emulated, theirs[text][0], seconds, theirs[text][1])
                row.emulated = asdict(emu) | {"ratio": emu.ratio, "parts": sorted(numerics.parts),
                                              "vs_plain": agreement(emulated, ours)}
                logger.info("%s/%s emulated: agree %.4f, ppl %.4f vs %.4f, KL mean %.2e", model, text,
                            emu.agree, emu.ppl_ours, emu.ppl_llama, emu.kl_mean)
                if with_transformers:
                    emulated_logits[text] = emulated
                if nudge_check:
                    for key, active, base in (("nudged_plain", False, ours), ("nudged", True, emulated)):
                        session.cached_ids = []
                        with nudged_embeddings(session.model), \
                                (numerics.emulating() if active else contextlib.nullcontext()):
                            nudged = session.prefill(ids, 0, logits_for="all").float()  # (n, vocab)
                        row.emulated[key] = agreement(nudged, base)
        del session
        gc.collect()
        if with_transformers:
            logger.info("transformers: %s", model)
            reference = transformers_logits(path, {text: ids for text, (ids, _) in token_sets.items()})
            for row in rows[-len(token_sets):]:
                ref = reference[row.text]
                row.reference = {"ours": agreement(ours_logits[row.text], ref),
                                 "llama.cpp": agreement(theirs[row.text][0], ref)}
                if row.text in emulated_logits:
                    row.reference["ours emulated"] = agreement(emulated_logits[row.text], ref)
            del reference
        del theirs, ours_logits, emulated_logits
        gc.collect()
    return rows


def time_ours(session, prompt: list[int], n_gen: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one run from position 0."""
    session.cached_ids = []
    t0 = time.perf_counter()
    logits = session.prefill(prompt, 0)  # (1, vocab)
    t1 = time.perf_counter()
    token = int(logits[0].argmax())
    for _ in range(n_gen):
        token = int(session.decode_one(token)[0].argmax())
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_gen / (t2 - t1)


def llama_last_logits(llm) -> np.ndarray:
    """(vocab,) logits of the last evaluated token (without logits_all, eval() keeps no scores)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def time_llama(llm, prompt: list[int], n_gen: int) -> tuple[float, float]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    token = int(np.argmax(llama_last_logits(llm)))
    for _ in range(n_gen):
        llm.eval([token])
        token = int(np.argmax(llama_last_logits(llm)))
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_gen / (t2 - t1)


def run_speed(model: str, threads: int, n_prompt: int, n_gen: int, rounds: int,
              cpu_weights: str | None = None) -> SpeedRow:
    llama_cpp = llama_module()
    path = resolve_model(model)
    ids, _ = tokenize_with_llamacpp(path, TEXTS["code"].read_text(encoding="utf-8"))
    if len(ids) < n_prompt:
        ids = (ids * (n_prompt // len(ids) + 1))
    prompt = ids[:n_prompt]
    before = uptime()
    Path(path).read_bytes()  # page cache warm for both loads
    t0 = time.perf_counter()
    session = Engine.load(engine_config(path, n_prompt + n_gen + 16, threads, cpu_weights))
    load_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(path, n_ctx=n_prompt + n_gen + 16, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, logits_all=False, verbose=False)
    load_llama = time.perf_counter() - t0
    logger.info("loaded: ours %.2f s, llama.cpp %.2f s; warming up", load_ours, load_llama)
    time_ours(session, prompt[:32], 4)
    time_llama(llm, prompt[:32], 4)
    results = {"ours": ([], []), "llama": ([], [])}
    order = ["ours", "llama", "llama", "ours"] * max(1, rounds // 2)
    for who in order:
        torch.set_num_threads(threads)
        if who == "ours":
            prefill, decode = time_ours(session, prompt, n_gen)
        else:
            prefill, decode = time_llama(llm, prompt, n_gen)
        logger.info("%s: prefill %.1f tok/s, decode %.2f tok/s", who, prefill, decode)
        results[who][0].append(prefill)
        results[who][1].append(decode)
    after = uptime()
    del session, llm
    gc.collect()
    return SpeedRow(model=model, threads=threads, n_prompt=n_prompt, n_gen=n_gen,
                    prefill_ours=results["ours"][0], prefill_llama=results["llama"][0],
                    decode_ours=results["ours"][1], decode_llama=results["llama"][1],
                    load_ours_s=load_ours, load_llama_s=load_llama, order=order,
                    uptime_before=before, uptime_after=after)


def spread(values: list[float], digits: int) -> str:
    """'median (min-max)'."""
    med = statistics.median(values)
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def fidelity_table(rows: list[FidelityRow]) -> str:
    lines = ["| model | text | n | BOS | top-1 agreement | ppl ours | ppl llama.cpp | ratio | ratio w/o 1st "
             "| mean KL | max KL @pos | mismatches (near-ties) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ties = sum(d["llama_margin"] < NEAR_TIE_LOGIT_GAP for d in r.disagreements)
        lines.append(f"| {r.model} | {r.text} | {r.n} | {'yes' if r.bos else 'no'} | {100 * r.agree:.2f} % "
                     f"| {r.ppl_ours:.4f} | {r.ppl_llama:.4f} | {r.ratio:.4f} | {r.ratio_after_first:.4f} "
                     f"| {r.kl_mean:.2e} | {r.kl_max:.2e} @{r.kl_max_position} "
                     f"| {len(r.disagreements)} ({ties}) |")
    refs = [r for r in rows if r.reference]
    if refs:
        lines += ["", "Both engines against transformers (float32, gguf-py dequantized weights), same ids:",
                  "",
                  "| model | text | top-1 ours vs HF | top-1 llama.cpp vs HF | mean KL ours vs HF "
                  "| mean KL llama.cpp vs HF |", "|---|---|---|---|---|---|"]
        for r in refs:
            o, q = r.reference["ours"], r.reference["llama.cpp"]
            lines.append(f"| {r.model} | {r.text} | {100 * o['agree']:.2f} % | {100 * q['agree']:.2f} % "
                         f"| {o['kl_mean']:.2e} | {q['kl_mean']:.2e} |")
    return "\n".join(lines)


def numerics_table(rows: list[FidelityRow]) -> str:
    """Top-1 agreements that separate engine errors from llama.cpp's numerics (rows with .emulated or
    .llama_self): ours plain / emulated vs llama.cpp, emulated vs plain, llama.cpp vs itself."""
    rows = [r for r in rows if r.emulated or r.llama_self]
    if not rows:
        return ""
    parts = next((r.emulated["parts"] for r in rows if r.emulated), [])

    def pct(d: dict, key: str = "agree") -> str:
        return f"{100 * d[key]:.2f} %" if d else "-"

    def kl(d: dict) -> str:
        return f"{d['kl_mean']:.2e}" if d else "-"

    lines = ["Top-1 agreement (mean KL) per pair; ours = cpu_weights=exact, KV f16/f16; emulated = ours with "
             f"llama.cpp's roundings ({', '.join(parts) or 'not run'}); llama.cpp 1-by-1 = llama.cpp with "
             "n_ubatch=1 (how it decodes), compared with its own 512-token batch; +1 ulp = the same engine "
             "with every input embedding moved by one float32 ulp (--nudge-check):", "",
             "| model | text | ours vs llama.cpp | emulated vs llama.cpp | emulated vs ours | "
             "llama.cpp 1-by-1 vs llama.cpp | emulated +1 ulp vs emulated | ours +1 ulp vs ours "
             "| mismatches plain (near-ties) | emulated (near-ties) | ppl ratio plain / emulated |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r.emulated
        ties = sum(d["llama_margin"] < NEAR_TIE_LOGIT_GAP for d in r.disagreements)
        emu_mismatch, emu_ratio = "-", "-"
        if e:
            e_ties = sum(d["llama_margin"] < NEAR_TIE_LOGIT_GAP for d in e["disagreements"])
            emu_mismatch, emu_ratio = f"{len(e['disagreements'])} ({e_ties})", f"{e['ratio']:.4f}"
        lines.append(f"| {r.model} | {r.text} | {100 * r.agree:.2f} % ({r.kl_mean:.1e}) "
                     f"| {pct(e)} ({kl(e)}) | {pct(e.get('vs_plain', {}))} ({kl(e.get('vs_plain', {}))}) "
                     f"| {pct(r.llama_self)} ({kl(r.llama_self)}) "
                     f"| {pct(e.get('nudged', {}))} ({kl(e.get('nudged', {}))}) "
                     f"| {pct(e.get('nudged_plain', {}))} ({kl(e.get('nudged_plain', {}))}) "
                     f"| {len(r.disagreements)} ({ties}) "
                     f"| {emu_mismatch} | {r.ratio:.4f} / {emu_ratio} |")
    refs = [r for r in rows if "ours emulated" in r.reference]
    if refs:
        lines += ["", "| model | text | top-1 ours emulated vs HF | mean KL ours emulated vs HF |",
                  "|---|---|---|---|"]
        for r in refs:
            o = r.reference["ours emulated"]
            lines.append(f"| {r.model} | {r.text} | {100 * o['agree']:.2f} % | {o['kl_mean']:.2e} |")
    return "\n".join(lines)


def speed_table(rows: list[SpeedRow]) -> str:
    lines = ["| model | threads | prefill ours | prefill llama.cpp | ratio | decode ours | decode llama.cpp "
             "| ratio | load ours | load llama.cpp |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pr = statistics.median(r.prefill_ours) / statistics.median(r.prefill_llama)
        dr = statistics.median(r.decode_ours) / statistics.median(r.decode_llama)
        lines.append(f"| {r.model} | {r.threads} | {spread(r.prefill_ours, 1)} "
                     f"| {spread(r.prefill_llama, 1)} | {pr:.2f}x | {spread(r.decode_ours, 2)} "
                     f"| {spread(r.decode_llama, 2)} | {dr:.2f}x "
                     f"| {r.load_ours_s:.2f} s | {r.load_llama_s:.2f} s |")
    lines.append("")
    if rows:
        lines.append("tok/s: median (min-max) over the runs; runs in order " + " ".join(rows[0].order))
    for r in rows:
        lines.append(f"pp{r.n_prompt} + tg{r.n_gen}; machine load before: `{r.uptime_before}`; "
                     f"after: `{r.uptime_after}`")
    return "\n".join(lines)


def environment(cpu_weights: str | None = None) -> str:
    import platform

    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = "not installed"
    weights = cpu_weights or getattr(EngineConfig(model=""), "cpu_weights", "?")
    mode = f"cpu_weights={weights}"
    try:
        from engine.models.transformer import CPU_WEIGHT_MODES

        mode += f" (linear mode {CPU_WEIGHT_MODES.get(weights, '?')})"
    except ImportError:
        pass
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()} {os.cpu_count()} "
            f"CPUs; torch {torch.__version__}; llama-cpp-python {llama_version}; "
            f"engine {mode}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated catalogue keys or GGUF paths")
    p.add_argument("--texts", default="code,prose", help=f"comma-separated, from {', '.join(TEXTS)}")
    p.add_argument("--n", type=int, default=512, help="tokens per text for fidelity")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--speed-model", default="qwen2.5-coder-1.5b")
    p.add_argument("--n-prompt", type=int, default=512)
    p.add_argument("--n-gen", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="runs per engine (ABBA order; even)")
    p.add_argument("--skip-fidelity", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--cpu-weights", choices=("fast", "exact"),
                   help="our CPU weight mode (EngineConfig.cpu_weights); default: the engine's default")
    p.add_argument("--transformers", action="store_true",
                   help="also compare both engines with transformers' float32 model (exact weights; slow)")
    p.add_argument("--emulate-llama-numerics", action="store_true",
                   help="fidelity: also run ours with llama.cpp's CPU roundings emulated (implies "
                        "--cpu-weights exact; tests/tools/llama_numerics.py)")
    p.add_argument("--emulate-parts", default=",".join(NUMERICS_PARTS),
                   help=f"with --emulate-llama-numerics: any of {', '.join(NUMERICS_PARTS)}, comma-separated")
    p.add_argument("--llama-token-by-token", action="store_true",
                   help="fidelity: also run llama.cpp one token at a time (n_ubatch=1) and report its "
                        "agreement with its own batched logits (llama.cpp's noise floor)")
    p.add_argument("--nudge-check", action="store_true",
                   help="with --emulate-llama-numerics: also run ours plain and emulated with every input "
                        "embedding one float32 ulp off, against the same engine unnudged")
    p.add_argument("--json-out", help="write all raw numbers (including each disagreement) here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    emulate_parts = tuple(args.emulate_parts.split(",")) if args.emulate_llama_numerics else ()
    if emulate_parts:
        if args.cpu_weights not in (None, "exact"):
            p.error("--emulate-llama-numerics needs float32 weights: use --cpu-weights exact or leave it out")
        args.cpu_weights = "exact"
    command = " ".join(["tests/tools/bench_fidelity.py"] + (argv if argv is not None else sys.argv[1:]))
    out = [f"Environment: {environment(args.cpu_weights)}", f"Command: `.venv/bin/python {command}`",
           f"Machine load at start: `{uptime()}`", ""]
    print("\n".join(out), flush=True)
    fidelity, speed = [], []
    if not args.skip_fidelity:
        fidelity = run_fidelity(args.models.split(","), args.texts.split(","), args.n, args.threads,
                                args.transformers, args.cpu_weights, emulate_parts, args.llama_token_by_token,
                                args.nudge_check)
        print(fidelity_table(fidelity) + "\n", flush=True)
        if emulate_parts or args.llama_token_by_token:
            print(numerics_table(fidelity) + "\n", flush=True)
    if not args.skip_speed:
        speed = [run_speed(args.speed_model, args.threads, args.n_prompt, args.n_gen, args.rounds,
                           args.cpu_weights)]
        print(speed_table(speed) + "\n", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "environment": environment(args.cpu_weights),
            "fidelity": [asdict(r) | {"ratio": r.ratio} for r in fidelity],
            "speed": [asdict(r) for r in speed]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
