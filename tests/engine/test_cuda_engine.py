"""The GPU engine path (engine/models/cuda_transformer.py, engine/cuda_kv_cache.py, engine/cuda_graphs.py)
against the CPU engine (cpu_weights=exact: float32, bit-exact weights), and device selection.

GPU machine (`gpu` marker): every architecture with f16 and q4_0 caches, graph replay against eager
steps bit for bit, verify rows against decode steps bit for bit, greedy speculative decoding against
plain greedy decoding. Without CUDA the same kernel path (the Triton kernels under TRITON_INTERPRET=1,
on CPU tensors) runs two small cases and the verify-rows check, with the graph logic run eagerly.

Tolerances (relative RMS error against the CPU engine):
- f16 cache, logits: 5e-3. The GPU path rounds every linear's input and output to float16 (2^-11
  relative) and sums in other orders; measured under the interpreter 9e-4 (qwen2), 1.5e-3 (gemma3).
- quantized caches: float16-sized differences in K/V flip some roundings of the quantizer, each flip a
  whole quantization step, and later layers amplify them; on these random models the logits then differ
  by 0.3-0.7x the cache type's own error (CPU q8_0/q4_0 against CPU f16). So the sharp check is on
  what layer 0 stored, before any amplification: its dequantized K (rotated back, times the K scales)
  and V must agree within LAYER0_TOL[type] (measured under the interpreter: q4_0 1.4e-2, q8_0 2.6e-3,
  f16 5e-4, before K equalization and the attention sinks; with them, all four architectures, K/V:
  q4_0 1.0-1.3e-2 / 0.5-1.6e-2, q8_0 2.2-2.3e-3 / 1.9-2.7e-3, q4_1 0.75-1.3e-2 / 0.5-0.8e-2; logits
  0.18-0.67x the cache error, bf16 logits 2.3e-3..3.3e-3; past layer 0 up to 13 K scales of a model
  (gemma3 q4_0) rounded to the other power of two than on the CPU, which leaves attention unchanged; with K
  smoothing left out, qwen2 q4_0's layer-0 K was off by 0.34 while its logits moved only 0.69x the
  cache error, attention being unchanged in exact arithmetic). The logits must stay within 1x the cache
  type's own error (with Q left unrotated they were off by 6.5x).
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernels module is imported

from engine.api import DraftConfig, EngineConfig, SamplingParams  # noqa: E402
from engine.errors import SettingsError  # noqa: E402
from engine.gguf_file import GGUFModelFile  # noqa: E402
from engine.k_equalize import resolve_k_equalize  # noqa: E402
from engine.kv_cache import KVCache, make_kv_cache, resolve_k_smooth  # noqa: E402
from engine.models.transformer import Transformer  # noqa: E402
from tests.engine.events import collect_ids  # noqa: E402
from tests.engine.tiny_models import write_tiny_model  # noqa: E402

F16_TOL = 5e-3
QUANT_TOL_FRACTION = 1.0
LAYER0_TOL = {"f16": 2e-3, "bf16": 8e-3, "q8_0": 1e-2, "q4_0": 5e-2, "q4_1": 5e-2}
PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 10, 72, 101, 108, 108, 111, 33, 63, 10]
BLOCK = [87, 104, 97]  # a 3-row verify block after the prompt
CONTEXT = 64

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
interpreter_only = pytest.mark.skipif(HAS_CUDA, reason="the GPU runs the full versions of these checks")


def rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).pow(2).mean() / want.pow(2).mean()).sqrt().item()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda_engine")
    return {
        arch: write_tiny_model(d / f"{arch}.gguf", arch, seed=3, quantized=True)
        for arch in ("llama", "qwen2", "qwen3", "gemma3")
    }


@pytest.fixture
def fast_qmatmul(monkeypatch):
    """Under the interpreter, kernels.qmatmul's Triton kernel takes ~85% of these tests' time (it has its own
    tests): use its torch reference instead, one row at a time (rows independent of the block, as the
    kernel's are), with each weight dequantized once."""
    import kernels.qmatmul as qm

    dense: dict[int, torch.Tensor] = {}

    def rowwise(x, w, bias=None, split_output=False):  # its readers take a tensor as well as a SplitOutput
        if id(w) not in dense:
            dense[id(w)] = w.dequantize()  # (N, K) float32
        weight = dense[id(w)]
        if x.shape[0] <= 16:
            y = torch.cat([x[i : i + 1].float() @ weight.T for i in range(x.shape[0])])  # (M, N)
        else:
            y = x.float() @ weight.T
        return (y + bias.float() if bias is not None else y).to(x.dtype)

    monkeypatch.setattr(qm, "qmatmul", rowwise)


def cpu_model(path, kv):
    """The CPU engine with the defaults' K recipe (as the GPU cache's): rotation, smoothing and K
    equalization for quantized K, attention sinks for quantized sides."""
    model = Transformer.from_gguf(GGUFModelFile.open(path), cpu_weights="exact")
    c = model.config
    cache = KVCache(
        c.n_layers, c.n_kv_heads, c.head_dim, CONTEXT, kv, kv, k_smooth=resolve_k_smooth("auto", kv),
        k_equalize=resolve_k_equalize("auto", kv),
    )
    return model, cache


def kernel_model(path, kv, device):
    """The GPU path's model and cache; on a machine without CUDA, on CPU tensors under the interpreter
    (the cache make_kv_cache would give there is the CPU one, so the kernels' cache is built directly)."""
    from engine.cuda_kv_cache import CudaKVCache
    from engine.models.cuda_transformer import CudaTransformer

    model = CudaTransformer.from_gguf(GGUFModelFile.open(path), device=device)
    c = model.config
    cache = CudaKVCache(
        c.n_layers, c.n_kv_heads, c.head_dim, CONTEXT, kv, kv, device=device,
        k_smooth=resolve_k_smooth("auto", kv), k_equalize=resolve_k_equalize("auto", kv, device),
    )
    return model, cache


def scenario_logits(model, cache, prompt=PROMPT, block=BLOCK) -> torch.Tensor:
    """Teacher-forced: a prefill chunk (more than 16 rows: the chunk path), a verify block (the rows
    path), one decode step -> (len(prompt) + len(block) + 1, vocab)."""
    with torch.inference_mode():
        prefill, _ = model(torch.tensor(prompt), 0, cache, logits_for="all")  # (P, vocab)
        verify, _ = model(torch.tensor(block), len(prompt), cache, logits_for="all")  # (B, vocab)
        decode, _ = model(torch.tensor([block[-1]]), len(prompt) + len(block), cache)  # (1, vocab)
    return torch.cat([prefill, verify, decode]).float().cpu()


def layer0_stored(cache, side: str, n: int) -> torch.Tensor:
    """What layer 0 stored for positions [0, n) -> (n_kv, n, D) float32; K rotated back and multiplied by
    the cache's own K-equalization scales (so a power-of-two scale that rounded the other way on one side,
    from float16-sized differences in the first chunk, does not count as an error; the smoothing mean
    stays subtracted)."""
    from engine import kv_quant
    from engine.hadamard import unrotate

    x = kv_quant.dequantize(getattr(cache, side)[0].narrow(1, 0, n)).cpu()  # (n_kv, n, D)
    if side == "k" and cache.rotation is not None:
        x = unrotate(x, cache.rotation.to("cpu"))
    if side == "k" and cache.k_equalize:
        x = x * cache.k_scale[0].cpu()[:, None, :]
    return x


def check_against_cpu(path, kv, device, prompt=PROMPT, block=BLOCK) -> None:
    cpu, gpu_side = cpu_model(path, kv), kernel_model(path, kv, device)
    want, got = scenario_logits(*cpu, prompt, block), scenario_logits(*gpu_side, prompt, block)
    n = len(prompt) + len(block)
    for side in ("k", "v"):
        err = rel_rms(*(layer0_stored(c, side, n) for c in (gpu_side[1], cpu[1])))
        assert err <= LAYER0_TOL[kv], (
            f"layer 0 {side.upper()} ({kv}): relative RMS {err:.2e} > {LAYER0_TOL[kv]}"
        )
    err = rel_rms(got, want)
    if kv in ("f16", "bf16"):
        assert err <= F16_TOL, f"{kv} cache: logits relative RMS error {err:.2e} > {F16_TOL:.0e}"
    else:
        cache_error = rel_rms(want, scenario_logits(*cpu_model(path, "f16"), prompt, block))
        bound = QUANT_TOL_FRACTION * cache_error
        assert err <= bound, (
            f"{kv} cache: logits relative RMS error {err:.2e} > {QUANT_TOL_FRACTION} x the "
            f"cache's own error {cache_error:.2e}"
        )


# ---- kernel path against the CPU engine --------------------------------------------------------------


@interpreter_only
@pytest.mark.slow
@pytest.mark.parametrize("arch,kv", [("qwen2", "q4_0"), ("gemma3", "f16")])
def test_kernel_path_matches_cpu_engine_interpreted(models, arch, kv, fast_qmatmul):
    # qwen2 q4_0: biases, K rotation + smoothing + equalization, attention sinks; gemma3 f16: sliding
    # window, Q/K norms, post-norms, GELU.
    # A shorter scenario than the GPU's: the interpreter is slow
    check_against_cpu(models[arch], kv, "cpu", PROMPT[:17], BLOCK[:2])


@gpu
@needs_cuda
@pytest.mark.parametrize("kv", ["f16", "bf16", "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_cuda_logits_match_cpu_engine(models, arch, kv):
    check_against_cpu(models[arch], kv, "cuda")


# ---- verify rows, graphs and speculative decoding: bit for bit ----------------------------------------


def rows_equal_decodes(model, cache_a, cache_b, prompt, block) -> list[list[int]]:
    """Row p of a verify block must be the decode step at p bit for bit (both through model.step).
    Returns the row buckets of the model's graphs after the decode steps and after the block."""
    buckets = []
    with torch.inference_mode():
        model(torch.tensor(prompt), 0, cache_a, logits_for="none")
        model(torch.tensor(prompt), 0, cache_b, logits_for="none")
        singles = [model.step([t], len(prompt) + i, cache_a).logits.clone() for i, t in enumerate(block)]
        buckets.append(sorted(key[0] for key in model.graphs.graphs) if model.graphs else [])
        rows = model.step(block, len(prompt), cache_b)
        buckets.append(sorted(key[0] for key in model.graphs.graphs) if model.graphs else [])
        for i, single in enumerate(singles):
            assert torch.equal(rows.logits[i : i + 1], single), f"verify row {i} differs from its decode step"
            assert int(rows.argmax[i]) == int(single.argmax()), f"argmax of row {i}"
    return buckets


@interpreter_only
@pytest.mark.slow
def test_verify_rows_equal_decode_steps_interpreted(models, fast_qmatmul):
    from engine.cuda_graphs import StepGraphs

    model, cache_a = kernel_model(models["qwen2"], "q4_0", "cpu")
    _, cache_b = kernel_model(models["qwen2"], "q4_0", "cpu")
    model.graphs = StepGraphs(model)  # the graph logic (buckets, padding rows) without CUDA: run eagerly
    # the decode steps ran through the 1-row "graph", the 3-row block through the 4-row one (a new cache
    # drops the graphs of the old one)
    assert rows_equal_decodes(model, cache_a, cache_b, PROMPT[:4], [1, 2, 3]) == [[1], [4]]


# ---- plain decoding one step ahead of the host (StepGraphs.pick) ------------------------------------


class PrefixModel:
    """A stand-in for CudaTransformer under StepGraphs (graphs run eagerly on the CPU): a row writes its
    token into the cache (a list) at its position, and its argmax depends on everything the cache holds up
    to there, so a step that read rows later rewritten would pick otherwise; its other logits spread
    some probability over the rest of the vocabulary. Logs the rows it runs."""

    device = torch.device("cpu")
    vocab = 97

    def __init__(self) -> None:
        self.ran: list[tuple[int, int]] = []

    def step_rows(self, inputs, max_length, advance=False):
        from engine.models.cuda_transformer import StepInputs
        from kernels.step_inputs import step_positions

        lengths, positions = step_positions(inputs, advance)
        return StepInputs(inputs[0], positions, lengths, max_length)

    def run_rows(self, inputs, cache, first_pos, logits_rows, capture, widen=True):
        picks = []  # (logits float32 either way)
        for token, pos in zip(inputs.tokens.tolist(), inputs.positions.tolist(), strict=True):
            if pos < 0:  # padding row
                picks.append(0)
                continue
            cache[pos] = token
            self.ran.append((token, pos))
            picks.append((sum(t * (i + 1) for i, t in enumerate(cache[: pos + 1])) * 31 + pos) % self.vocab)
        picks = torch.tensor(picks)  # (R,)
        spread = torch.cos(torch.arange(self.vocab)[None, :] * (picks[:, None] + 1.0))  # (R, vocab)
        return 4.0 * torch.nn.functional.one_hot(picks, self.vocab).float() + spread, []


class ListCache(list):
    """The stand-in's cache: a list of tokens by position. `split`: 1-row steps ending at length <= split
    get graphs of their own (CudaKVCache.length_bound); None: never."""

    def __init__(self, size: int = 40, split: int | None = None) -> None:
        super().__init__([0] * size)
        self.split = split

    def length_bound(self, end: int) -> int | None:
        return self.split if self.split is not None and end <= self.split else None


def greedy_chain(graphs, cache, token, pos, n, ahead=True):
    picks = []
    for i in range(n):
        token = graphs.pick(token, pos + i, cache, ahead and i + 1 < n)
        picks.append(token)
    return picks


def test_greedy_ahead_picks_what_waiting_picks():
    from engine.cuda_graphs import StepGraphs

    runs = {}
    for ahead in (False, True):
        model = PrefixModel()
        graphs, cache = StepGraphs(model), ListCache()
        graphs.run([3, 1, 4], 0, cache)  # a prompt through the 4-row step
        runs[ahead] = greedy_chain(graphs, cache, 5, 3, 12, ahead), model.ran
    (waiting, waiting_rows), (picks, rows) = runs[False], runs[True]
    assert picks == waiting and len(set(picks)) > 3
    assert rows == waiting_rows  # each row ran once: every step queued ahead was the one asked for next


@pytest.mark.parametrize("short", [True, False], ids=["short-steps", "TANDEM_SHORT_STEPS=0"])
def test_steps_early_in_the_cache_have_their_own_graph(monkeypatch, short):
    """Steps ending within the cache's length bound run a bounded graph (its StepInputs carry the bound),
    later ones the other; the chain queued ahead crosses the bound with the same picks, each row run once;
    the 3-row block within the bound takes the bounded graph of its row bucket."""
    from engine.cuda_graphs import StepGraphs

    if not short:
        monkeypatch.setenv("TANDEM_SHORT_STEPS", "0")
    bounds = []

    class BoundsModel(PrefixModel):
        def run_rows(self, inputs, cache, first_pos, logits_rows, capture, widen=True):
            bounds.append(inputs.max_length)
            return super().run_rows(inputs, cache, first_pos, logits_rows, capture)

    runs = {}
    for ahead in (False, True):
        model = BoundsModel()
        graphs, cache = StepGraphs(model), ListCache(split=8)
        graphs.run([3, 1, 4], 0, cache)
        runs[ahead] = greedy_chain(graphs, cache, 5, 3, 12, ahead), model.ran
        assert sorted((k[0], k[3] or 0) for k in graphs.graphs) == ([(1, 0), (1, 8), (4, 8)] if short else
                                                                    [(1, 0), (4, 0)])
    (waiting, waiting_rows), (picks, rows) = runs[False], runs[True]
    assert picks == waiting and rows == waiting_rows
    # per run: the block (lengths 1..3), then positions 3..14 (lengths 4..15): 5 within the bound of 8
    run = [8] + [8] * 5 + [None] * 7 if short else [None] * 13
    assert bounds == run + run


@pytest.mark.parametrize("extra", [{}, {"top_k": 20, "top_p": 0.9, "min_p": 0.02}])
def test_sampled_steps_ahead_draw_what_the_host_draws(extra):
    """A captured step samples on the device with the uniform number the sampler gives it when queued:
    the picks are the host's draws from the same logits, one step ahead or not."""
    from engine.cuda_graphs import StepGraphs
    from engine.sampling import Sampler

    params = SamplingParams(temperature=0.9, seed=5, **extra)
    runs, argmaxes = [], []
    for mode in ("host", "waiting", "ahead"):
        model, sampler = PrefixModel(), Sampler(params)
        graphs, cache = StepGraphs(model), ListCache()
        graphs.run([3, 1, 4], 0, cache)
        token, picks = 5, []
        for pos in range(3, 23):
            if mode == "host":
                logits = graphs.run([token], pos, cache).logits[0]
                argmaxes.append(int(logits.argmax()))
                token = sampler.pick(logits, [])
            else:
                token = graphs.pick(token, pos, cache, mode == "ahead" and pos < 22, sampler)
            picks.append(token)
        runs.append(picks)
    assert runs[0] == runs[1] == runs[2]
    assert runs[0] != argmaxes  # the draws are not all the argmax: sampling did run


def test_a_step_queued_for_one_sampler_is_not_used_by_another():
    """A queued sampled step drew with its sampler's number: another sampler (same parameters, another
    seed) at that position gets a step of its own; a greedy request too."""
    from engine.cuda_graphs import StepGraphs
    from engine.sampling import Sampler

    model = PrefixModel()
    graphs, cache = StepGraphs(model), ListCache()
    for other in (Sampler(SamplingParams(temperature=0.9, seed=2)), None):
        graphs.run([3, 1, 4], 0, cache)
        first = graphs.pick(5, 3, cache, True, Sampler(SamplingParams(temperature=0.9, seed=1)))
        n = len(model.ran)  # the step at 4 on `first` is queued, with seed 1's number
        graphs.pick(first, 4, cache, True, other)
        assert model.ran[n:] == [(first, 4), (model.ran[-1][0], 5)]  # its own step at 4, then one ahead


def test_greedy_ahead_drops_a_step_that_became_stale():
    from engine.cuda_graphs import StepGraphs

    model = PrefixModel()
    graphs, cache = StepGraphs(model), ListCache()
    graphs.run([3, 1, 4], 0, cache)
    first = graphs.pick(5, 3, cache, ahead=True)  # the step at 4 (on `first`) is queued
    assert model.ran[-1] == (first, 4)
    # the host asks for another token at 4 (the answer was cut and edited): the queued step is not used
    other = (first + 1) % PrefixModel.vocab
    assert graphs.pick(other, 4, cache, ahead=True) == PrefixModel().run_rows(
        inputs_at([other], 4), cache[:], None, "all", ()
    )[0].argmax().item()
    assert model.ran[-2:] == [(other, 4), (model.ran[-1][0], 5)]
    # any other step in between (a verify block rewriting rows 4..6) makes the queued step at 6 stale
    pick = graphs.pick(model.ran[-1][0], 5, cache, ahead=True)
    graphs.run([7, 8, 9], 4, cache)
    n = len(model.ran)
    again = graphs.pick(pick, 6, cache, ahead=False)
    assert model.ran[n:] == [(pick, 6)]  # run afresh on the rewritten prefix
    assert again == PrefixModel().run_rows(inputs_at([pick], 6), cache[:], None, "all", ())[0].argmax().item()
    # another cache: nothing queued for the old one is used
    graphs.pick(again, 7, cache, ahead=True)
    fresh = ListCache()
    n = len(model.ran)
    graphs.pick(model.ran[-1][0], 8, fresh, ahead=False)
    assert model.ran[n:] == [(model.ran[-1][0], 8)] and fresh[8] == model.ran[-1][0]


def inputs_at(ids, pos):
    from engine.models.cuda_transformer import StepInputs

    positions = torch.arange(pos, pos + len(ids))
    return StepInputs(torch.tensor(ids), positions, (positions + 1).to(torch.int32))


@interpreter_only
@pytest.mark.slow
def test_pick_next_ahead_equals_steps_up_to_a_full_cache_interpreted(models, fast_qmatmul):
    """The kernel path (graphs run eagerly): greedy picks with the next step queued ahead equal plain
    steps, up to the cache's last position (no step is queued past it)."""
    from engine.cuda_graphs import StepGraphs
    from engine.cuda_kv_cache import CudaKVCache

    model = tiny_kernel_model(models["qwen2"])
    model.graphs = StepGraphs(model)
    c, n = model.config, len(PROMPT) + 4
    recipe = {
        "k_smooth": resolve_k_smooth("auto", "q4_0"),
        "k_equalize": resolve_k_equalize("auto", "q4_0", "cpu"),
    }
    caches = [
        CudaKVCache(c.n_layers, c.n_kv_heads, c.head_dim, n, "q4_0", "q4_0", device="cpu", **recipe)
        for _ in range(2)
    ]
    picks = {}
    with torch.inference_mode():
        for ahead, cache in zip((False, True), caches, strict=True):
            model(torch.tensor(PROMPT), 0, cache, logits_for="none")
            token, chain = PROMPT[-1], []
            for pos in range(len(PROMPT), n):
                if ahead:
                    token = model.pick_next(token, pos, cache, ahead=True)  # at n - 1: no room ahead
                else:
                    token = int(model.step([token], pos, cache).argmax[0])
                chain.append(token)
            picks[ahead] = chain
    assert picks[True] == picks[False]
    assert not model.graphs.queued


@interpreter_only
@pytest.mark.slow
def test_short_steps_equal_full_steps_interpreted(models, fast_qmatmul):
    """The kernel path (graphs run eagerly) on a 512-position f16 cache: the 3-row verify block and 1-row
    steps within the first split run with the length bound (decode attention in one launch for both, its
    direct path), the same logits as the unbounded steps (split + merge attention) bit for bit."""
    from engine.cuda_graphs import StepGraphs
    from engine.cuda_kv_cache import CudaKVCache

    model = tiny_kernel_model(models["qwen2"])
    c = model.config
    caches = [CudaKVCache(c.n_layers, c.n_kv_heads, c.head_dim, 512, "f16", "f16", device="cpu")
              for _ in range(2)]
    split = caches[0].split_size
    assert caches[0].length_bound(len(PROMPT) + 1) == split < 512
    graphs, logits = StepGraphs(model), []
    with torch.inference_mode():
        for steps, cache in ((graphs, caches[0]), (None, caches[1])):
            model.graphs = steps  # None: every step eager, without the bound
            model(torch.tensor(PROMPT), 0, cache, logits_for="none")
            block = model.step(BLOCK, len(PROMPT), cache).logits.clone()  # (3, vocab)
            logits.append([block] + [model.step([t], len(PROMPT) + i, cache).logits.clone()
                                     for i, t in enumerate(BLOCK)])
    assert all(torch.equal(a, b) for a, b in zip(*logits, strict=True))
    assert {key[3] for key in graphs.graphs} == {split}  # the block's graph and the 1-row one


def tiny_kernel_model(path):
    """The GPU path's model on CPU tensors (kernels interpreted)."""
    from engine.models.cuda_transformer import CudaTransformer

    return CudaTransformer.from_gguf(GGUFModelFile.open(path), device="cpu")


def cuda_session(path, kv=("f16", "f16"), mode="none", draft=None, graphs=True, context=128):
    from engine.session import Engine

    config = EngineConfig(
        model=str(path),
        kv_k=kv[0],
        kv_v=kv[1],
        device="cuda",
        context_length=context,
        prefill_chunk=8,
        draft=DraftConfig(mode=mode, path=str(draft) if draft else None, max_draft=4),
    )
    session = Engine.load(config)
    if not graphs:
        session.model.graphs = None
    return session


@gpu
@needs_cuda
@pytest.mark.parametrize("kv", ["f16", "q4_0"])
def test_cuda_verify_rows_equal_decode_steps(models, kv):
    s = cuda_session(models["qwen2"], (kv, kv))
    from engine.cuda_kv_cache import CudaKVCache
    from engine.models.cuda_transformer import CudaTransformer

    assert isinstance(s.model, CudaTransformer) and isinstance(s.cache, CudaKVCache)
    c = s.model.config
    other = make_kv_cache(  # the same capacity: decode attention's split boundaries depend on it
        c.n_layers,
        c.n_kv_heads,
        c.head_dim,
        s.max_len,
        kv,
        kv,
        device="cuda",
        k_smooth=resolve_k_smooth("auto", kv),
        k_equalize=resolve_k_equalize("auto", kv, "cuda"),
    )
    block = [PROMPT[-1], *BLOCK, 5]  # 5 rows: padded to the 8-row bucket
    assert rows_equal_decodes(s.model, s.cache, other, PROMPT, block) == [[1], [8]]


@gpu
@needs_cuda
@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_graph_replay_equals_eager(models, arch):
    graphed, eager = (
        cuda_session(models[arch], ("q4_0", "q8_0")),
        cuda_session(models[arch], ("q4_0", "q8_0"), graphs=False),
    )
    with torch.inference_mode():
        for s in (graphed, eager):
            s.prefill(PROMPT, 0)
        token, pos = PROMPT[-1], len(PROMPT)
        for _ in range(6):
            a, b = (
                graphed.model.step([token], pos, graphed.cache),
                eager.model.step([token], pos, eager.cache),
            )
            assert torch.equal(a.logits, b.logits) and torch.equal(a.argmax, b.argmax)
            token, pos = int(a.argmax[0]), pos + 1
        for block in ([token, 7, 9], [token, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25]):
            a, b = graphed.model.step(block, pos, graphed.cache), eager.model.step(block, pos, eager.cache)
            assert torch.equal(a.logits, b.logits), f"{len(block)}-row step"
    assert graphed.model.graphs.graphs and eager.model.graphs is None


@gpu
@needs_cuda
@pytest.mark.parametrize("kv", ["f16", "q4_0"])
def test_cuda_steps_within_one_split_equal_eager(models, kv):
    """A 512-position cache (decode attention in 4 splits of 128): 1-row steps that end within the first
    split replay a graph of their own (attention in one launch, no merge), later ones the full graph; both
    give the eager step's logits bit for bit, and greedy decoding queued ahead across the bound the eager
    ids."""
    graphed = cuda_session(models["qwen2"], (kv, kv), context=512)
    eager = cuda_session(models["qwen2"], (kv, kv), graphs=False, context=512)
    assert graphed.cache.length_bound(128) == 128 and graphed.cache.length_bound(129) is None
    with torch.inference_mode():
        for s in (graphed, eager):
            s.prefill(PROMPT, 0)
        token, pos = PROMPT[-1], len(PROMPT)
        while pos < 136:
            a = graphed.model.step([token], pos, graphed.cache)
            b = eager.model.step([token], pos, eager.cache)
            assert torch.equal(a.logits, b.logits), f"step at {pos}"
            token, pos = int(a.argmax[0]), pos + 1
        assert {key[3] for key in graphed.model.graphs.graphs} == {128, None}
        chains = []
        for s in (graphed, eager):
            s.prefill(PROMPT, 0)
            token, chain = PROMPT[-1], []
            for i in range(120):
                token = s.decode_greedy(token, ahead=i + 1 < 120)
                chain.append(token)
            chains.append(chain)
        assert chains[0] == chains[1]


@gpu
@needs_cuda
@pytest.mark.parametrize("kv", [("f16", "f16"), ("q4_0", "q4_0")])
def test_cuda_greedy_speculative_equals_plain(models, tmp_path, kv):
    target = models["qwen2"]
    draft = write_tiny_model(tmp_path / "draft.gguf", "qwen2", seed=4, quantized=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=40)
    prompt = PROMPT * 2
    plain_ids, _, plain = collect_ids(cuda_session(target, kv).generate(prompt, greedy))
    assert len(plain_ids) >= 20
    for mode, path in (("ngram", None), ("draft-model", draft), ("draft-model", target)):
        ids, flags, final = collect_ids(cuda_session(target, kv, mode, path).generate(prompt, greedy))
        assert ids == plain_ids, f"{mode} ({path.name if path else 'prompt lookup'}) changed the output"
        assert final.text == plain.text and final.stats.device == "cuda"
        if path == target:
            assert final.stats.accepted == final.stats.drafted > 0  # drafting for itself: all accepted


@gpu
@needs_cuda
def test_cuda_session_generates_and_reports_the_device(models):
    s = cuda_session(models["llama"])
    ids, _, final = collect_ids(s.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=12)))
    assert len(ids) == 12 or final.stop_reason == "eos"
    assert final.stats.device == "cuda" and torch.cuda.get_device_name(0) in final.stats.device_reason
    sampled = collect_ids(s.generate(PROMPT, SamplingParams(temperature=0.8, seed=1, max_tokens=12)))[0]
    assert sampled and all(0 <= t < s.model.config.vocab_size for t in sampled)


@gpu
@needs_cuda
@pytest.mark.parametrize("kv", ["f16", "q4_0"])
def test_cuda_greedy_ahead_equals_waiting_and_fills_the_context(models, kv):
    """Session.generate queues each greedy step before reading the pick of the one before: the same ids as
    waiting for every pick, also when the answer runs into the end of the context (no step queued past
    it) and when a second answer follows the first in the same cache."""
    s = cuda_session(models["qwen2"], (kv, kv))
    assert s.model.graphs.picks.ring is not None  # the steps publish their picks into mapped host memory
    with torch.inference_mode():
        chains = []
        for ahead in (False, True):
            s.prefill(PROMPT, 0)
            token, chain = PROMPT[-1], []
            for i in range(40):
                token = s.decode_greedy(token, ahead=ahead and i + 1 < 40)
                chain.append(token)
            chains.append(chain)
        assert chains[0] == chains[1]
    full = SamplingParams(temperature=0.0, max_tokens=1000)
    prompt = PROMPT * 6  # 120 of the 128 positions
    ids, _, final = collect_ids(s.generate(prompt, full))
    assert final.stop_reason == "context_full" and len(prompt) + len(ids) == s.max_len
    again = cuda_session(models["qwen2"], (kv, kv))
    again.model.graphs = None  # the waiting path, eager
    assert collect_ids(again.generate(prompt, full))[0] == ids
    second = prompt[:60] + [11, 12, 13]  # a new turn over part of the cache
    assert collect_ids(s.generate(second, full))[0] == collect_ids(again.generate(second, full))[0]


@gpu
@needs_cuda
@pytest.mark.parametrize("extra", [{}, {"top_k": 40, "top_p": 0.95, "min_p": 0.05}])
def test_cuda_sampled_steps_equal_host_sampling(models, extra):
    """Sampling inside the captured step (one step ahead) gives the ids the host's sampler gives from the
    eager step's logits, for the same seed; a repeat penalty keeps the host path."""
    params = SamplingParams(temperature=0.8, seed=17, max_tokens=40, **extra)
    graphed, eager = cuda_session(models["qwen2"]), cuda_session(models["qwen2"], graphs=False)
    ids, _, final = collect_ids(graphed.generate(PROMPT, params))
    assert ids == collect_ids(eager.generate(PROMPT, params))[0]
    assert any(k[2] is not None for k in graphed.model.graphs.graphs)  # a sampled step was captured
    greedy = SamplingParams(temperature=0.0, max_tokens=40)
    assert ids != collect_ids(graphed.generate(PROMPT, greedy))[0]
    penalty = SamplingParams(temperature=0.8, seed=17, max_tokens=20, repeat_penalty=1.3)
    with_penalty = collect_ids(graphed.generate(PROMPT, penalty))[0]
    assert with_penalty == collect_ids(eager.generate(PROMPT, penalty))[0]


# ---- device selection (runs everywhere) ----------------------------------------------------------------


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend torch found a given GPU; returns a setter."""
    import importlib.util

    def set_gpu(name=None, capability=(9, 0), built_with_cuda=True, triton=True):
        monkeypatch.setattr(torch.version, "cuda", "12.8" if built_with_cuda else None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: name is not None)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
        real_find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda mod, *a: None if mod == "triton" and not triton else real_find_spec(mod, *a),
        )

    return set_gpu


def model_config(head_dim: int):
    from engine.config import ModelConfig

    return ModelConfig(
        "qwen2",
        2,
        256,
        512,
        4,
        2,
        head_dim,
        320,
        1e-6,
        1e4,
        head_dim,
        True,
        1e4,
        1.0,
        256,
        head_dim**-0.5,
        None,
        1,
        1.0,
        "silu",
    )


def test_auto_picks_the_gpu_and_names_it(fake_cuda):
    from engine.session import pick_device

    fake_cuda("NVIDIA H200")
    assert pick_device("auto", model_config(128)) == (
        "cuda",
        "auto: found NVIDIA H200 (compute capability 9.0)",
    )
    assert pick_device("cuda", model_config(64))[0] == "cuda"
    assert pick_device("cpu", model_config(64)) == ("cpu", "requested")


@pytest.mark.parametrize(
    "gpu_kwargs,reason",
    [
        (dict(name=None, built_with_cuda=False), "built without CUDA"),
        (dict(name=None), "found no CUDA device"),
        (
            dict(name="NVIDIA GeForce GTX 1080", capability=(6, 1)),
            "compute capability 6.1; the GPU path needs 8.0",
        ),
        (dict(name="NVIDIA RTX A4000", triton=False), "Triton is not installed"),
    ],
    ids=["cpu-torch", "no-device", "old-gpu", "no-triton"],
)
def test_auto_falls_back_to_cpu_and_says_why(fake_cuda, gpu_kwargs, reason):
    from engine.session import pick_device

    fake_cuda(**gpu_kwargs)
    device, why = pick_device("auto", model_config(128))
    assert device == "cpu" and why.startswith("auto: no usable GPU (") and reason in why
    with pytest.raises(SettingsError, match=f"Device 'cuda' was requested but .*{reason.split(';')[0]}"):
        pick_device("cuda", model_config(128))


def test_a_model_the_kernels_cannot_run_stays_on_cpu_with_auto(fake_cuda):
    from engine.session import pick_device

    fake_cuda("NVIDIA H100 80GB HBM3")
    device, why = pick_device("auto", model_config(80))
    assert device == "cpu" and "found NVIDIA H100 80GB HBM3" in why and "head size 80" in why
    with pytest.raises(SettingsError, match="head size 80"):
        pick_device("cuda", model_config(80))


def test_model_rule_agrees_with_the_kernels():
    from engine.session import gpu_model_problem
    from kernels.kv_blocks import check_kernel_head_dim

    for head_dim in (16, 32, 48, 64, 80, 96, 128, 192, 256, 512):
        try:
            check_kernel_head_dim(head_dim)
            kernels_ok = True
        except SettingsError:
            kernels_ok = False
        assert (gpu_model_problem(model_config(head_dim)) is None) == kernels_ok, head_dim


def test_cuda_requested_without_a_gpu_is_a_settings_error(models, fake_cuda):
    from engine.session import Engine

    fake_cuda(None)
    with pytest.raises(SettingsError, match="Device 'cuda' was requested but"):
        Engine.load(EngineConfig(model=str(models["llama"]), device="cuda"))


def test_stats_say_which_device_and_why(models, fake_cuda):
    from engine.session import Engine

    fake_cuda(None)
    session = Engine.load(EngineConfig(model=str(models["llama"]), device="auto", context_length=64))
    final = collect_ids(session.generate(PROMPT[:4], SamplingParams(max_tokens=2)))[2]
    assert final.stats.device == "cpu" and "found no CUDA device" in final.stats.device_reason
    assert session.info["device_reason"] == final.stats.device_reason


@pytest.mark.parametrize("command", ["generate", "bench", "perplexity"])
def test_cli_device_flag_reaches_the_engine(command, models, fake_cuda, capsys):
    from engine import cli

    args = cli.build_parser().parse_args([command, "--model", str(models["llama"]), "--device", "cuda"])
    assert cli.engine_config(args).device == "cuda"
    fake_cuda(None)
    extra = (
        ["--prompt", "hi"]
        if command == "generate"
        else ["--text-file", __file__]
        if command == "perplexity"
        else []
    )
    assert cli.main([command, "--model", str(models["llama"]), "--device", "cuda", *extra]) == 2
    assert "Device 'cuda' was requested but" in capsys.readouterr().err


# ---- graph inputs (runs everywhere) --------------------------------------------------------------------


def test_row_buckets_and_padding():
    from engine.cuda_graphs import ROW_BUCKETS, bucket_for, fill_step_inputs

    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert ROW_BUCKETS[-1] == 16
    with pytest.raises(ValueError):
        bucket_for(17)
    host = torch.full((2, 8), 99, dtype=torch.long)
    fill_step_inputs(host, [5, 6, 7], 40)
    assert host.tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [40, 41, 42, -1, -1, -1, -1, -1]]


@pytest.fixture
def capture_fakes(monkeypatch):
    """The CUDA calls of a capture replaced by fakes that log "wait" / "enter" / "exit"; returns the log."""
    events = []

    class Fake:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            events.append("wait")

        def __enter__(self):
            events.append("enter")

        def __exit__(self, *exc):
            events.append("exit")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Fake())
    monkeypatch.setattr(torch.cuda, "Stream", Fake)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: Fake())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Fake)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: Fake())
    return events


def test_record_graph_warms_up_then_captures(capture_fakes):
    # one eager run on a side stream, then one run being recorded
    from engine import cuda_graphs

    graph = cuda_graphs.record_graph(lambda: capture_fakes.append("body"), torch.device("cpu"))
    assert type(graph).__name__ == "Fake"
    assert capture_fakes == ["wait", "enter", "body", "exit", "wait", "enter", "body", "exit"]


def test_record_graph_captures_with_garbage_collection_off(capture_fakes):
    """A collection during capture freed an earlier session's graph / pinned buffers and invalidated the
    capture on an H200: the warm-up runs with gc on, the capture with gc off, and gc is on again after,
    also when the capture fails."""
    import gc

    from engine.cuda_graphs import record_graph

    gc_during_body = []
    record_graph(lambda: gc_during_body.append(gc.isenabled()), torch.device("cpu"))
    assert gc_during_body == [True, False] and gc.isenabled()

    def fails_in_capture():
        if not gc.isenabled():
            raise RuntimeError("capture failed")

    with pytest.raises(RuntimeError, match="capture failed"):
        record_graph(fails_in_capture, torch.device("cpu"))
    assert gc.isenabled()
