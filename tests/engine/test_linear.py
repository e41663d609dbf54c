"""make_linear and the int4 repack against gguf-py's dequantization (the oracle).

Tolerances, relative RMS of the layer output against F.linear(x, W) with W = gguf-py's float32
weights, computed in float64:
- "dense" and "int4" compute in float32 with the exact weights: only summation rounding remains,
  ~sqrt(K) * 2^-24 ~ 1e-6 at K = 512; the bound 1e-5 leaves 10x.
- "int4-bf16" rounds the input, the scales and the output to bfloat16 (8-bit significand, relative
  error up to 2^-9 each, RMS ~3e-3 together, measured): bound 1e-2.
The repack itself is checked without the op: rebuilding each weight from the int4 codes and
scale/zero pairs must give gguf-py's value bit for bit where scale and zero are exact in float32,
and within one rounding of the zero where the zero is a float32 sum (Q4_1, Q5_1, Q4_K).
"""

from __future__ import annotations

import pathlib

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from engine import int4_repack, linear
from engine.gguf_file import GGUFModelFile, TensorInfo
from engine.int4_repack import INT4_TYPES, to_int4_planes
from engine.linear import TWO_PLANE_TYPES, Bf16Linear, DenseLinear, Int4Linear, make_linear
from tests.engine.gguf_builders import random_blocks

ALL_TYPES = (
    QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q6_K,
    QT.Q2_K, QT.Q3_K, QT.Q5_K, QT.F16, QT.BF16, QT.F32,
)
EXACT_ZERO_TYPES = (QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q6_K)  # zero is 0 or +-8d: exact in float32
MODES = ("dense", "int4", "int4-bf16")
TOLERANCE = {"dense": 1e-5, "int4": 1e-5, "int4-bf16": 1e-2}
OUT_FEATURES, IN_FEATURES = 41, 512  # odd rows (padding to 64), whole K-quant super-blocks
REAL_MODEL = pathlib.Path.home() / ".local/share/tandem/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"


def weight_info(qtype: QT, shape: tuple[int, int], seed: int = 0) -> TensorInfo:
    raw = random_blocks(qtype, shape, np.random.default_rng(seed), max_abs=0.05)
    return TensorInfo("w", qtype, shape, np.ascontiguousarray(raw).reshape(-1))


def oracle_weight(info: TensorInfo) -> torch.Tensor:
    """gguf-py's dequantization: (out, in) float32."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[info.qtype]
    rows = info.data.reshape(info.shape[0], info.shape[1] // block_elems * block_bytes)
    out = gguf.quants.dequantize(rows, info.qtype).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(info.shape)


def rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def fold_widened(wide: torch.Tensor, split_width: int, high_multiplier: float) -> torch.Tensor:
    """(N, K') per widened column -> (N, K): input slice j feeds the low slice and, times m, the high one."""
    if split_width == 0:
        return wide
    pairs = wide.reshape(wide.shape[0], -1, 2, split_width)  # (N, K / w, 2, w)
    return (pairs[:, :, 0] + high_multiplier * pairs[:, :, 1]).reshape(wide.shape[0], -1)  # (N, K)


@pytest.mark.parametrize("qtype", sorted(INT4_TYPES, key=lambda t: t.name), ids=lambda t: t.name)
def test_planes_rebuild_gguf_weights(qtype: QT) -> None:
    info = weight_info(qtype, (OUT_FEATURES, IN_FEATURES))
    planes = to_int4_planes(info.data, qtype, info.shape)
    n, k_wide = planes.codes.shape
    groups = k_wide // int4_repack.GROUP_SIZE
    assert planes.codes.dtype == torch.uint8 and int(planes.codes.max()) <= 15
    codes = planes.codes.double().reshape(n, groups, -1) - 8.0  # (N, G, 32)
    scales = planes.scales.double().unsqueeze(2)  # (N, G, 1)
    zeros = planes.zeros.double().unsqueeze(2)
    wide = (codes * scales + zeros).reshape(n, k_wide)  # (N, K') exact in float64
    rebuilt = fold_widened(wide, planes.split_width, planes.high_multiplier)  # (N, K)
    want = oracle_weight(info)
    if qtype in EXACT_ZERO_TYPES:
        got = rebuilt.to(torch.float32)
        assert torch.equal(got, want), f"{qtype.name}: rebuilt weights differ from gguf-py"
    else:
        zero_wide = zeros.expand(n, groups, int4_repack.GROUP_SIZE).reshape(n, k_wide).abs()  # (N, K')
        zero_per_weight = fold_widened(zero_wide, planes.split_width, 1.0)  # (N, K)
        bound = 2.0**-23 * (zero_per_weight.abs() + want.double().abs())  # one rounding of z and of w
        err = (rebuilt - want.double()).abs()
        assert bool((err <= bound).all()), f"{qtype.name}: max excess {float((err - bound).max()):.3g}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_make_linear_matches_oracle(qtype: QT, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_CPU_TWO_PLANE", "int4")  # the bfloat16 weights of two-plane types: below
    info = weight_info(qtype, (OUT_FEATURES, IN_FEATURES), seed=1)
    gen = torch.Generator().manual_seed(2)
    bias = torch.randn(OUT_FEATURES, generator=gen) * 0.01
    layer = make_linear(info, bias, mode=mode)
    uses_int4 = mode != "dense" and qtype in INT4_TYPES
    assert isinstance(layer, Int4Linear if uses_int4 else DenseLinear)
    weight = oracle_weight(info).double()  # (N, K)
    for lead in ((1,), (7,), (2, 3)):
        x = torch.randn(*lead, IN_FEATURES, generator=gen)  # (..., K)
        y = layer(x)
        assert y.shape == (*lead, OUT_FEATURES) and y.dtype == torch.float32
        want = torch.nn.functional.linear(x.double(), weight, bias.double())  # (..., N)
        err = rel_rms(y, want)
        assert err <= TOLERANCE[mode], f"{qtype.name} {mode} rows {lead}: relative RMS {err:.3g}"


@pytest.mark.parametrize("qtype", sorted(TWO_PLANE_TYPES), ids=lambda t: t.name)
def test_two_plane_types_as_bf16_weights_match_oracle(qtype: QT, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_CPU_TWO_PLANE", "bf16")
    info = weight_info(qtype, (OUT_FEATURES, IN_FEATURES), seed=1)
    gen = torch.Generator().manual_seed(2)
    bias = torch.randn(OUT_FEATURES, generator=gen) * 0.01
    layer = make_linear(info, bias, mode="int4-bf16")
    assert isinstance(layer, Bf16Linear)
    weight = oracle_weight(info).double()  # (N, K)
    for lead in ((1,), (7,), (2, 3), (20,)):
        x = torch.randn(*lead, IN_FEATURES, generator=gen)  # (..., K)
        y = layer(x)
        assert y.shape == (*lead, OUT_FEATURES) and y.dtype == torch.float32
        err = rel_rms(y, torch.nn.functional.linear(x.double(), weight, bias.double()))
        assert 1e-5 < err <= TOLERANCE["int4-bf16"], f"{qtype.name} rows {lead}: relative RMS {err:.3g}"
    block = torch.randn(16, IN_FEATURES, generator=gen)  # a verify block: each row as decoded alone
    assert torch.equal(layer(block), torch.cat([layer(block[i : i + 1]) for i in range(16)]))


def test_two_plane_choice_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    info = weight_info(QT.Q6_K, (8, 256), seed=3)
    for capability, want in (("AVX2", Bf16Linear), ("AVX512", Int4Linear), ("DEFAULT", Int4Linear)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert isinstance(make_linear(info, mode="int4-bf16"), want), capability
        assert isinstance(make_linear(info, mode="dense"), DenseLinear)
        assert isinstance(make_linear(weight_info(QT.Q4_K, (8, 256)), mode="int4-bf16"), Int4Linear)
    monkeypatch.setenv("TANDEM_CPU_TWO_PLANE", "bf16")
    assert isinstance(make_linear(info, mode="int4-bf16"), Bf16Linear)
    assert isinstance(make_linear(info, mode="int4"), Int4Linear)  # the exact float32 op stays what it is


def test_bf16_mode_is_lossy_and_int4_mode_is_not() -> None:
    """Guards the labels: 'int4' must beat bf16 rounding by orders of magnitude."""
    info = weight_info(QT.Q4_K, (64, 512), seed=3)
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(4))  # (4, K)
    want = torch.nn.functional.linear(x.double(), oracle_weight(info).double())
    exact = rel_rms(make_linear(info, mode="int4")(x), want)
    lossy = rel_rms(make_linear(info, mode="int4-bf16")(x), want)
    assert exact < 1e-5 < 1e-4 < lossy


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX512", reason="uint8 packer targets the AVX512 layout"
)
def test_uint8_packer_matches_torch_converter() -> None:
    codes = torch.randint(0, 16, (192, 160), dtype=torch.int32, generator=torch.Generator().manual_seed(5))
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(int4_repack._pack_rows(codes.to(torch.uint8)), want)
    assert int4_repack.packing_matches_torch()


def test_fallback_packer_gives_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    info = weight_info(QT.Q6_K, (70, 256), seed=6)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(7))  # (3, K)
    fast = make_linear(info, mode="int4")(x)
    monkeypatch.setattr(int4_repack, "_packing_checked", False)  # force torch's converter
    slow = make_linear(info, mode="int4")(x)
    assert torch.equal(fast, slow)


def test_chunked_repack_matches_single_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    info = weight_info(QT.Q4_K, (200, 256), seed=8)  # 200 rows: chunks of 64 with a padded tail
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(9))  # (2, K)
    whole = make_linear(info, mode="int4")(x)
    monkeypatch.setattr(int4_repack, "_CHUNK_ROWS", 64)
    chunked = make_linear(info, mode="int4")(x)
    assert torch.equal(whole, chunked)


def test_rejects_bad_arguments() -> None:
    info = weight_info(QT.Q4_0, (4, 64))
    with pytest.raises(ValueError, match="mode"):
        make_linear(info, mode="fast")
    with pytest.raises(ValueError, match="Q2_K has no int4"):
        int4_repack.repack_int4(weight_info(QT.Q2_K, (4, 256)).data, QT.Q2_K, (4, 256))
    with pytest.raises(ValueError, match="does not match"):
        int4_repack.repack_int4(info.data[:-1], QT.Q4_0, (4, 64))


@pytest.mark.skipif(not REAL_MODEL.exists(), reason="Qwen2.5-Coder-1.5B GGUF not installed")
@pytest.mark.parametrize("name", ["output.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_down.weight"])
def test_real_model_rows(name: str) -> None:
    """The first 96 rows of real Q4_K / Q6_K weights, including the Q6_K LM head."""
    full = GGUFModelFile.open(REAL_MODEL).tensors[name]
    rows, cols = 96, full.shape[1]
    nbytes = full.n_bytes // full.shape[0] * rows
    info = TensorInfo(name, full.qtype, (rows, cols), full.data[:nbytes])
    x = torch.randn(2, cols, generator=torch.Generator().manual_seed(10))  # (2, K)
    want = torch.nn.functional.linear(x.double(), oracle_weight(info).double())
    for mode in MODES:
        err = rel_rms(make_linear(info, mode=mode)(x), want)
        assert err <= TOLERANCE[mode], f"{name} {mode}: relative RMS {err:.3g}"


@pytest.mark.parametrize("two_plane", ["int4", "bf16"])
@pytest.mark.parametrize("qtype", [QT.Q6_K, QT.Q8_0], ids=lambda t: t.name)
def test_split_types_go_dense_for_large_batches(
    qtype: QT, two_plane: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int4-bf16 hands prefill-sized batches of two-plane types to the exact dense path."""
    monkeypatch.setenv("TANDEM_CPU_TWO_PLANE", two_plane)
    info = weight_info(qtype, (OUT_FEATURES, IN_FEATURES), seed=11)
    layer = make_linear(info, mode="int4-bf16")
    gen = torch.Generator().manual_seed(12)
    weight = oracle_weight(info).double()
    small = torch.randn(linear.DENSE_FROM_ROWS - 1, IN_FEATURES, generator=gen)  # (M, K)
    large = torch.randn(linear.DENSE_FROM_ROWS, IN_FEATURES, generator=gen)
    assert rel_rms(layer(small), torch.nn.functional.linear(small.double(), weight)) > 1e-4  # bf16 op
    assert rel_rms(layer(large), torch.nn.functional.linear(large.double(), weight)) <= 1e-5  # dense


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows", [128, 200])
def test_direct_packer_matches_code_path(qtype: QT, n_rows: int) -> None:
    """Q4_K/Q6_K pack straight from GGUF bytes; the one-byte-per-code path is the reference."""
    info = weight_info(qtype, (n_rows, 512), seed=13)
    direct = int4_repack.repack_int4(info.data, qtype, info.shape)
    by_codes = int4_repack.repack_int4(info.data, qtype, info.shape, use_direct=False)
    assert torch.equal(direct.scales_zeros, by_codes.scales_zeros)
    if n_rows % int4_repack.PACK_ROWS == 0:  # padding rows (scale 0) may hold other codes
        assert torch.equal(direct.packed, by_codes.packed)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(14))  # (3, K)
    assert torch.equal(int4_repack.int4_matmul(x, direct), int4_repack.int4_matmul(x, by_codes))
