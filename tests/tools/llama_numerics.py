"""Emulate llama.cpp's CPU rounding inside OUR engine: a test-tool hook, never product behaviour.

Question it answers (BENCHMARKS.md, "Engine core: fidelity"): is the 1.6-4.9 % top-1 disagreement
between our exact engine and llama.cpp explained by llama.cpp's own numerics? `LlamaNumerics` runs
our float32 engine (cpu_weights=exact, f16/f16 KV cache) with the roundings that llama.cpp's CPU
backend (ggml-cpu, as vendored by llama-cpp-python 0.3.36, x86 with AVX2/AVX-512, flash attention
off as bench_fidelity.py runs it) applies, each one a switchable part:

- "matmul": before every weight matmul the activations x are fake-quantized to the weight type's
  `vec_dot_type` (ggml-cpu.c, type_traits_cpu): Q8_K (256-element blocks) for Q2_K..Q6_K, Q8_0 for
  Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, f16 for F16 weights; F32 weights see x unchanged. The x86
  repacked Q4_K path (repack.cpp, q4_K_8x8 with ggml_quantize_mat_q8_K_4x8) quantizes the same way
  as quantize_row_q8_K_ref (it differs only when +amax and -amax both occur in a block).
  Q8_1 also stores s = f16(d * sum(q)), which Q4_1/Q5_1 dot products use for the weight-min term
  (sum += m_w * s); x_hat alone gives m_w * f16(d) * sum(q), so that difference is added exactly.
- "attention": with an f16 K cache, `mul_mat(k, q)` converts Q to f16 (vec_dot_type of F16); the
  softmax output is converted to f16 for `mul_mat(v, kq)` (V f16). Scores and softmax are float32.
- "gelu": ggml_vec_gelu_f32 / ggml_vec_geglu_f32 (GGML_GELU_FP16) look GELU up in an f16 table:
  y = f16(gelu(f16(x))) for -10 < x < 10, 0 below, x above. (Gemma 3 only.)
- "rope": ggml_rope_cache_init computes theta_i = p * theta_scale^i by repeated float32
  multiplication, theta_scale = powf(base, -2/n_dims), then cos/sin of theta / freq_factor.

What it showed (2026-11-27, all four default models): fed llama.cpp's own inputs, every emulated
op reproduces llama.cpp's output to float32 rounding (tests/tools/llama_op_check.py), and "matmul"
alone moves our logits away from exact float32 by as much as llama.cpp's are (mean KL). Over a whole
forward pass the emulation is still a different draw of the same noise: 8-bit quantization turns a
one-ulp difference into flipped quanta, so top-1 agreement with llama.cpp stays where it was, and
llama.cpp disagrees with itself (one token at a time vs a 512-token batch) just as often.

Usage (tests/tools/bench_fidelity.py --emulate-llama-numerics):

    numerics = LlamaNumerics(PARTS)
    with numerics.loading():          # every linear layer built now gets the hook
        session = Engine.load(config)
    with numerics.emulating():        # hooks active; outside this block the engine is unchanged
        logits = session.prefill(ids, 0, logits_for="all")
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

import engine.kv_cache as kv_cache_module
import engine.models.transformer as transformer_module
from engine.gguf_file import TensorInfo

PARTS = ("matmul", "attention", "gelu", "rope")

QK8 = 32  # Q8_0 / Q8_1 block
QK_K = 256  # Q8_K block

# The activation type llama.cpp quantizes x to for each weight type (ggml-cpu.c, vec_dot_type).
VEC_DOT_TYPE: dict[QT, str] = {
    QT.Q4_0: "q8_0", QT.Q5_0: "q8_0", QT.Q8_0: "q8_0",
    QT.Q4_1: "q8_1", QT.Q5_1: "q8_1",
    QT.Q2_K: "q8_k", QT.Q3_K: "q8_k", QT.Q4_K: "q8_k", QT.Q5_K: "q8_k", QT.Q6_K: "q8_k",
    QT.F16: "f16", QT.BF16: "bf16", QT.F32: "f32",
}

# Bytes per 32-weight block and the byte offset of the f16 min `m` for the types whose dot product
# uses Q8_1's stored sum: Q4_1 = {d, m, qs[16]}, Q5_1 = {d, m, qh[4], qs[16]}.
MIN_BLOCKS: dict[QT, tuple[int, int]] = {QT.Q4_1: (20, 2), QT.Q5_1: (24, 2)}


def round_f16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest float16 (ties to even, like F16C / GGML_FP32_TO_FP16) -> float32."""
    return x.to(torch.float16).to(torch.float32)


def _div(numerator: float, x: torch.Tensor) -> torch.Tensor:
    """numerator / x rounded once, as C's float division. (`scalar / tensor` in torch is
    reciprocal(x) * scalar, two roundings: it differs from C in the last bit for ~25 % of inputs.)"""
    return torch.div(torch.full_like(x, numerator), x)


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """(..., K) -> (..., K // size, size) float32; K must be a multiple of size."""
    if x.shape[-1] % size:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of the block size {size}")
    return x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // size, size)


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (..., K) -> (q (..., K/32, 32) float32 integers, d (..., K/32, 1) float32 as stored (f16),
    d32 (..., K/32, 1) the float32 scale before its f16 rounding), as ggml-cpu's x86 quantize_row_q8_0.

    d = amax / 127; q = round-half-even(x * (127 / amax)) (the SIMD path multiplies by 127 / amax,
    the reference by 1 / d; both round the product once); the block stores f16(d).
    """
    xb = _blocks(x, QK8)  # (..., nb, 32)
    amax = xb.abs().amax(-1, keepdim=True)  # (..., nb, 1)
    d32 = amax / 127.0
    inv = torch.where(amax > 0, _div(127.0, amax), torch.zeros_like(amax))
    q = torch.round(xb * inv)  # torch.round: half to even, as _mm256_round_ps(_MM_ROUND_NEAREST)
    return q, round_f16(d32), d32


def fake_quant_q8_0(x: torch.Tensor) -> torch.Tensor:
    """x: (..., K) -> the values llama.cpp's Q8_0 activation block represents, (..., K) float32."""
    q, d, _ = quantize_q8_0(x)
    return (q * d).reshape(x.shape)


def q8_1_sum_error(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (..., K) -> (x_hat (..., K), e (..., K/32)) for Q8_1.

    x_hat is the same as Q8_0's. Q8_1 also stores s = f16(d32 * sum(q)); a Q4_1/Q5_1 dot product
    adds m_w * s per block, while W_dequant @ x_hat gives m_w * d * sum(q): e = s - d * sum(q).
    """
    q, d, d32 = quantize_q8_0(x)
    qsum = q.sum(-1, keepdim=True)  # (..., nb, 1), exact integers
    e = round_f16(d32 * qsum) - d * qsum  # (..., nb, 1)
    return (q * d).reshape(x.shape), e[..., 0]


def quantize_q8_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (..., K) -> (q (..., K/256, 256) float32 integers, d (..., K/256, 1) float32), as
    quantize_row_q8_K_ref (ggml-quants.c; x86 calls it directly).

    The reference takes max = the element of largest |x| with its sign, iscale = -127 / max,
    q = min(127, nearest_int(iscale * x)) (round half to even), d = 1 / iscale. Negating iscale
    negates q and d exactly (IEEE division and rounding are sign-symmetric), so this uses
    iscale = 127 / amax and clamps q at -127 instead.
    """
    xb = _blocks(x, QK_K)  # (..., nb, 256)
    amax = xb.abs().amax(-1, keepdim=True)  # (..., nb, 1)
    nonzero = amax > 0
    iscale = torch.where(nonzero, _div(127.0, amax), torch.ones_like(amax))
    q = torch.round(xb * iscale).clamp(min=-127.0)
    d = torch.where(nonzero, _div(1.0, iscale), torch.zeros_like(amax))  # float32 in block_q8_K
    return torch.where(nonzero, q, torch.zeros_like(q)), d


def fake_quant_q8_k(x: torch.Tensor) -> torch.Tensor:
    """x: (..., K) -> the values llama.cpp's Q8_K activation block represents, (..., K) float32."""
    q, d = quantize_q8_k(x)
    return (q * d).reshape(x.shape)


def fake_quant_activation(x: torch.Tensor, vec_dot_type: str) -> torch.Tensor:
    """x: (..., K) float32 -> what the dot product with a weight of that vec_dot_type sees."""
    if vec_dot_type in ("q8_0", "q8_1"):
        return fake_quant_q8_0(x)
    if vec_dot_type == "q8_k":
        return fake_quant_q8_k(x)
    if vec_dot_type == "f16":
        return round_f16(x)
    if vec_dot_type == "bf16":
        return x.to(torch.bfloat16).to(torch.float32)
    return x


def block_mins(info: TensorInfo) -> torch.Tensor:
    """(out, in / 32) float32 block minimums m of a Q4_1/Q5_1 weight (dequant: w = d * q + m)."""
    block_bytes, offset = MIN_BLOCKS[info.qtype]
    out_features, in_features = (int(s) for s in info.shape)
    raw = np.asarray(info.data).reshape(out_features, in_features // QK8, block_bytes)
    m = np.ascontiguousarray(raw[:, :, offset : offset + 2]).view(np.float16)[..., 0]  # (out, nb)
    return torch.from_numpy(m.astype(np.float32))


class EmulatedLinear(torch.nn.Module):
    """Wraps one of the engine's CPU linear modules; while `numerics` is active, quantizes its input
    the way llama.cpp does for this weight's GGUF type."""

    def __init__(self, inner: torch.nn.Module, info: TensorInfo, numerics: LlamaNumerics) -> None:
        super().__init__()
        self.inner, self.numerics = inner, numerics
        self.name, self.qtype = info.name, info.qtype
        self.vec_dot_type = VEC_DOT_TYPE.get(info.qtype, "f32")
        self.mins = block_mins(info) if info.qtype in MIN_BLOCKS else None  # (out, in / 32) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.numerics.active and "matmul" in self.numerics.parts):
            return self.inner(x)
        if self.vec_dot_type == "q8_1":
            x_hat, e = q8_1_sum_error(x)  # (..., K), (..., K / 32)
            return self.inner(x_hat) + e @ self.mins.T  # (..., out)
        return self.inner(fake_quant_activation(x, self.vec_dot_type))


def emulated_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, pos: int, scale: float, window: int | None
) -> torch.Tensor:
    """Drop-in for engine.kv_cache._sdpa: q (H, T, D) at positions [pos, pos + T); k, v (n_kv, L, D)
    holding positions [first, ...), already f16 values. ggml non-flash attention: Q -> f16,
    scores float32, softmax(scores * scale + mask) float32, probabilities -> f16, @ V."""
    n_heads, n_new = q.shape[0], q.shape[1]
    n_keys = pos + n_new
    start = 0 if window is None else max(0, pos - window + 1)
    k = k[:, start - first : n_keys - first]  # (n_kv, L', D)
    v = v[:, start - first : n_keys - first]
    group = n_heads // k.shape[0]
    k = k.repeat_interleave(group, dim=0)  # (H, L', D)
    v = v.repeat_interleave(group, dim=0)
    scores = round_f16(q) @ k.transpose(1, 2)  # (H, T, L')
    scores = scores * scale
    mask = kv_cache_module.attention_mask(pos - start, n_new, n_keys - start, window, q.device)  # (T, L')
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (H, T, L') float32
    return round_f16(probs) @ v  # (H, T, D)


def ggml_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU(tanh) through ggml's f16 table: f16(gelu(f16(x))) inside (-10, 10), 0 / x outside."""
    x16 = round_f16(x)
    c = math.sqrt(2.0 / math.pi)
    g = 0.5 * x16 * (1.0 + torch.tanh(c * x16 * (1.0 + 0.044715 * x16 * x16)))
    y = round_f16(g)
    return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, y))


class _FunctionalWithGgmlGelu:
    """torch.nn.functional with gelu(approximate="tanh") replaced by ggml's table lookup."""

    def __getattr__(self, name: str):
        return getattr(F, name)

    @staticmethod
    def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        if approximate != "tanh":
            raise NotImplementedError("only GELU(tanh) is emulated")
        return ggml_gelu_tanh(x)


def ggml_rope_tables(
    positions: torch.Tensor, rope_dim: int, base: float, scale: float, freq_factors: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for engine.models.transformer.rope_tables: cos, sin (T, rope_dim // 2), computed as
    ggml_rope_cache_init does: theta *= theta_scale in float32, one rounding per step."""
    theta_scale = np.float32(np.float32(base) ** (np.float32(-2.0) / np.float32(rope_dim)))
    freq_scale = np.float32(1.0 / scale)
    theta = positions.cpu().numpy().astype(np.float32)  # (T,)
    factors = None if freq_factors is None else freq_factors.cpu().numpy().astype(np.float32)
    angles = np.empty((theta.shape[0], rope_dim // 2), dtype=np.float32)
    for i in range(rope_dim // 2):
        t = theta if factors is None else theta / factors[i]
        angles[:, i] = freq_scale * t
        theta = (theta * theta_scale).astype(np.float32)
    a = torch.from_numpy(angles).to(positions.device)
    return a.cos(), a.sin()


@contextlib.contextmanager
def nudged_embeddings(model: torch.nn.Module) -> Iterator[None]:
    """Inside: `model.embed` returns every input embedding moved by one float32 ulp (towards +inf).

    A control for the emulation: a difference of the size of float32 rounding, like another summation
    order. Plain float32 inference barely notices it; 8-bit activation quantization amplifies it."""
    original = model.embed

    def embed(tokens: torch.Tensor) -> torch.Tensor:
        x = original(tokens)  # (T, d_model)
        return torch.nextafter(x, torch.full_like(x, float("inf")))

    model.embed = embed
    try:
        yield
    finally:
        del model.embed  # back to the class's method


class LlamaNumerics:
    """The hooks; see the module docstring. `parts`: a subset of PARTS."""

    def __init__(self, parts: Iterable[str] = PARTS) -> None:
        self.parts = set(parts)
        unknown = self.parts - set(PARTS)
        if unknown:
            raise ValueError(f"unknown parts {sorted(unknown)}; expected some of {PARTS}")
        self.active = False
        self.wrapped: list[EmulatedLinear] = []

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """While the model loads, every CPU linear layer is wrapped in an EmulatedLinear."""
        original = transformer_module.make_linear

        def make_linear(info, bias=None, device="cpu", mode="dense"):
            if torch.device(device).type != "cpu":
                raise ValueError("llama.cpp numerics are emulated on CPU only")
            if mode != "dense":
                raise ValueError("emulate llama.cpp numerics over float32 weights (cpu_weights=exact)")
            module = EmulatedLinear(original(info, bias, device=device, mode=mode), info, self)
            self.wrapped.append(module)
            return module

        transformer_module.make_linear = make_linear
        try:
            yield
        finally:
            transformer_module.make_linear = original

    @contextlib.contextmanager
    def emulating(self) -> Iterator[None]:
        """Inside: the wrapped layers quantize, and attention / GELU / RoPE round like ggml."""
        saved = (kv_cache_module._sdpa, transformer_module.F, transformer_module.rope_tables)
        if "attention" in self.parts:
            kv_cache_module._sdpa = emulated_sdpa
        if "gelu" in self.parts:
            transformer_module.F = _FunctionalWithGgmlGelu()
        if "rope" in self.parts:
            transformer_module.rope_tables = ggml_rope_tables
        self.active = True
        try:
            yield
        finally:
            self.active = False
            kv_cache_module._sdpa, transformer_module.F, transformer_module.rope_tables = saved
