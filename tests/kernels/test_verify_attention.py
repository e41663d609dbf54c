"""verify_attention (R rows over one cache, each tile read once) against decode_attention row by row: equal
bit for bit, so speculative verification stays lossless."""

import itertools

import pytest
import torch

from kernels.decode_attention import decode_attention, decode_attention_reference
from kernels.verify_attention import applies, verify_attention
from tests.kernels._util import (
    DEVICE,
    KV_TYPES,
    QUANT_TYPES,
    assert_close_rms,
    gpu,
    random_sinks,
    random_store,
)


def _check_rows(k_type, v_type, lengths, *, dim, gqa, positions, split, block_n, warps_per_program, sinks,
                form, seed=0, tile_rows=None):
    gen = torch.Generator().manual_seed(seed)
    ks = random_store(k_type, (1, 2, positions), dim, gen)
    vs = random_store(v_type, (1, 2, positions), dim, gen)
    n_rows = len(lengths)
    q = torch.randn(n_rows, 2 * gqa, dim, generator=gen).to(DEVICE)  # (R, Hq, D)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    k_sink = random_sinks(1, 2, dim, gen) if sinks and k_type in QUANT_TYPES else None
    v_sink = random_sinks(1, 2, dim, gen) if sinks and (v_type in QUANT_TYPES or k_sink is not None) else None
    shared_sink = lambda t: None if t is None else t.expand(n_rows, *t.shape[1:])
    out = torch.full(q.shape, float("nan"), device=DEVICE)
    verify_attention(q, ks.shared_by(n_rows), vs.shared_by(n_rows), lens, max_length=positions,
                     split_size=split, block_n=block_n, warps_per_program=warps_per_program, out=out,
                     form=form, tile_rows=tile_rows, k_sink=shared_sink(k_sink), v_sink=shared_sink(v_sink))
    for r, n in enumerate(lengths):
        single = decode_attention(q[r : r + 1], ks, vs, lens[r : r + 1], max_length=positions,
                                  split_size=split, block_n=block_n, k_sink=k_sink, v_sink=v_sink)
        assert torch.equal(out[r : r + 1], single), (
            f"row {r} (length {n}) differs from its decode by {(out[r] - single[0]).abs().max().item():.3e}")
    live = [r for r, n in enumerate(lengths) if n > 0]
    for r in set(range(n_rows)) - set(live):
        assert torch.equal(out[r], torch.zeros_like(out[r])), "a padding row attends to nothing"
    live_sink = lambda t: None if t is None else t.expand(len(live), *t.shape[1:])
    want = decode_attention_reference(q[live], ks.shared_by(len(live)), vs.shared_by(len(live)), lens[live],
                                      k_sink=live_sink(k_sink), v_sink=live_sink(v_sink))
    assert_close_rms(f"verify rows ({k_type} K, {v_type} V)", out[live], want, 5e-3)


@pytest.mark.parametrize(
    "k_type,v_type,split,warps_per_program,sinks",
    [("q4_0", "q8_0", 32, 4, False), ("f16", "q4_1", 128, 2, True), ("q4_0", "q4_0", 128, 4, True),
     ("bf16", "bf16", 64, 1, False), ("q8_0", "f16", 32, 2, True)],
    ids=["q4_0-q8_0-short", "f16-q4_1-sinks", "q4_0-sinks", "bf16-one-warp-programs", "q8_0-f16-sinks"],
)
@pytest.mark.parametrize("form", ["tile", "packed"])
def test_verify_rows_equal_decodes_bit_for_bit(k_type, v_type, split, warps_per_program, sinks, form):
    # consecutive verify positions ending inside, at and past tile and split boundaries; a padding row;
    # rows that end inside the sinks (2, 3) next to long ones
    lengths = [2, 3, 63, 64, 65, 127, 128, 129, 0, 261] if sinks else [61, 62, 63, 64, 65, 0, 129]
    _check_rows(k_type, v_type, lengths, dim=64, gqa=3, positions=300, split=split, block_n=32,
                warps_per_program=warps_per_program, sinks=sinks, form=form)


def test_verify_tiles_of_16_pairs_equal_decodes():
    # the tile form with 16-row tiles: a row's heads across two programs
    _check_rows("q4_0", "q4_0", [61, 62, 63, 64, 65, 0, 129], dim=64, gqa=3, positions=300, split=128,
                block_n=32, warps_per_program=None, sinks=True, form="tile", tile_rows=16)


@pytest.mark.parametrize("k_type,v_type,split,warps_per_program",
                         [("q4_0", "q8_0", 64, 4), ("f16", "q4_1", 128, 2), ("bf16", "bf16", 64, 1)])
@pytest.mark.parametrize("form", ["tile", "packed"])
def test_verify_within_one_split_takes_the_decode_kernel(monkeypatch, k_type, v_type, split,
                                                         warps_per_program, form):
    # max_length within one split (the engine's short verify steps): the decode kernel with the rows as
    # sequences, no verify launch and no merge; the bits of the two-split verify launch and of each row's
    # decode
    import kernels.decode_attention as da
    import kernels.verify_attention as va

    gen = torch.Generator().manual_seed(11)
    ks, vs = (random_store(t, (1, 2, split + 32), 64, gen) for t in (k_type, v_type))
    lengths = [1, 2, 31, 32, 33, split - 1, split, 0]
    n = len(lengths)
    q = torch.randn(n, 6, 64, generator=gen).to(DEVICE)  # (R, Hq, D)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    runs = []
    for max_length in (split, split + 32):
        with monkeypatch.context() as m:
            if max_length == split:
                m.setattr(va, "_packed_split_kernel", None)  # launching either would fail
                m.setattr(va, "_tile_split_kernel", None)
                m.setattr(da, "_decode_reduce_kernel", None)
            out = torch.full((n, 6, 64), float("nan"), dtype=torch.float16, device=DEVICE)
            verify_attention(q, ks.shared_by(n), vs.shared_by(n), lens, max_length=max_length,
                             split_size=split, block_n=32, warps_per_program=warps_per_program, out=out,
                             form=form)
        runs.append(out)
    direct, merged = runs
    assert torch.equal(direct, merged)
    assert torch.equal(direct[-1], torch.zeros_like(direct[-1]))  # a padding row attends to nothing
    for r in range(n):
        single = torch.empty(1, 6, 64, dtype=torch.float16, device=DEVICE)
        decode_attention(q[r : r + 1], ks, vs, lens[r : r + 1], max_length=split, split_size=split,
                         block_n=32, out=single)
        assert torch.equal(direct[r : r + 1], single), f"row {r} (length {lengths[r]}) differs from decode"


def test_verify_rejects_rows_that_do_not_share_a_cache():
    gen = torch.Generator().manual_seed(0)
    ks = random_store("q4_0", (2, 1, 64), 32, gen)
    q = torch.randn(2, 1, 32, generator=gen).to(DEVICE)
    lens = torch.tensor([10, 11], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="share one cache"):
        verify_attention(q, ks, ks, lens, max_length=64, split_size=32, block_n=32)  # two sequences
    one = ks.narrow(0, 0, 1)
    with pytest.raises(ValueError, match="share one cache"):  # a sink for 3 rows with 2 queries
        verify_attention(q, one, one, lens, max_length=64, split_size=32, block_n=32,
                         k_sink=random_sinks(1, 1, 32, gen).expand(3, -1, -1, -1),
                         v_sink=random_sinks(1, 1, 32, gen).expand(3, -1, -1, -1))


def test_verify_takes_a_one_sequence_cache_as_the_rows_shared_view():
    gen = torch.Generator().manual_seed(2)
    ks, vs = random_store("q4_0", (1, 2, 96), 64, gen), random_store("q8_0", (1, 2, 96), 64, gen)
    k_sink, v_sink = random_sinks(1, 2, 64, gen), random_sinks(1, 2, 64, gen)
    q = torch.randn(3, 4, 64, generator=gen).to(DEVICE)
    lens = torch.tensor([40, 41, 42], dtype=torch.int32, device=DEVICE)
    args = dict(max_length=96, split_size=32, block_n=32)
    plain = verify_attention(q, ks, vs, lens, k_sink=k_sink, v_sink=v_sink, **args)
    shared = verify_attention(q, ks.shared_by(3), vs.shared_by(3), lens, k_sink=k_sink.expand(3, -1, -1, -1),
                              v_sink=v_sink.expand(3, -1, -1, -1), **args)
    assert torch.equal(plain, shared)


@pytest.mark.parametrize(
    "dim,gqa,kwargs,match",
    [(64, 17, {}, "query heads"), (256, 2, {}, "head_dim"), (64, 2, {"split_size": 48}, "multiple"),
     (64, 2, {"warps_per_program": 3}, "power of two")],
    ids=["gqa-17", "head-dim-256", "split-not-tiles", "warps-per-program-3"],
)
def test_verify_refuses_what_it_was_not_checked_on(dim, gqa, kwargs, match):
    gen = torch.Generator().manual_seed(3)
    ks = random_store("q4_0", (1, 1, 64), dim, gen)
    q = torch.randn(2, gqa, dim, generator=gen).to(DEVICE)
    lens = torch.tensor([10, 11], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        verify_attention(q, ks, ks, lens, **{"max_length": 64, "split_size": 32, "block_n": 32, **kwargs})


def test_verify_applies_to_rows_without_a_window():
    assert applies(16, 6, 128, None) and applies(2, 16, 64, 0)
    assert not applies(1, 6, 128, None)  # one row: the decode kernel
    assert not applies(16, 6, 128, 512)  # a window: each row's tiles start elsewhere
    assert not applies(16, 32, 128, None)  # a 32-row head group: not checked on the GPU
    assert not applies(16, 2, 256, None)  # head_dim 256 (Gemma 3): spills, not checked on the GPU


@gpu
@pytest.mark.parametrize("k_type,v_type", [p for p in itertools.product(KV_TYPES, KV_TYPES) if p[0] == p[1]]
                         + [("q4_0", "q8_0"), ("f16", "q4_0")])
@pytest.mark.parametrize("split,warps_per_program", [(128, 4), (128, 8), (512, 2)],
                         ids=["engine-split", "eight-warp-programs", "one-warp-decode-split"])
@pytest.mark.parametrize("form", ["tile", "packed"])
def test_verify_rows_equal_decodes_real_shapes_gpu(k_type, v_type, split, warps_per_program, form):
    # Qwen2.5-1.5B's attention (Hq 12, Hkv 2, D 128), 16 verify rows at depth ~4096, the engine's block_n;
    # split 512 makes the decode run its one-warp launch, 128 its four-warp one
    lengths = [4090 + r for r in range(15)] + [0]
    _check_rows(k_type, v_type, lengths, dim=128, gqa=6, positions=4608, split=split, block_n=64,
                warps_per_program=warps_per_program, sinks=True, form=form, seed=3)


@gpu
@pytest.mark.parametrize("k_type,v_type", [("q4_0", "q4_0"), ("q8_0", "q8_0"), ("q4_0", "q8_0")])
@pytest.mark.parametrize("split", [128, 512], ids=["4-warp-decode", "1-warp-decode"])
@pytest.mark.parametrize("form", ["tile", "packed"])
@pytest.mark.parametrize("at_operand", ["1", "0"], ids=["v-at-operand", "v-at-load"])
def test_verify_rows_equal_decodes_with_v_dequantized_either_place_gpu(monkeypatch, k_type, v_type, split,
                                                                      form, at_operand):
    # kernels.decode_attention.v_at_operand forced either way: every form follows it as the decode does
    monkeypatch.setenv("TANDEM_ATTN_V_AT_OPERAND", at_operand)
    lengths = [4090 + r for r in range(15)] + [0]
    _check_rows(k_type, v_type, lengths, dim=128, gqa=6, positions=4608, split=split, block_n=64,
                warps_per_program=4, sinks=True, form=form, seed=5)


@gpu
@pytest.mark.parametrize("k_type,v_type", [("q4_0", "q4_0"), ("f16", "f16")])
def test_prefetch_changes_no_bit_gpu(monkeypatch, k_type, v_type):
    # the L2 prefetch before the PDL wait (kernels.decode_attention.prefetch_enabled) is only a hint
    from kernels.decode_attention import prefetch_enabled

    gen = torch.Generator().manual_seed(3)
    ks, vs = (random_store(t, (1, 2, 3072), 128, gen) for t in (k_type, v_type))
    q = torch.randn(16, 12, 128, generator=gen).to(DEVICE)  # (R, Hq, D)
    lens = torch.arange(2990, 3006, dtype=torch.int32, device=DEVICE)
    assert prefetch_enabled(q.device, ks, vs, 2, 3072), "this launch does not take the prefetch path"
    outs = []
    for on in ("1", "0"):
        monkeypatch.setenv("TANDEM_ATTN_PREFETCH", on)
        outs.append(verify_attention(q, ks.shared_by(16), vs.shared_by(16), lens, max_length=3072,
                                     split_size=256))
    assert torch.equal(*outs)


def test_form_follows_the_slabs_against_the_multiprocessors(monkeypatch):
    # the 2-D tile, but for an unquantized cache whose launch has at least as many (split, KV head) slabs as
    # SMs: packed pairs; never packed without a GPU; TANDEM_VERIFY_FORM overrides the choice when it names
    # a form
    import kernels.verify_attention as va

    monkeypatch.delenv("TANDEM_VERIFY_FORM", raising=False)
    assert va.choose_form(500, 2, torch.device("cpu"), False) == "tile"
    monkeypatch.setattr(va, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert va.choose_form(34, 2, cuda, False) == "tile"  # a 4K cache on an H200 (68 slabs)
    assert va.choose_form(66, 2, cuda, False) == va.choose_form(130, 2, cuda, False) == "packed"  # 8K, 16K
    assert va.choose_form(130, 2, cuda, True) == "tile"  # quantized K and V
    monkeypatch.setenv("TANDEM_VERIFY_FORM", "tile")
    assert va.choose_form(130, 2, cuda, False) == "tile"
    monkeypatch.setenv("TANDEM_VERIFY_FORM", "rows")  # not a form (any more): the choice stands
    assert va.choose_form(130, 2, cuda, False) == "packed"
    monkeypatch.delenv("TANDEM_VERIFY_FORM")
    seen = []
    monkeypatch.setattr(va, "choose_form", lambda *args: seen.append(args[:2] + args[3:]) or "tile")
    gen = torch.Generator().manual_seed(4)
    ks = random_store("q4_0", (1, 2, 128), 64, gen)
    q = torch.randn(3, 4, 64, generator=gen).to(DEVICE)
    lens = torch.tensor([40, 41, 42], dtype=torch.int32, device=DEVICE)
    va.verify_attention(q, ks, ks, lens, max_length=128, split_size=32, block_n=32)
    assert seen == [(4, 2, True)]  # asked with the launch's splits, KV heads and types when form is not given
    with pytest.raises(ValueError, match="form must be one of"):
        va.verify_attention(q, ks, ks, lens, max_length=128, split_size=32, block_n=32, form="rows")
    with pytest.raises(ValueError, match="tile_rows must be 16 or 32"):
        va.verify_attention(q, ks, ks, lens, max_length=128, split_size=32, block_n=32, tile_rows=64)
