"""Checks of the llama.cpp-numerics emulation (tests/tools/llama_numerics.py), used by bench_fidelity.py.

Three kinds of oracle: gguf-py's Q8_0 / Q4_1 quantizers (the file-format reference), scalar
transcriptions of the block math written here from the ggml formulas (Q8_K, Q8_1's stored sum,
the Q4_1 x Q8_1 dot product), hand-computed small cases; and, where llama-cpp-python's own ggml
libraries are installed, ggml-cpu's x86 activation quantizers called directly through ctypes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT
from gguf import quants as gguf_quants

from engine.gguf_file import TensorInfo
from engine.linear import DenseLinear
from engine.models.transformer import rope_tables
from engine.quants import dequantize
from tests.tools import llama_numerics as ln


def random_rows(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Activation-like rows: mostly normal, a few large outliers, some blocks with a negative max."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    outliers = torch.rand(rows, cols, generator=g) < 0.01
    return torch.where(outliers, x * 30.0, x)


# --- Q8_0 -------------------------------------------------------------------------------------


def test_q8_0_matches_gguf_py_quantize_dequantize():
    x = random_rows(64, 1024)
    expected = gguf_quants.dequantize(gguf_quants.quantize(x.numpy(), QT.Q8_0), QT.Q8_0)  # (64, 1024)
    got = ln.fake_quant_q8_0(x)
    assert torch.equal(got, torch.from_numpy(expected))


def test_q8_0_rounds_ties_to_even_like_the_x86_path():
    # amax 127 -> d = 1, scale 127 / 127 = 1: x * 1 = x exactly. gguf-py (the C reference, roundf)
    # rounds 0.5 -> 1 and 2.5 -> 3; ggml-cpu's AVX path (_MM_ROUND_NEAREST) gives 0 and 2.
    x = torch.zeros(32)
    x[:5] = torch.tensor([127.0, 0.5, 2.5, -1.5, -3.5])
    got = ln.fake_quant_q8_0(x)
    assert got[:5].tolist() == [127.0, 0.0, 2.0, -2.0, -4.0]
    assert torch.equal(got[5:], torch.zeros(27))


def test_q8_0_stores_the_scale_as_f16():
    x = torch.zeros(32)
    x[0], x[1] = 1.0, 0.3  # d = 1/127 is not an f16 value
    q, d, d32 = ln.quantize_q8_0(x)
    assert d32.item() == np.float32(1.0) / np.float32(127.0)
    assert d.item() == float(np.float16(d32.item()))
    assert d.item() != d32.item()
    assert q[0, :2].tolist() == [127.0, 38.0]  # 0.3 * 127 = 38.1
    assert ln.fake_quant_q8_0(x)[0].item() == 127.0 * d.item()


# --- Q8_K -------------------------------------------------------------------------------------


def q8_k_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q8_K_ref transcribed literally in float32: (q (nb, 256) int, d (nb,) float32)."""
    x = x.astype(np.float32).reshape(-1, 256)
    qs, ds = np.zeros(x.shape, dtype=np.int64), np.zeros(x.shape[0], dtype=np.float32)
    for b, block in enumerate(x):
        amax, signed_max = np.float32(0), np.float32(0)
        for v in block:  # first element of the largest magnitude, with its sign
            if abs(v) > amax:
                amax, signed_max = abs(v), v
        if amax == 0:
            continue
        iscale = np.float32(-127.0) / signed_max
        for j, v in enumerate(block):
            # nearest_int: add 1.5 * 2^23 in float32 (round to nearest even), read the low bits
            t = np.float32(iscale * v) + np.float32(12582912.0)
            qs[b, j] = min(127, int(t.view(np.int32) & 0x007FFFFF) - 0x00400000)
        ds[b] = np.float32(1.0) / iscale
    return qs, ds


def test_q8_k_matches_the_reference_block_math_bit_for_bit():
    x = random_rows(4, 768, seed=1)
    x[0, :256] = -x[0, :256].abs()  # a block whose largest magnitude is negative
    x[1, 256:512] = 0.0  # an all-zero block
    q_ref, d_ref = q8_k_reference(x.numpy())
    q, d = ln.quantize_q8_k(x)  # (4, 3, 256), (4, 3, 1)
    # the reference's signs are flipped where the signed max is positive; the products are the same
    got = (q * d).reshape(-1, 256).numpy()
    expected = (q_ref.astype(np.float32) * d_ref[:, None]).astype(np.float32)
    assert np.array_equal(got, expected)
    assert np.array_equal(np.abs(q.reshape(-1, 256).numpy()), np.abs(q_ref))


def test_q8_k_hand_computed_block():
    x = torch.zeros(256)
    x[:7] = torch.tensor([254.0, -1.0, 0.5, 3.0, 5.0, -2.9, 100.0])
    # amax 254 -> iscale 0.5, d 2; x * 0.5 = 127, -0.5, 0.25, 1.5, 2.5, -1.45, 50
    # round half to even: 127, -0, 0, 2, 2, -1, 50  -> x_hat = 254, 0, 0, 4, 4, -2, 100
    got = ln.fake_quant_q8_k(x)
    assert got[:7].tolist() == [254.0, 0.0, 0.0, 4.0, 4.0, -2.0, 100.0]
    assert torch.equal(got[7:], torch.zeros(249))


def test_q8_k_properties():
    x = random_rows(8, 2048, seed=2)
    q, d = ln.quantize_q8_k(x)
    xb = x.reshape(8, 8, 256)
    assert q.abs().max() <= 127 and torch.equal(q, q.round())
    # the largest magnitude of each block maps to +-127 and the error is at most half a step
    assert torch.equal(q.abs().amax(-1), torch.full((8, 8), 127.0))
    assert ((q * d - xb).abs() <= d.abs() * 0.5 * (1 + 1e-6)).all()
    # 256-element blocks: scaling one block leaves the others unchanged
    y = x.clone()
    y[:, :256] *= 100.0
    assert torch.equal(ln.fake_quant_q8_k(y)[:, 256:], ln.fake_quant_q8_k(x)[:, 256:])


def test_activation_types_follow_ggml_vec_dot_type():
    assert {t: ln.VEC_DOT_TYPE[t] for t in (QT.Q4_K, QT.Q6_K, QT.Q5_0, QT.Q8_0, QT.Q4_1)} == {
        QT.Q4_K: "q8_k", QT.Q6_K: "q8_k", QT.Q5_0: "q8_0", QT.Q8_0: "q8_0", QT.Q4_1: "q8_1"}
    x = random_rows(2, 256, seed=3)
    assert torch.equal(ln.fake_quant_activation(x, "f32"), x)
    assert torch.equal(ln.fake_quant_activation(x, "f16"), x.half().float())
    assert not torch.equal(ln.fake_quant_activation(x, "q8_0"), ln.fake_quant_activation(x, "q8_k"))


# --- Q8_1 and the Q4_1 dot product ------------------------------------------------------------


def q4_1_times_q8_1(w_blocks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_q4_1_q8_1's formula in float64: sum over blocks d_w d_x sum(q_w q_x) + m_w s_x.

    w_blocks: (out, nb, 20) bytes of Q4_1 blocks; x: (rows, nb * 32) float32. Q8_1 of x written
    here: d = amax / 127, q = round-half-even(x * 127 / amax), stored d and s = d * sum(q) as f16.
    """
    d_w = w_blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)  # (out, nb)
    m_w = w_blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    nib = w_blocks[..., 4:]  # (out, nb, 16): element j in the low nibble, j + 16 in the high one
    q_w = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).astype(np.float64)  # (out, nb, 32)
    xb = x.astype(np.float32).reshape(x.shape[0], -1, 32)  # (rows, nb, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    d32 = amax / np.float32(127.0)
    q_x = np.round(xb * (np.float32(127.0) / amax)).astype(np.float64)  # np.round: half to even
    d_x = d32.astype(np.float16).astype(np.float64)[..., 0]  # (rows, nb)
    s_x = (d32[..., 0] * q_x.sum(-1).astype(np.float32)).astype(np.float16).astype(np.float64)
    sumi = np.einsum("onk,rnk->ron", q_w, q_x)  # (rows, out, nb)
    return (d_w[None] * d_x[:, None] * sumi + m_w[None] * s_x[:, None]).sum(-1)  # (rows, out)


def test_q4_1_linear_matches_ggml_dot_product_formula():
    g = torch.Generator().manual_seed(4)
    out_f, in_f = 24, 128
    w = torch.randn(out_f, in_f, generator=g).numpy() * 0.05 + 0.01
    raw = gguf_quants.quantize(w, QT.Q4_1)  # (24, 80) uint8
    info = TensorInfo("blk.0.ffn_up.weight", QT.Q4_1, (out_f, in_f), raw.reshape(-1))
    numerics = ln.LlamaNumerics(["matmul"])
    layer = ln.EmulatedLinear(DenseLinear(dequantize(info.data, QT.Q4_1, info.shape), None), info, numerics)
    assert torch.equal(layer.mins, torch.from_numpy(raw.reshape(out_f, 4, 20)[..., 2:4].copy().view(
        np.float16)[..., 0].astype(np.float32)))
    x = random_rows(600, in_f, seed=5)  # > 16 rows: one F.linear call
    expected = q4_1_times_q8_1(raw.reshape(out_f, in_f // 32, 20), x.numpy())
    with numerics.emulating():
        got = layer(x).double().numpy()
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    # without the s correction the error is much larger: the correction is doing something
    x_hat = ln.fake_quant_q8_0(x)
    plain = layer.inner(x_hat).double().numpy()
    assert np.abs(plain - expected).max() > 20 * np.abs(got - expected).max()
    # and outside `emulating()` the layer is the plain float32 one
    assert torch.equal(layer(x), layer.inner(x))


# --- attention, GELU, RoPE --------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 5])
def test_emulated_attention_is_sdpa_up_to_f16_rounding(window):
    g = torch.Generator().manual_seed(6)
    n_heads, n_kv, head_dim, pos, n_new = 4, 2, 16, 3, 9
    q = torch.randn(n_heads, n_new, head_dim, generator=g)
    k = torch.randn(n_kv, pos + n_new, head_dim, generator=g).half().float()
    v = torch.randn(n_kv, pos + n_new, head_dim, generator=g).half().float()
    from engine.kv_cache import _sdpa

    exact = _sdpa(q, k, v, 0, pos, 0.25, window)  # (H, T, D)
    got = ln.emulated_sdpa(q, k, v, 0, pos, 0.25, window)
    rel = (got - exact).norm() / exact.norm()
    assert 1e-6 < rel < 2e-3  # rounded (so not identical), but only at f16 precision
    # with f16-exact queries the only rounding left is the probabilities'
    q16 = q.half().float()
    probs_exact = _sdpa(q16, k, v, 0, pos, 0.25, window)
    assert (ln.emulated_sdpa(q16, k, v, 0, pos, 0.25, window) - probs_exact).abs().max() < 2e-3


def test_ggml_gelu_is_an_f16_table_lookup():
    x = torch.tensor([-12.0, -10.0, -3.3, -0.1234567, 0.0, 0.7, 2.0001, 9.99, 10.0, 15.5])
    got = ln.ggml_gelu_tanh(x)
    x16 = x.half().double()
    exact = 0.5 * x16 * (1 + torch.tanh(math.sqrt(2 / math.pi) * x16 * (1 + 0.044715 * x16**2)))
    expected = exact.half().float()
    expected[0], expected[1], expected[8], expected[9] = 0.0, 0.0, 10.0, 15.5
    assert torch.equal(got, expected)
    y = torch.linspace(-6, 6, 1001)
    assert (ln.ggml_gelu_tanh(y) - F.gelu(y, approximate="tanh")).abs().max() < 5e-3


def test_ggml_rope_tables_close_to_ours():
    positions = torch.arange(0, 600)
    cos, sin = rope_tables(positions, 64, 10000.0, 1.0, None)
    gcos, gsin = ln.ggml_rope_tables(positions, 64, 10000.0, 1.0, None)
    assert gcos.shape == cos.shape == (600, 32)
    assert (gcos - cos).abs().max() < 1e-3 and (gsin - sin).abs().max() < 1e-3
    assert torch.equal(gcos[:, 0], torch.cos(positions.float()))  # theta_0 = p exactly


def test_hooks_are_undone_and_only_cpu_dense_is_accepted():
    import engine.kv_cache as kvc
    import engine.models.transformer as tm

    before = (tm.make_linear, tm.rope_tables, tm.F, kvc._sdpa)
    numerics = ln.LlamaNumerics()
    with numerics.loading():
        assert tm.make_linear is not before[0]
        with pytest.raises(ValueError, match="exact"):
            tm.make_linear(TensorInfo("w", QT.F32, (4, 32), np.zeros(512, np.uint8)), mode="int4-bf16")
    with numerics.emulating():
        assert numerics.active and kvc._sdpa is ln.emulated_sdpa and tm.rope_tables is ln.ggml_rope_tables
    assert (tm.make_linear, tm.rope_tables, tm.F, kvc._sdpa) == before and not numerics.active
    with pytest.raises(ValueError, match="unknown parts"):
        ln.LlamaNumerics(["matmul", "softmax"])


# --- against ggml-cpu itself (llama-cpp-python's libraries), when installed --------------------


def ggml_cpu_library() -> ctypes.CDLL:
    llama_cpp = pytest.importorskip("llama_cpp")
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    try:
        ctypes.CDLL(str(lib_dir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(str(lib_dir / "libggml-cpu.so"))
        names = ("quantize_row_q8_0", "quantize_row_q8_1", "quantize_row_q8_K", "ggml_quantize_mat_q8_K_4x8")
        for name in names:
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    except (OSError, AttributeError) as exc:
        pytest.skip(f"llama-cpp-python's ggml-cpu library is not usable here: {exc}")
    return lib


def call_quantizer(fn, x: np.ndarray, n_bytes: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(n_bytes, dtype=np.uint8)
    fn(x.ctypes.data, out.ctypes.data, x.shape[-1])
    return out


def test_against_ggml_cpu_activation_quantizers():
    lib = ggml_cpu_library()
    x = random_rows(4, 1024, seed=7)
    x[2, :256] = -x[2, :256].abs()
    for row in x:
        blocks = call_quantizer(lib.quantize_row_q8_0, row.numpy(), 32 * 34).reshape(32, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (32, 1)
        ggml = blocks[:, 2:].copy().view(np.int8).astype(np.float32) * d
        assert np.array_equal(ln.fake_quant_q8_0(row).numpy(), ggml.reshape(-1))

        blocks = call_quantizer(lib.quantize_row_q8_1, row.numpy(), 32 * 36).reshape(32, 36)
        d, s = (blocks[:, i : i + 2].copy().view(np.float16).astype(np.float32)[:, 0] for i in (0, 2))
        qsum = blocks[:, 4:].copy().view(np.int8).astype(np.float32).sum(-1)
        _, e = ln.q8_1_sum_error(row)
        assert np.array_equal(e.numpy(), s - d * qsum)

        blocks = call_quantizer(lib.quantize_row_q8_K, row.numpy(), 4 * 292).reshape(4, 292)
        d = blocks[:, :4].copy().view(np.float32)  # (4, 1)
        ggml = blocks[:, 4:260].copy().view(np.int8).astype(np.float32) * d
        assert np.array_equal(ln.fake_quant_q8_k(row).numpy(), ggml.reshape(-1))

    # the repacked Q4_K path quantizes 4 rows at a time into interleaved block_q8_Kx4
    blocks = call_quantizer(lib.ggml_quantize_mat_q8_K_4x8, x.numpy(), 4 * 1168).reshape(4, 1168)
    d = blocks[:, :16].copy().view(np.float32)  # (4 super-blocks, 4 rows)
    qs = blocks[:, 16:1040].copy().view(np.int8).reshape(4, 32, 4, 8).transpose(0, 2, 1, 3).reshape(4, 4, 256)
    ggml = (qs.astype(np.float32) * d[:, :, None]).transpose(1, 0, 2).reshape(4, 1024)  # (rows, K)
    assert np.array_equal(ln.fake_quant_q8_k(x).numpy(), ggml)


# --- the fidelity tool's report -----------------------------------------------------------------


def test_fidelity_tool_reports_emulated_and_self_agreement():
    from tests.tools import bench_fidelity as bf

    g = torch.Generator().manual_seed(8)
    ids = list(range(1, 33))
    theirs = torch.randn(32, 50, generator=g)
    ours = theirs + 0.3 * torch.randn(32, 50, generator=g)
    emulated = theirs + 0.05 * torch.randn(32, 50, generator=g)
    row = bf.compare("m", "code", ids, False, ours, theirs, 1.0, 1.0)
    emu = bf.compare("m", "code", ids, False, emulated, theirs, 1.0, 1.0)
    assert emu.agree > row.agree  # the closer logits agree more often
    row.emulated = {**dataclasses.asdict(emu), "ratio": emu.ratio, "parts": ["matmul"],
                    "vs_plain": bf.agreement(emulated, ours)}
    row.llama_self = bf.agreement(ours, theirs)
    table = bf.numerics_table([row])
    line = next(x for x in table.splitlines() if x.startswith("| m | code"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2].startswith(f"{100 * row.agree:.2f} %") and cells[3].startswith(f"{100 * emu.agree:.2f} %")
    assert cells[4].startswith(f"{100 * row.emulated['vs_plain']['agree']:.2f} %")
    assert cells[5].startswith(f"{100 * row.agree:.2f} %")  # llama_self was set to ours vs theirs
    assert "(matmul)" in table
    assert bf.numerics_table([bf.compare("m", "code", ids, False, ours, theirs, 1.0, 1.0)]) == ""


def test_nudged_embeddings_moves_each_value_one_ulp_and_restores():
    class Model(torch.nn.Module):
        def embed(self, tokens: torch.Tensor) -> torch.Tensor:
            return tokens.to(torch.float32) * 0.1

    model, tokens = Model(), torch.arange(1, 6)
    plain = model.embed(tokens)
    with ln.nudged_embeddings(model):
        nudged = model.embed(tokens)
    assert torch.equal(nudged, torch.nextafter(plain, torch.full_like(plain, float("inf"))))
    assert (nudged > plain).all() and ((nudged - plain) / plain).max() < 2.5e-7
    assert torch.equal(model.embed(tokens), plain) and "embed" not in vars(model)
