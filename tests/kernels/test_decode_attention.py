"""decode_attention (split-context, two-step) against decode_attention_reference (dequantize + SDPA)."""

import itertools

import pytest
import torch

from engine import hadamard, kv_quant
from kernels.decode_attention import decode_attention, decode_attention_reference
from kernels.k_write import k_write
from kernels.v_write import v_write
from tests.kernels._util import (
    DEVICE,
    KV_TYPES,
    QUANT_TYPES,
    assert_close_rms,
    gpu,
    random_sinks,
    random_store,
)

TOL = 3e-3  # both sides read the same dequantized values; the kernel rounds its dot operands to fp16


def _case(k_type, v_type, bsz, hkv, gqa, dim, lengths, positions, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_store = random_store(k_type, (bsz, hkv, positions), dim, gen)
    v_store = random_store(v_type, (bsz, hkv, positions), dim, gen)
    q = torch.randn(bsz, hkv * gqa, dim, generator=gen).to(DEVICE)  # (B, Hq, D)
    lens = torch.tensor(lengths, dtype=torch.int32)
    return q, k_store, v_store, lens


@pytest.mark.parametrize("k_type,v_type", list(itertools.product(KV_TYPES, KV_TYPES)))
def test_decode_all_type_pairs(k_type, v_type):
    # two sequences of odd lengths 41 and 123, GQA 4, splits of 32 positions
    q, ks, vs, lens = _case(k_type, v_type, 2, 1, 4, 64, [41, 123], 128)
    got = decode_attention(q, ks, vs, lens, split_size=32, block_n=32)
    want = decode_attention_reference(q, ks, vs, lens)
    assert_close_rms(f"decode output ({k_type} K, {v_type} V)", got, want, TOL)


@pytest.mark.parametrize(
    "dim,gqa,lengths,window,split",
    [(128, 1, [123], None, 64), (64, 4, [41], 17, 32), (64, 1, [123, 1], 50, 32), (128, 4, [5], None, None)],
    ids=["D128-gqa1", "window17", "window50-len1", "default-split"],
)
@pytest.mark.parametrize("k_type,v_type", [("q4_0", "q8_0"), ("q8_0", "q4_1")])
def test_decode_shapes_and_windows(dim, gqa, lengths, window, split, k_type, v_type):
    q, ks, vs, lens = _case(k_type, v_type, len(lengths), 2, gqa, dim, lengths, 128)
    got = decode_attention(q, ks, vs, lens, window=window, split_size=split, block_n=32)
    want = decode_attention_reference(q, ks, vs, lens, window=window)
    assert_close_rms(f"decode output (D={dim}, GQA={gqa}, window={window})", got, want, TOL)


def test_decode_many_splits():
    # 35 splits of 32 positions: the reduce step walks its splits in two chunks of 32
    q, ks, vs, lens = _case("q4_0", "q4_1", 1, 1, 2, 32, [1100], 1104)
    got = decode_attention(q, ks, vs, lens, split_size=32, block_n=32)
    want = decode_attention_reference(q, ks, vs, lens)
    assert_close_rms("decode output (35 splits)", got, want, TOL)


def test_decode_rejects_16_row_tiles():
    q, ks, vs, lens = _case("q4_0", "q4_0", 1, 1, 1, 32, [20], 20)
    with pytest.raises(ValueError, match="block_n"):
        decode_attention(q, ks, vs, lens, split_size=16, block_n=16)


def test_decode_rotated_cache_matches_full_precision_attention():
    # end to end: k_write rotates + quantizes K, Q is rotated the same way -> attention ~ fp32 attention
    gen = torch.Generator().manual_seed(3)
    bsz, hkv, gqa, dim, n = 1, 2, 2, 64, 41
    k = torch.randn(bsz, hkv, n, dim, generator=gen).to(DEVICE)  # (B, Hkv, T, D)
    v = torch.randn(bsz, hkv, n, dim, generator=gen).to(DEVICE)  # (B, Hkv, T, D)
    q = torch.randn(bsz, hkv * gqa, dim, generator=gen).to(DEVICE)  # (B, Hq, D)
    rot = hadamard.make_rotation(dim)
    ks = kv_quant.allocate("q8_0", (bsz, hkv, n), dim, DEVICE)
    vs = kv_quant.allocate("q8_0", (bsz, hkv, n), dim, DEVICE)
    k_write(k, ks, 0, rotation=rot)
    v_write(v, vs, 0)
    got = decode_attention(hadamard.rotate(q, rot), ks, vs, n)
    want = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None, :], k.repeat_interleave(gqa, 1), v.repeat_interleave(gqa, 1)
    )[:, :, 0, :]  # (B, Hq, D)
    assert_close_rms("decode output over a rotated q8_0 cache vs fp32 attention", got, want, 0.02)


@gpu
@pytest.mark.parametrize("k_type,v_type", list(itertools.product(KV_TYPES, KV_TYPES)))
@pytest.mark.parametrize("dim,gqa,window", [(128, 6, None), (64, 7, None), (256, 4, 512)])
def test_decode_real_shapes_gpu(k_type, v_type, dim, gqa, window):
    q, ks, vs, lens = _case(k_type, v_type, 2, 2, gqa, dim, [4097, 1000], 4200)
    got = decode_attention(q, ks, vs, lens, window=window)
    want = decode_attention_reference(q, ks, vs, lens, window=window)
    assert_close_rms(f"decode output ({k_type} K, {v_type} V, D={dim})", got, want, TOL)


@gpu
@pytest.mark.parametrize(
    "block_n,num_warps,num_stages",
    [(32, 1, 2), (64, 1, 2), (32, 1, 3), (64, 2, 2), (64, 4, 2), (128, 4, 2), (64, 1, 3), (64, 2, 3),
     (64, 4, 3), (128, 4, 3), (32, 1, 4), (64, 4, 4)],
)
@pytest.mark.parametrize(
    "k_type,v_type", [("q4_0", "q4_0"), ("q8_0", "q8_0"), ("q4_1", "f16"), ("bf16", "q4_0")]
)
def test_decode_launch_configs_gpu(block_n, num_warps, num_stages, k_type, v_type):
    # whole tiles and a partial last tile in every split (lengths not multiples of block_n), GQA 6
    q, ks, vs, lens = _case(k_type, v_type, 3, 2, 6, 128, [4097, 1000, 77], 4200)
    got = decode_attention(q, ks, vs, lens, split_size=4 * block_n, block_n=block_n, num_warps=num_warps,
                           num_stages=num_stages)
    want = decode_attention_reference(q, ks, vs, lens)
    config = f"{block_n}/{num_warps}/{num_stages}"
    assert_close_rms(f"decode output ({k_type} K, {v_type} V, {config})", got, want, TOL)


@gpu
@pytest.mark.parametrize(
    "k_type,v_type", [("q4_0", "q4_0"), ("q8_0", "q8_0"), ("q4_1", "q4_1"), ("q4_0", "q8_0")]
)
def test_decode_ptx_dequantization_matches_portable_gpu(monkeypatch, k_type, v_type):
    # the inline-PTX dequantization gives the portable path's fp16 values: round_fp16(d * q) for q4_0 and
    # q8_0, so the outputs are equal; q4_1's d * q + m is one fma there and may round once less. V is
    # dequantized at the operand, as the portable path's plain operations are (v_at_operand: where it is
    # done decides the products' slots in the tensor-core instruction, hence the last bits)
    monkeypatch.setenv("TANDEM_ATTN_V_AT_OPERAND", "1")
    q, ks, vs, lens = _case(k_type, v_type, 2, 2, 6, 128, [3000, 515], 3072)
    fast = decode_attention(q, ks, vs, lens, split_size=256, fast=True)
    portable = decode_attention(q, ks, vs, lens, split_size=256, fast=False)
    if "q4_1" in (k_type, v_type):
        assert_close_rms("PTX vs portable dequantization", fast, portable, 1e-3)
    else:
        assert torch.equal(fast, portable), f"max difference {(fast - portable).abs().max().item():.3e}"


@gpu
@pytest.mark.parametrize("k_type,v_type,window", [("q4_0", "q4_0", None), ("f16", "f16", None),
                                                  ("q4_1", "q8_0", 700)])
@pytest.mark.parametrize("split", [128, 3072], ids=["splits", "one-split"])
def test_prefetch_changes_no_bit_gpu(monkeypatch, k_type, v_type, window, split):
    # the L2 prefetch before the PDL wait (kernels.decode_attention.prefetch_enabled) is only a hint
    import kernels.decode_attention as da

    q, ks, vs, lens = _case(k_type, v_type, 2, 2, 6, 128, [3000, 515], 3072)
    assert da.prefetch_enabled(q.device, ks, vs, 4, 3072), "this launch does not take the prefetch path"
    outs = []
    for on in ("1", "0"):
        monkeypatch.setenv("TANDEM_ATTN_PREFETCH", on)
        outs.append(decode_attention(q, ks, vs, lens, split_size=split, window=window, max_length=3072))
    assert torch.equal(*outs)


@gpu
@pytest.mark.parametrize("k_type,v_type", [("q4_0", "q4_0"), ("q8_0", "q8_0"), ("q4_1", "q4_1"),
                                           ("f16", "q4_0"), ("q4_0", "q8_0")])
@pytest.mark.parametrize("split", [128, 512], ids=["4-warps", "1-warp"])
@pytest.mark.parametrize("at_operand", ["1", "0"], ids=["v-at-operand", "v-at-load"])
def test_either_v_dequantization_place_matches_the_reference_gpu(monkeypatch, k_type, v_type, split,
                                                                at_operand):
    # kernels.decode_attention.v_at_operand forced either way, on both launch configs
    monkeypatch.setenv("TANDEM_ATTN_V_AT_OPERAND", at_operand)
    q, ks, vs, lens = _case(k_type, v_type, 2, 2, 6, 128, [3000, 515], 3072)
    got = decode_attention(q, ks, vs, lens, split_size=split)
    want = decode_attention_reference(q, ks, vs, lens)
    assert_close_rms(f"decode output ({k_type} K, {v_type} V, V at operand {at_operand})", got, want, TOL)


@pytest.mark.parametrize("split", [32, 128], ids=["short-splits", "long-splits"])  # the two launch configs
@pytest.mark.parametrize("k_type,v_type,window", [("q4_0", "q8_0", None), ("f16", "q4_1", 20)])
def test_verify_rows_equal_single_decodes_bit_for_bit(k_type, v_type, window, split):
    # rows of a verify block = independent decode queries over one cache with per-row lengths
    q, ks, vs, _ = _case(k_type, v_type, 1, 2, 3, 64, [1], 300, seed=4)
    gen = torch.Generator().manual_seed(9)
    rows_q = torch.randn(4, 6, 64, generator=gen).to(DEVICE)  # (R, Hq, D)
    lengths = torch.tensor([261, 262, 263, 0], dtype=torch.int32, device=DEVICE)  # last row: padding
    out = torch.full((4, 6, 64), float("nan"), device=DEVICE)
    decode_attention(rows_q, ks.shared_by(4), vs.shared_by(4), lengths,
                     max_length=300, split_size=split, block_n=32, window=window, out=out)
    for r in range(3):
        single = decode_attention(rows_q[r : r + 1], ks, vs, lengths[r : r + 1], max_length=300,
                                  split_size=split, block_n=32, window=window)
        assert torch.equal(out[r : r + 1], single), f"row {r} differs from its decode"
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # an empty row attends to nothing
    want = decode_attention_reference(rows_q[:3], ks.shared_by(3), vs.shared_by(3),
                                      lengths[:3], window=window)
    assert_close_rms("verify rows", out[:3].float(), want, 5e-3)


@pytest.mark.parametrize("split", [64, 256], ids=["4-warp-launch", "1-warp-launch"])
@pytest.mark.parametrize(
    "k_type,v_type,window", [("q8_0", "q4_0", None), ("f16", "f16", 30), ("bf16", "q4_1", None)]
)
def test_one_split_writes_the_merged_output_itself(k_type, v_type, window, split):
    # max_length within one split: the split kernel divides and stores the output (no merge launch); with a
    # larger max_length the same single split goes through the merge kernel: the same bits
    q, ks, vs, _ = _case(k_type, v_type, 3, 2, 3, 64, [1], split + 32, seed=6)
    lengths = torch.tensor([split, 37, 0], dtype=torch.int32, device=DEVICE)  # full split, short one, empty
    runs = []
    for max_length in (split, split + 32):
        out = torch.full((3, 6, 64), float("nan"), dtype=torch.float16, device=DEVICE)
        decode_attention(q, ks, vs, lengths, max_length=max_length, split_size=split, block_n=32,
                         window=window, out=out)
        runs.append(out)
    direct, merged = runs
    assert torch.equal(direct, merged)
    assert torch.equal(direct[2], torch.zeros_like(direct[2]))  # an empty sequence attends to nothing
    want = decode_attention_reference(q[:2], ks.narrow(0, 0, 2), vs.narrow(0, 0, 2), lengths[:2],
                                      window=window)
    assert_close_rms("one-split decode", direct[:2].float(), want, TOL)


# ---- attention sinks: positions < S of a side read from its f16 copies --------------------------------


@pytest.mark.parametrize(
    "k_type,v_type,lengths,window,split",
    [("q4_0", "q8_0", [41, 123], None, 32), ("q4_0", "f16", [3, 70], None, 32),
     ("bf16", "q8_0", [2, 64], 63, 64), ("q4_0", "q4_1", [7, 40], 5, 32), ("q8_0", "q4_0", [9, 99], 7, 64)],
    ids=["both", "k-only-short", "v-only-window-at-sinks", "window-past-sinks", "window-in-sinks"],
)
def test_decode_reads_sinks_from_their_f16_copies(k_type, v_type, lengths, window, split):
    # the quantized sides keep sinks; an f16/bf16 side is read from its store
    q, ks, vs, lens = _case(k_type, v_type, 2, 2, 3, 64, lengths, 128, seed=5)
    gen = torch.Generator().manual_seed(6)
    k_sink = random_sinks(2, 2, 64, gen) if k_type in QUANT_TYPES else None
    v_sink = random_sinks(2, 2, 64, gen) if v_type in QUANT_TYPES else None
    got = decode_attention(q, ks, vs, lens, window=window, split_size=split, block_n=32,
                           k_sink=k_sink, v_sink=v_sink)
    want = decode_attention_reference(q, ks, vs, lens, window=window, k_sink=k_sink, v_sink=v_sink)
    assert_close_rms(f"decode output with sinks ({k_type} K, {v_type} V)", got, want, TOL)
    plain = decode_attention_reference(q, ks, vs, lens, window=window)
    sees_sinks = [n for n in lengths if window is None or n - window < 4]
    if sees_sinks:
        assert (got - plain).abs().max() > 1e-2, "the sinks should change the result"
    else:
        assert_close_rms("decode output, sinks out of the window", got, plain, TOL)


@pytest.mark.parametrize("split", [32, 128], ids=["short-splits", "long-splits"])
def test_verify_rows_with_sinks_equal_single_decodes_bit_for_bit(split):
    q, ks, vs, _ = _case("q4_0", "q4_0", 1, 2, 3, 64, [1], 300, seed=4)
    gen = torch.Generator().manual_seed(8)
    k_sink, v_sink = random_sinks(1, 2, 64, gen), random_sinks(1, 2, 64, gen)
    rows_q = torch.randn(4, 6, 64, generator=gen).to(DEVICE)  # (R, Hq, D)
    lengths = torch.tensor([2, 3, 263, 0], dtype=torch.int32, device=DEVICE)  # rows inside and past the sinks
    expand = lambda t: t.expand(4, *t.shape[1:])
    out = torch.full((4, 6, 64), float("nan"), device=DEVICE)
    decode_attention(rows_q, ks.shared_by(4), vs.shared_by(4), lengths, max_length=300,
                     split_size=split, block_n=32, out=out, k_sink=expand(k_sink), v_sink=expand(v_sink))
    for r in range(3):
        single = decode_attention(rows_q[r : r + 1], ks, vs, lengths[r : r + 1], max_length=300,
                                  split_size=split, block_n=32, k_sink=k_sink, v_sink=v_sink)
        assert torch.equal(out[r : r + 1], single), f"row {r} differs from its decode"
    want = decode_attention_reference(rows_q[:3], ks.shared_by(3), vs.shared_by(3),
                                      lengths[:3], k_sink=expand(k_sink)[:3], v_sink=expand(v_sink)[:3])
    assert_close_rms("verify rows with sinks", out[:3].float(), want, 5e-3)


def test_v_place_follows_the_splits_launch(monkeypatch):
    # kernels.decode_attention.v_at_operand: at the operand for one-warp launches, where loaded for the
    # others; TANDEM_ATTN_V_AT_OPERAND=1 / =0 forces one place for every launch (A/Bs)
    from kernels.decode_attention import launch_config, v_at_operand

    monkeypatch.delenv("TANDEM_ATTN_V_AT_OPERAND", raising=False)
    short, long = launch_config(128, 64, 9216)[0], launch_config(512, 64, 9216)[0]
    assert (short, long) == (4, 1)
    assert (v_at_operand(short), v_at_operand(long)) == (False, True)
    for forced, place in (("1", True), ("0", False)):
        monkeypatch.setenv("TANDEM_ATTN_V_AT_OPERAND", forced)
        assert v_at_operand(short) == v_at_operand(long) == place


def test_decode_sinks_are_checked():
    q, ks, vs, lens = _case("q4_0", "q4_0", 1, 1, 1, 32, [20], 40)
    gen = torch.Generator().manual_seed(1)
    with pytest.raises(ValueError, match="at most"):
        decode_attention(q, ks, vs, lens, block_n=32, k_sink=random_sinks(1, 1, 32, gen, 65),
                         v_sink=random_sinks(1, 1, 32, gen, 65))
    with pytest.raises(ValueError, match="same number"):
        decode_attention(q, ks, vs, lens, block_n=32, k_sink=random_sinks(1, 1, 32, gen, 4),
                         v_sink=random_sinks(1, 1, 32, gen, 2))
    with pytest.raises(ValueError, match="q4_0 V store needs its sinks"):
        decode_attention(q, ks, vs, lens, block_n=32, k_sink=random_sinks(1, 1, 32, gen, 4))


@gpu
@pytest.mark.parametrize(
    "k_type,v_type", [("q4_0", "q4_0"), ("q8_0", "q8_0"), ("q4_0", "q8_0"), ("f16", "q4_0")]
)
@pytest.mark.parametrize("window", [None, 512])
def test_decode_sinks_real_shapes_gpu(k_type, v_type, window):
    q, ks, vs, lens = _case(k_type, v_type, 3, 2, 6, 128, [4097, 1000, 3], 4200)
    gen = torch.Generator().manual_seed(2)
    k_sink = random_sinks(3, 2, 128, gen) if k_type != "f16" else None
    v_sink = random_sinks(3, 2, 128, gen)
    got = decode_attention(q, ks, vs, lens, window=window, k_sink=k_sink, v_sink=v_sink)
    want = decode_attention_reference(q, ks, vs, lens, window=window, k_sink=k_sink, v_sink=v_sink)
    assert_close_rms(f"decode output with sinks ({k_type} K, {v_type} V)", got, want, TOL)
