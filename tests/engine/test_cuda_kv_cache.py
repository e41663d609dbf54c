"""engine.cuda_kv_cache.CudaKVCache (the Triton kernels' cache) against engine.kv_cache.KVCache (torch) with
the full K recipe: rotation, smoothing, K equalization and attention sinks.

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors at these tiny shapes; with CUDA the
same tests run on the GPU. Both caches get the same K, V and Q through the KVCache interface (write, then
attention) and must agree within the kernels' fp16 tolerance: they quantize the same values (the write
kernel is byte-exact against the torch quantizer; the rotation's float32 rounding may differ, which can
flip a rare 4-bit rounding) and the attention kernels round their dot operands to fp16.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernels module is imported

from engine import kv_quant  # noqa: E402
from engine.api import EngineConfig  # noqa: E402
from engine.cuda_kv_cache import CudaKVCache  # noqa: E402
from engine.k_equalize import resolve_k_equalize  # noqa: E402
from engine.kv_cache import SINK_TOKENS, KVCache, make_kv_cache, resolve_k_smooth  # noqa: E402
from engine.session import Engine  # noqa: E402
from engine.snapshots import SnapshotStore  # noqa: E402
from tests.engine.tiny_models import write_tiny_model  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
# relative RMS of the attention outputs; measured under the interpreter (seeds 1 and 5, every case below):
# 2e-4..5e-4 for the quantized pairs, up to 1e-3 for f16; the old reduced recipe (no equalization, no
# sinks) is off by 1e-2 (q8_0) to 0.33 (q4_0)
TOL = 3e-3
N_KV, N_HEADS, DIM, CAPACITY = 2, 4, 64, 40


def rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).pow(2).mean() / want.pow(2).mean()).sqrt().item()


def biased_inputs(seed: int, n: int = 30) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k, v (n, N_KV, D) and q (n, N_HEADS, D): K with a bias and channels of very different widths (so the
    smoothing and equalization matter), Q with uneven channels too, and a first token that stands out (as
    real models' first keys do, which is why the sinks exist)."""
    gen = torch.Generator().manual_seed(seed)
    widths = torch.exp2(torch.randint(-3, 6, (1, N_KV, DIM), generator=gen).float())  # 1/8 .. 32
    k = torch.randn(n, N_KV, DIM, generator=gen) * widths + 5 * torch.randn(1, N_KV, DIM, generator=gen)
    k[0] *= 4.0
    v = torch.randn(n, N_KV, DIM, generator=gen)
    v[0] *= 6.0
    q_widths = torch.exp2(torch.randint(-3, 4, (1, N_HEADS, DIM), generator=gen).float())  # 1/8 .. 8
    q = torch.randn(n, N_HEADS, DIM, generator=gen) * q_widths / 8
    return k, v, q


def make_caches(kv_k: str, kv_v: str, capacity: int = CAPACITY) -> tuple[KVCache, CudaKVCache]:
    """The CPU cache and the kernels' cache, both with the defaults' recipe for these types."""
    equalize = resolve_k_equalize("auto", kv_k, DEVICE)
    recipe = dict(k_smooth=resolve_k_smooth("auto", kv_k), k_equalize=equalize)
    cpu = KVCache(1, N_KV, DIM, capacity, kv_k, kv_v, **recipe)
    gpu = CudaKVCache(1, N_KV, DIM, capacity, kv_k, kv_v, device=DEVICE, **recipe)
    return cpu, gpu


def run_blocks(cache: KVCache, k, v, q, blocks: list[int], window: int | None) -> list[torch.Tensor]:
    """Write then attend block after block of the given sizes (as the model does) -> each block's output."""
    outs, pos, device = [], 0, cache.k[0].qs.device
    for n in blocks:
        cache.write(0, pos, k[pos : pos + n].to(device), v[pos : pos + n].to(device))
        outs.append(cache.attention(0, q[pos : pos + n].to(device), pos, 0.125, window).cpu())
        pos += n
    return outs


# prefill chunk (> VERIFY_ROWS_MAX rows: the prefill kernel), a 3-row verify block, decode steps; and a
# first block inside the sinks (rows kernel) followed by a prefill chunk that starts inside them
BLOCKS = {"chunk-rows-decode": [20, 3, 1, 1], "short-first-block": [3, 17, 1]}


@pytest.mark.parametrize("blocks", list(BLOCKS), ids=list(BLOCKS))
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize(
    "kv_k,kv_v", [("q4_0", "q4_0"), ("q8_0", "q8_0"), ("q4_0", "q8_0"), ("f16", "q4_0"), ("f16", "f16")]
)
def test_kernel_cache_matches_cpu_cache_with_equalization_and_sinks(kv_k, kv_v, window, blocks):
    k, v, q = biased_inputs(1)
    cpu, gpu = make_caches(kv_k, kv_v)
    quantized_k = kv_k != "f16"
    assert gpu.k_equalize == cpu.k_equalize == quantized_k, "auto: on for quantized K, on the GPU too"
    assert gpu.sink_tokens == cpu.sink_tokens == (SINK_TOKENS if (quantized_k or kv_v != "f16") else 0)
    want = run_blocks(cpu, k, v, q, BLOCKS[blocks], window)
    got = run_blocks(gpu, k, v, q, BLOCKS[blocks], window)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        err = rel_rms(g, w)
        assert err <= TOL, f"block {i} ({kv_k} K, {kv_v} V): relative RMS {err:.2e} > {TOL}"
    if kv_v != "f16":
        assert torch.equal(gpu.v_sink[0].cpu(), cpu.v_sink[0]), "V sinks: the rows in f16"
    if not quantized_k:
        return
    assert torch.equal(gpu.k_scale[0].cpu(), cpu.k_scale[0]), "scales from the same first chunk and queries"
    assert bool((cpu.k_scale[0] != 1).any()), "the test K should need scaling"
    assert torch.allclose(gpu.k_mean[0].cpu(), cpu.k_mean[0], rtol=1e-6, atol=1e-6)
    assert rel_rms(gpu.k_sink[0], cpu.k_sink[0]) < 1e-3, "K sinks: K as stored, in f16"
    # the reduced recipe the GPU cache had before (no equalization, no sinks) is measurably off
    reduced = CudaKVCache(1, N_KV, DIM, CAPACITY, kv_k, kv_v, device=DEVICE, k_smooth=True,
                          sink_tokens=0)
    old = run_blocks(reduced, k, v, q, BLOCKS[blocks], window)
    assert max(rel_rms(o, w) for o, w in zip(old, want, strict=True)) > 2 * TOL


def test_first_chunk_stored_without_queries_takes_k_only_scales():
    # KVCache's fallback: two writes without attention between them store the first chunk from K alone
    k, v, q = biased_inputs(2)
    cpu, gpu = make_caches("q4_0", "q4_0")
    for cache in (cpu, gpu):
        device = cache.k[0].qs.device
        cache.write(0, 0, k[:16].to(device), v[:16].to(device))
        assert cache.k_scale[0] is None, "the first chunk waits for its queries"
        cache.write(0, 16, k[16:20].to(device), v[16:20].to(device))
    assert torch.equal(gpu.k_scale[0].cpu(), cpu.k_scale[0])
    want = cpu.attention(0, q[16:20], 16, 0.125, None)
    got = gpu.attention(0, q[16:20].to(DEVICE), 16, 0.125, None).cpu()
    assert rel_rms(got, want) <= TOL


def test_captured_style_writes_fill_both_sinks():
    """A captured step (positions from a tensor, first_pos None) may land on sink positions: the write
    kernels put the f16 copies of K (as quantized) and V there, so graphs need not wait past the sinks."""
    k, v, q = biased_inputs(4)
    _, gpu = make_caches("q4_0", "q4_0")
    run_blocks(gpu, k, v, q, [20], None)  # statistics taken
    gpu.k_sink[0].fill_(0)
    gpu.v_sink[0].fill_(0)
    new_v = torch.randn(2, N_KV, DIM)
    gpu.write_rows(0, k[:2].to(DEVICE), new_v.to(DEVICE), torch.tensor([1, 2], device=DEVICE), None)
    assert torch.equal(gpu.v_sink[0][:, 1:3].cpu(), new_v.transpose(0, 1).to(torch.float16))
    assert bool((gpu.k_sink[0][:, 1:3] != 0).all()) and bool((gpu.v_sink[0][:, 0] == 0).all())


def test_scales_and_means_live_in_fixed_buffers_and_gate_graph_replay():
    k, v, q = biased_inputs(3)
    _, gpu = make_caches("q4_0", "q8_0")
    buffers = [t.data_ptr() for t in (gpu.q_scale(0), gpu._means.buffers[0], gpu.k_sink[0], gpu.v_sink[0])]
    assert not gpu.can_replay(), "no statistics yet"
    with pytest.raises(RuntimeError, match="K scales"):
        gpu.write_rows(0, k[:2].to(DEVICE), v[:2].to(DEVICE), torch.arange(2, device=DEVICE), 0)
    run_blocks(gpu, k, v, q, [20], None)
    assert gpu.can_replay(), "statistics known"
    first = gpu.k_scale[0].clone()
    gpu.k_scale = [torch.ones(N_KV, DIM, device=DEVICE)]  # a snapshot restore assigns: copied in place
    assert torch.equal(gpu.q_scale(0), torch.ones(N_KV, DIM, device=DEVICE))
    gpu.reset()
    assert gpu.k_scale == [None] and gpu.k_mean == [None] and not gpu.can_replay()
    run_blocks(gpu, k, v, q, [20], None)  # a new conversation takes them again
    assert torch.equal(gpu.k_scale[0], first)
    now = [t.data_ptr() for t in (gpu.q_scale(0), gpu._means.buffers[0], gpu.k_sink[0], gpu.v_sink[0])]
    assert now == buffers, "a captured graph holds these addresses"
    bare = KVCache(1, N_KV, DIM, CAPACITY, "q4_0", "q8_0", k_smooth=True, k_equalize=True)  # nothing known
    assert gpu.nbytes == bare.nbytes + 2 * N_KV * DIM * 4, "the known mean and scales count, as on the CPU"


def test_verify_rows_take_the_verify_kernel_where_it_applies(monkeypatch):
    # both paths give the same bits, so only a count tells a silent fallback (a slower verify) apart
    import kernels.verify_attention as verify

    k, v, q = biased_inputs(4)
    _, gpu = make_caches("q4_0", "q8_0", capacity=200)  # two splits of 128 positions
    assert gpu.max_len > gpu.split_size
    run_blocks(gpu, k, v, q, [20], None)
    calls = []

    class Counted:  # the verify kernel, its launches counted
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            calls.append(grid)
            return self.kernel[grid]

    for kernel in ("_tile_split_kernel", "_packed_split_kernel"):
        monkeypatch.setattr(verify, kernel, Counted(getattr(verify, kernel)))
    rows = q[20:24].to(DEVICE)  # (4, Hq, D)
    gpu.write_rows(0, k[20:24].to(DEVICE), v[20:24].to(DEVICE), torch.arange(20, 24, device=DEVICE), None)
    lengths = torch.arange(21, 25, dtype=torch.int32, device=DEVICE)
    out = torch.empty(4, N_HEADS, DIM, device=DEVICE)
    gpu.attend_rows(0, rows, lengths, 0.125, None, out)
    assert len(calls) == 1, "4 rows without a window over two splits: one verify_attention launch"
    batched = out.clone()
    gpu.attend_rows(0, rows, lengths, 0.125, 6, out)  # a window: one decode per row
    gpu.attend_rows(0, rows[:1], lengths[:1], 0.125, None, out[:1])  # one row: the decode kernel
    gpu.attend_rows(0, rows, lengths, 0.125, None, out, gpu.split_size)  # within one split: decode per row
    assert len(calls) == 1
    assert torch.equal(out, batched), "the two paths give the same bits"
    monkeypatch.setenv("TANDEM_VERIFY_ATTENTION", "0")
    gpu.attend_rows(0, rows, lengths, 0.125, None, out)  # switched off: one decode per row
    assert len(calls) == 1
    assert torch.equal(out, batched), "the two paths give the same bits"


@pytest.mark.parametrize("kv_k,kv_v", [("q4_0", "q8_0"), ("f16", "q4_0")])
def test_rope_write_rows_equals_rope_heads_then_write_rows(kv_k, kv_v):
    """The fused launch of a row block (engine's decode / verify path) against rope_heads + write_rows, bit
    for bit: Q in K's basis, both stores, both sinks; and when it may stand in for them."""
    from engine.models.transformer import rope_tables
    from kernels.layer_ops import rope_heads

    k, v, q = biased_inputs(6)
    caches = [make_caches(kv_k, kv_v)[1] for _ in range(2)]
    qkv = torch.randn(4, (N_HEADS + 2 * N_KV) * DIM, generator=torch.Generator().manual_seed(6))
    qkv = qkv.to(torch.float16).to(DEVICE)  # a fused QKV output: Q, K and V are its column slices
    q_in = qkv[:, : N_HEADS * DIM].view(4, N_HEADS, DIM)
    k_in, v_in = (qkv[:, (N_HEADS + i * N_KV) * DIM :][:, : N_KV * DIM].view(4, N_KV, DIM) for i in (0, 1))
    positions = torch.tensor([2, 3, 21, -1], device=DEVICE)  # two sink positions and a padding row
    cos, sin = (t.to(DEVICE) for t in rope_tables(torch.arange(0, CAPACITY), DIM, 10000.0, 1.0, None))
    opts = dict(neox=True, q_norm=None, k_norm=None, eps=1e-6)
    needs_statistics = caches[0].k_smooth or caches[0].k_equalize
    assert caches[0].fuses_rope_write(0, 5) == (not needs_statistics)
    for cache in caches:
        run_blocks(cache, k, v, q, [20], None)  # statistics taken from the same first chunk
    fused = caches[0]
    assert fused.fuses_rope_write(0, None) and fused.fuses_rope_write(0, 20)
    assert not fused.fuses_rope_write(0, 0), "a block at 0 takes its statistics again"
    got = fused.rope_write_rows(0, q_in, k_in, v_in, positions, cos, sin, **opts)
    plain = caches[1]
    want, k_roped = rope_heads(q_in, k_in, positions, cos, sin, **opts, rotation=plain.rotation,
                               q_scale=plain.q_scale(0))
    plain.write_rows(0, k_roped, v_in, positions, None)
    assert torch.equal(got, want), "Q in K's basis"
    for side in ("k", "v"):
        for field in ("qs", "d", "m"):
            a, b = getattr(getattr(fused, side)[0], field), getattr(getattr(plain, side)[0], field)
            assert (a is None and b is None) or torch.equal(a, b), f"{side} store .{field}"
        sinks = getattr(fused, f"{side}_sink"), getattr(plain, f"{side}_sink")
        assert (sinks[0] is None) == (sinks[1] is None)
        assert sinks[0] is None or torch.equal(sinks[0][0], sinks[1][0]), f"{side} sinks"
    assert int((fused.v[0].qs[:, 21] != 0).sum()) > 0, "row 21 was written"


def test_rope_write_rows_needs_the_statistics():
    _, gpu = make_caches("q4_0", "q4_0")
    assert gpu.k_smooth and gpu.k_equalize and not gpu.fuses_rope_write(0, None)
    q_in, k_in = torch.zeros(1, N_HEADS, DIM, device=DEVICE), torch.zeros(1, N_KV, DIM, device=DEVICE)
    table = torch.ones(CAPACITY, DIM // 2, device=DEVICE)
    with pytest.raises(RuntimeError, match="write_rows"):
        gpu.rope_write_rows(0, q_in, k_in, k_in, torch.zeros(1, dtype=torch.long, device=DEVICE), table,
                            table, neox=True, q_norm=None, k_norm=None, eps=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="make_kv_cache gives the CPU cache without CUDA")
def test_make_kv_cache_gives_the_gpu_cache_equalization():
    cache = make_kv_cache(1, N_KV, DIM, CAPACITY, "q4_0", "q4_0", device="cuda", k_smooth=True,
                          k_equalize=True)
    assert isinstance(cache, CudaKVCache) and cache.k_equalize and cache.sink_tokens == SINK_TOKENS


# ---- snapshots: the scales and sinks saved and restored like the CPU cache's -----------------------------


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("cuda_kv") / "llama.gguf", "llama", seed=3,
                            quantized=True)


def session_with_kernel_cache(path, kv_k="q4_0", kv_v="q8_0"):
    """A CPU session whose cache is swapped for the kernels' cache (snapshots only touch the cache)."""
    session = Engine.load(EngineConfig(model=str(path), context_length=CAPACITY, kv_k=kv_k, kv_v=kv_v,
                                       device="cpu"))
    c = session.model.config
    assert (c.n_kv_heads, c.head_dim) == (N_KV, DIM)
    session.cache = CudaKVCache(c.n_layers, N_KV, DIM, CAPACITY, kv_k, kv_v, device=DEVICE, k_smooth=True,
                                k_equalize=True)
    return session


def test_snapshot_round_trip_keeps_scales_and_sinks(tiny_path, tmp_path):
    k, v, q = biased_inputs(4)
    saved = session_with_kernel_cache(tiny_path)
    for layer in range(len(saved.cache.k)):
        saved.cache.write(layer, 0, k[:10].to(DEVICE), v[:10].to(DEVICE))
        saved.cache.attention(layer, q[:10].to(DEVICE), 0, 0.125, None)
    saved.cached_ids = list(range(10))
    store = SnapshotStore(tmp_path)
    assert store.save(saved) is not None
    restored = session_with_kernel_cache(tiny_path)
    assert store.restore(restored, list(range(12))) == 10
    a, b = saved.cache, restored.cache
    for layer in range(len(a.k)):
        for sa, sb in ((a.k[layer], b.k[layer]), (a.v[layer], b.v[layer])):
            a_rows, b_rows = (kv_quant.dequantize(s.narrow(1, 0, 10)) for s in (sa, sb))
            assert torch.equal(a_rows, b_rows), f"layer {layer} {sa.kv_type} store"
        for name in ("k_mean", "k_scale"):
            assert torch.equal(getattr(a, name)[layer], getattr(b, name)[layer]), f"{name} {layer}"
        assert torch.equal(a.k_sink[layer], b.k_sink[layer]) and torch.equal(a.v_sink[layer], b.v_sink[layer])
    assert b.q_scale(0) is b.k_scale[0], "restored into the fixed buffer"
    assert bool((b.k_scale[0] != 1).any()) and bool(b.k_sink[0].any())
    for cache in (a, b):  # both continue alike, bit for bit
        cache.write(0, 10, k[10:11].to(DEVICE), v[10:11].to(DEVICE))
    got = [c.attention(0, q[10:11].to(DEVICE), 10, 0.125, None) for c in (a, b)]
    assert torch.equal(*got)


# ---- engine A/B switches of the row path change no bit ------------------------------------------------


def _switch_runs(tiny_path, monkeypatch, kv, switch_name, after=lambda switch: None):
    """A prefill chunk (statistics taken, three launches either way), a 3-row verify block and a decode step
    (graph replays on CUDA) with the environment switch at "0" and at "1": [(rows logits, decode logits,
    cache)] per setting; after(switch) is called after each."""
    from engine.gguf_file import GGUFModelFile
    from engine.models.cuda_transformer import CudaTransformer

    model = CudaTransformer.from_gguf(GGUFModelFile.open(tiny_path), device=DEVICE)
    c = model.config
    runs = []
    for switch in ("0", "1"):
        monkeypatch.setenv(switch_name, switch)
        if model.graphs is not None:
            model.graphs.graphs.clear()  # captured under the other setting
        cache = CudaKVCache(c.n_layers, c.n_kv_heads, c.head_dim, CAPACITY, kv, kv, device=DEVICE,
                            k_smooth=resolve_k_smooth("auto", kv),
                            k_equalize=resolve_k_equalize("auto", kv, DEVICE))
        with torch.inference_mode():
            model(torch.arange(40, 60), 0, cache, logits_for="none")  # 20 rows: the chunk path
            rows = model.step([7, 8, 9], 20, cache).logits.clone()  # (3, vocab)
            one = model.step([10], 23, cache).logits.clone()  # (1, vocab)
        runs.append((rows, one, cache))
        after(switch)
    return runs


def _assert_same_runs(runs, n_layers):
    (rows_a, one_a, cache_a), (rows_b, one_b, cache_b) = runs
    assert torch.equal(rows_a, rows_b) and torch.equal(one_a, one_b), "logits"
    for layer in range(n_layers):
        for sa, sb in ((cache_a.k[layer], cache_b.k[layer]), (cache_a.v[layer], cache_b.v[layer])):
            assert torch.equal(sa.qs, sb.qs) and (sa.d is None or torch.equal(sa.d, sb.d)), f"layer {layer}"


@pytest.mark.slow  # ~20 s a case under the interpreter
@pytest.mark.parametrize("kv", ["f16", "q4_0"])
def test_fused_rope_write_switch_changes_no_bit(tiny_path, monkeypatch, kv):
    """TANDEM_FUSED_ROPE_WRITE off and on: the same logits and cache bytes; it ran only if on."""
    fused_launches = []
    fused = CudaKVCache.rope_write_rows
    monkeypatch.setattr(CudaKVCache, "rope_write_rows",
                        lambda self, *a, **kw: fused_launches.append(a[0]) or fused(self, *a, **kw))

    def check(switch):
        launched = len(fused_launches)
        assert (launched > 0) == (switch == "1"), f"{launched} fused launches with the switch at {switch}"

    runs = _switch_runs(tiny_path, monkeypatch, kv, "TANDEM_FUSED_ROPE_WRITE", check)
    _assert_same_runs(runs, len(runs[0][2].k))


@pytest.mark.slow  # ~20 s a case under the interpreter
@pytest.mark.parametrize("kv", ["f16", "q4_0"])
def test_split_output_switch_changes_no_bit(tiny_path, monkeypatch, kv):
    """TANDEM_SPLIT_OUTPUT off and on (GEMV K-splits added by the reading kernel): the same logits and cache
    bytes; with it on the row steps' GEMVs handed SplitOutputs on, with it off none did."""
    import kernels.qmatmul as qm
    from kernels.split_output import SplitOutput

    handed = []
    plain = qm.qmatmul
    monkeypatch.setattr(qm, "qmatmul", lambda *a, **kw: handed.append(plain(*a, **kw)) or handed[-1])

    def check(switch):
        split = [isinstance(y, SplitOutput) for y in handed]
        assert any(split) == (switch == "1"), f"{sum(split)} SplitOutputs with the switch at {switch}"
        handed.clear()

    runs = _switch_runs(tiny_path, monkeypatch, kv, "TANDEM_SPLIT_OUTPUT", check)
    _assert_same_runs(runs, len(runs[0][2].k))
