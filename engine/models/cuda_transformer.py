"""The transformer of engine/models/transformer.py on a CUDA GPU, through the kernels in kernels/.

Same architectures, same switches (ModelConfig); what changes is how a step is computed:
- Weights stay in their GGUF blocks on the device and go through `kernels.qmatmul` (engine.linear's
  GpuLinear); Q/K/V and gate/up of one type are one matmul each.
- Activations: the residual stream is float32 (Gemma-3-270M's reaches 1e5 on 200 tokens of code, past
  float16's 65504), updated in place by the fused add + RMSNorm kernel. Linear inputs and outputs are
  float16, not bfloat16: on a tiny random qwen2 model with an f16 cache the logits' relative RMS error
  against the float32 CPU path was 8.4e-4 with float16 and 1.0e-2 with bfloat16 (1.6% vs 4.5% with a
  q4_0 cache, where small K differences flip 4-bit roundings). float16's range is the risk: measured on
  the CPU (200 tokens of code) the largest linear outputs are FFN-down's, 2.4e4 on SmolLM2-135M (3.7e3
  on Qwen2.5-Coder-1.5B; every other linear input/output stays under 1e3). So the FFN-down input is
  scaled by FFN_DOWN_SCALE = 2^-5 inside the activation kernel (exact: a power of two) and the add +
  norm kernel multiplies it back in float32: that matmul overflows only past 2e6. Logits leave the LM
  head in float16 (at a logit of 20 a step of 0.016) and are widened to float32.
- The embedding table is dequantized once at load into float16 on the device (one gather per step,
  no host round trip; 2 bytes per weight: 0.47 GB for a 151936 x 1536 vocabulary).
- RoPE tables are computed once on the CPU with `rope_tables` (the CPU path's own function) for every
  position of the cache, and read at positions held in a device tensor.
- The KV cache is engine.cuda_kv_cache.CudaKVCache. Blocks of up to VERIFY_ROWS_MAX rows (decode and
  speculative verify) attend row by row as independent decode queries, so row p of a verify block
  equals the decode step at p bit for bit (qmatmul and every kernel here are row-independent too);
  longer blocks (prefill chunks) use the prefill attention kernel. With K equalization the first chunk
  runs the RoPE kernel twice per layer: plain, for the cache to take its scales from Q and K, then with
  Q scaled by them (and rotated). Blocks of up to VERIFY_ROWS_MAX rows whose cache statistics are known
  run RoPE and the K and V writes as one launch (kernels.rope_kv_write, the same bits as rope_heads +
  k_write + v_write; TANDEM_FUSED_ROPE_WRITE=0 keeps the three launches, for an A/B).
- In blocks of up to VERIFY_ROWS_MAX rows the layer GEMVs hand their readers their K-split partial sums
  (kernels/split_output.py: the RoPE + K/V write, the add + norm and the activation kernels add them while
  loading, the same bits) instead of adding them themselves after an atomic; the Q/K/V projections only
  where the fused RoPE + K/V write reads them (not with TANDEM_FUSED_ROPE_WRITE=0 or before the cache's
  statistics are known). TANDEM_SPLIT_OUTPUT=0 turns it off.
  H200, Qwen2.5-1.5B layout at depth 4096: decode step 1591 -> 1527 us (f16 cache), 1691 -> 1623 (q4_0),
  16-row verify 2100 -> 1916. Where Q/K and V are two weight groups (of different types) with the same
  GEMV launch shape, they run as one launch (`Projections`, kernels.qmatmul.qmatmul_pair, the same bits;
  TANDEM_PAIR_GEMV=0 for two).
- Steps of 1..16 rows at a known position run as CUDA graphs (engine.cuda_graphs), captured lazily per
  row bucket (1, 2, 4, 8, 16; padded), per cache and per attention length bound (`StepInputs.max_length`:
  the first split while the rows end within it), once the cache's statistics are known
  (`CudaKVCache.can_replay`); greedy argmax is computed inside the graph, and plain decoding (`pick_next`,
  greedy or sampled) queues each step before the host reads the pick of the one before.

`CudaTransformer` has the CPU model's interface (config, embed, lm_head, forward) plus `step`.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.api import VERIFY_ROWS_MAX
from engine.config import ModelConfig
from engine.errors import ModelFileError, SettingsError
from engine.gguf_file import TensorInfo
from engine.linear import GpuLinear, group_by_type
from engine.models.transformer import rope_tables
from engine.quants import BLOCK_TABLE, byte_tensor, dequantize

if TYPE_CHECKING:
    from engine.sampling import Sampler
    from kernels.split_output import SplitOutput

log = logging.getLogger(__name__)

ACT_DTYPE = torch.float16  # linear inputs/outputs (see the module docstring)
FFN_DOWN_SCALE = 2.0**-5  # FFN-down input scale, undone in float32 (see the module docstring)
EMBED_ROWS_PER_CHUNK = 8192  # rows dequantized at a time when the embedding table is built


def graphs_enabled() -> bool:
    """CUDA graphs are on unless TANDEM_CUDA_GRAPHS is "0" (debugging: every step then runs eagerly)."""
    return os.environ.get("TANDEM_CUDA_GRAPHS", "1") != "0"


def split_output_enabled() -> bool:
    """Row steps leave each GEMV's K-split partial sums to the kernel that reads its output
    (kernels/split_output.py; the same bits) unless TANDEM_SPLIT_OUTPUT is "0" (an A/B; read when a step
    runs or is captured)."""
    return os.environ.get("TANDEM_SPLIT_OUTPUT", "1") != "0"


def fused_rope_write_enabled() -> bool:
    """RoPE + K/V writes of a row block in one launch unless TANDEM_FUSED_ROPE_WRITE is "0" (an A/B of
    the three launches; read when a step runs or is captured)."""
    return os.environ.get("TANDEM_FUSED_ROPE_WRITE", "1") != "0"


def pair_gemv_enabled() -> bool:
    """Two weight groups of one input (Q/K and a V of another type) in one GEMV launch unless
    TANDEM_PAIR_GEMV is "0" (an A/B; read when a step runs or is captured)."""
    return os.environ.get("TANDEM_PAIR_GEMV", "1") != "0"


class Projections:
    """Several weights applied to one input, grouped by type into as few GpuLinear launches as possible."""

    def __init__(self, infos: list[TensorInfo], biases: list[torch.Tensor | None], device) -> None:
        bias_of = {info.name: b for info, b in zip(infos, biases, strict=True)}
        self.groups = [GpuLinear(g, [bias_of[i.name] for i in g], device) for g in group_by_type(infos)]

    def __call__(self, h: torch.Tensor, split_output: bool = False) -> list[torch.Tensor | SplitOutput]:
        """h: (T, K) ACT_DTYPE -> one (T, N_i) view per weight, in the order given (SplitOutputs with
        split_output, see GpuLinear.matmul). Two groups whose GEMVs launch alike run as one launch
        (`kernels.qmatmul.qmatmul_pair`, the same bits) where their outputs are SplitOutputs."""
        from kernels.qmatmul import GEMV_ROWS_MAX, pair_config, qmatmul_pair

        if split_output and len(self.groups) == 2 and h.shape[0] <= GEMV_ROWS_MAX and pair_gemv_enabled():
            a, b = self.groups
            if pair_config(a.weight, b.weight) is not None:
                ya, yb = qmatmul_pair(h, a.weight, b.weight, a.bias, b.bias)
                return [*a.split(ya), *b.split(yb)]
        outs: list[torch.Tensor | SplitOutput] = []
        for linear in self.groups:
            outs.extend(linear.split(linear.matmul(h, split_output)))
        return outs


class CudaLayer:
    def __init__(self, config: ModelConfig, index: int, weights: dict, device) -> None:
        self.index = index
        self.sliding = config.is_sliding(index)
        self.window = config.sliding_window if self.sliding else None
        self.rope_base = config.rope_local_base if self.sliding else config.rope_base

        def vector(name: str) -> torch.Tensor | None:
            info = weights.get(f"blk.{index}.{name}")
            return None if info is None else dequantize(info.data, info.qtype, info.shape).to(device)

        def matrix(name: str) -> TensorInfo:
            info = weights.get(f"blk.{index}.{name}.weight")
            if info is None:
                raise ModelFileError(
                    f"Tensor blk.{index}.{name}.weight is missing; the model file is incomplete."
                )
            return info

        self.attn_norm, self.ffn_norm = vector("attn_norm.weight"), vector("ffn_norm.weight")
        if self.attn_norm is None or self.ffn_norm is None:
            raise ModelFileError(f"Layer {index} lacks its norm weights; the model file is incomplete.")
        self.q_norm, self.k_norm = vector("attn_q_norm.weight"), vector("attn_k_norm.weight")
        self.post_attn_norm = vector("post_attention_norm.weight")
        self.post_ffn_norm = vector("post_ffw_norm.weight")
        names = ("attn_q", "attn_k", "attn_v")
        self.qkv = Projections([matrix(n) for n in names], [vector(f"{n}.bias") for n in names], device)
        self.wo = GpuLinear([matrix("attn_output")], device=device)
        self.gate_up = Projections([matrix("ffn_gate"), matrix("ffn_up")], [None, None], device)
        self.down = GpuLinear([matrix("ffn_down")], device=device)


@dataclass
class StepInputs:
    """Device tensors describing T rows: token ids, positions (-1 = padding) and attention lengths."""

    tokens: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    lengths: torch.Tensor  # (T,) int32 = positions + 1 (0 for padding)
    max_length: int | None = None  # a bound on lengths known on the host (None: the cache's room)
    x: torch.Tensor | None = None  # (T, d_model) float32 embedded rows, when already computed


@dataclass
class StepOutput:
    logits: torch.Tensor  # (T, vocab) float32
    argmax: torch.Tensor  # (T,) int64, greedy pick of each row
    hidden: list[torch.Tensor]  # per captured layer (T, d_model) float32


class CudaTransformer(torch.nn.Module):
    def __init__(
        self, config: ModelConfig, weights: dict, device: str | torch.device = "cuda", progress=None
    ) -> None:
        super().__init__()
        from engine.cuda_graphs import StepGraphs

        self.config, self.device = config, torch.device(device)
        if "token_embd.weight" not in weights:
            raise ModelFileError("Tensor token_embd.weight is missing; the model file is incomplete.")
        self.embedding = _embedding_table(weights["token_embd.weight"], self.device)  # (vocab, d) float16
        layers = []
        for i in range(config.n_layers):
            layers.append(CudaLayer(config, i, weights, self.device))
            if progress:
                progress("Loading layers", (i + 1) / (config.n_layers + 1))
        self.layers = layers
        norm = weights.get("output_norm.weight")
        if norm is None:
            raise ModelFileError("Tensor output_norm.weight is missing; the model file is incomplete.")
        self.output_norm = dequantize(norm.data, norm.qtype, norm.shape).to(self.device)
        head = weights.get("output.weight", weights["token_embd.weight"])  # tied to the embedding if absent
        self.lm_head = GpuLinear([head], device=self.device, compute_dtype=ACT_DTYPE)
        factors = weights.get("rope_freqs.weight")
        self.rope_freq_factors = (
            None if factors is None else dequantize(factors.data, factors.qtype, factors.shape)
        )
        self._rope: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}  # base -> cos, sin (P, rope_dim / 2)
        self._rope_len = 0
        self.graphs = StepGraphs(self) if self.device.type == "cuda" and graphs_enabled() else None

    @classmethod
    def from_gguf(cls, gguf_file, device: str | torch.device = "cuda", progress=None) -> CudaTransformer:
        return cls(ModelConfig.from_gguf(gguf_file), gguf_file.tensors, device, progress)

    # -- pieces ------------------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (T,) int64 (any device) -> (T, d_model) float32 on this device."""
        ids = tokens.to(self.device)
        x = self.embedding.index_select(0, ids).to(torch.float32)  # (T, d_model)
        return x * self.config.embed_scale if self.config.embed_scale != 1.0 else x

    def rope_for(self, n_positions: int) -> None:
        """Make the RoPE tables cover positions [0, n_positions) (computed on the CPU, as the CPU path)."""
        if n_positions <= self._rope_len:
            return
        c = self.config
        positions = torch.arange(n_positions)
        bases = {layer.rope_base for layer in self.layers}
        self._rope = {
            base: tuple(
                t.contiguous().to(self.device)
                for t in rope_tables(positions, c.rope_dim, base, c.rope_scale, self.rope_freq_factors)
            )
            for base in bases
        }
        self._rope_len = n_positions
        if self.graphs is not None:
            self.graphs.forget_queued()
            self.graphs.graphs.clear()  # captured steps hold the old tables' addresses

    def check_tokens(self, ids: list[int]) -> None:
        if ids and (max(ids) >= self.config.vocab_size or min(ids) < 0):
            raise ValueError("token id outside the vocabulary")

    def step_rows(self, inputs: torch.Tensor, max_length: int | None, advance: bool = False) -> StepInputs:
        """StepInputs of a captured step from its (2, R) int64 [tokens; positions] buffer, embedded rows
        included. advance: the step's positions are a copy and the buffer's positions row becomes
        positions + 1 (the 1-row decode graph's next inputs; its pick goes into the tokens row at the end).
        On CUDA one launch (kernels.step_inputs) unless TANDEM_FUSED_STEP_INPUTS is "0"; else torch, the
        same values."""
        from kernels.step_inputs import step_inputs, step_positions

        if self.device.type == "cuda" and os.environ.get("TANDEM_FUSED_STEP_INPUTS", "1") != "0":
            x, lengths, positions = step_inputs(inputs, self.embedding, self.config.embed_scale, advance)
            return StepInputs(inputs[0], positions, lengths, max_length, x)
        lengths, positions = step_positions(inputs, advance)  # (R,) each, lengths 0 for padding rows
        return StepInputs(inputs[0], positions, lengths, max_length)

    def inputs_for(self, ids: list[int], pos: int) -> StepInputs:
        """Eager inputs for rows ids at positions [pos, pos + len(ids))."""
        tokens = torch.tensor(ids, dtype=torch.long).to(self.device)
        positions = torch.arange(pos, pos + len(ids), device=self.device)
        return StepInputs(tokens, positions, (positions + 1).to(torch.int32))

    # -- the forward pass --------------------------------------------------------------------------------
    def run_rows(
        self,
        inputs: StepInputs,
        cache,
        first_pos: int | None,
        logits_rows: str,
        capture: tuple[int, ...] = (),
        widen: bool = True,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The model over T rows described by device tensors; no host sync for T <= VERIFY_ROWS_MAX with
        first_pos None (the body of a captured step).

        first_pos: the first row's position when known on the host (eager): prefill chunks of more than
        VERIFY_ROWS_MAX rows need it, and K smoothing and equalization take their vectors when it is 0.
        logits_rows: "all" -> (T, vocab), "last" -> (1, vocab), "none". Returns (logits float32, hidden);
        without widen the logits as the LM head leaves them (float16).
        """
        from kernels.layer_ops import add_rms_norm, gated_activation, rope_heads

        c = self.config
        n_rows = inputs.tokens.shape[0]
        as_rows = n_rows <= VERIFY_ROWS_MAX
        if not as_rows and first_pos is None:
            raise ValueError("a block of more than VERIFY_ROWS_MAX rows needs its start position")
        x = self.embed(inputs.tokens) if inputs.x is None else inputs.x  # (T, d_model) float32, the residual
        # (FFN output, post-norm), added by the next norm kernel
        pending: tuple[torch.Tensor | SplitOutput | None, torch.Tensor | None] = (None, None)
        down_scale = 1.0 / FFN_DOWN_SCALE
        captured: dict[int, torch.Tensor] = {}
        fuse = as_rows and fused_rope_write_enabled()
        split = as_rows and split_output_enabled()  # GEMV outputs as SplitOutputs where the reader adds them
        for layer in self.layers:
            h = add_rms_norm(
                x, layer.attn_norm, c.norm_eps, *pending, out_dtype=ACT_DTYPE, delta_scale=down_scale
            )  # (T, d_model)
            if layer.index - 1 in capture:
                captured[layer.index - 1] = x.clone()
            cos, sin = self._rope[layer.rope_base]
            rope_opts = dict(neox=c.rope_neox, q_norm=layer.q_norm, k_norm=layer.k_norm, eps=c.norm_eps)
            if fuse and cache.fuses_rope_write(layer.index, first_pos):  # one launch, the same bits
                q_in, k_in, v = layer.qkv(h, split)  # (T, Hq*Dh), (T, Hkv*Dh), (T, Hkv*Dh) float16
                q = cache.rope_write_rows(layer.index, *(self._heads(t) for t in (q_in, k_in, v)),
                                          inputs.positions, cos, sin, **rope_opts)
            else:
                q_in, k_in, v = (self._heads(t) for t in layer.qkv(h))
                rope = functools.partial(rope_heads, q_in, k_in, inputs.positions, cos, sin, **rope_opts)
                if cache.takes_k_scales(layer.index, first_pos):  # K equalization's first chunk: scales
                    cache.take_k_scales(layer.index, *rope(), first_pos)  # from its plain Q and K
                q, k = rope(rotation=cache.rotation, q_scale=cache.q_scale(layer.index))
                # (T, Hq, Dh) scaled and rotated into K's basis, (T, Hkv, Dh), float32
                cache.write_rows(layer.index, k, v, inputs.positions, first_pos)
            attn = torch.empty(n_rows, c.n_heads, c.head_dim, dtype=ACT_DTYPE, device=self.device)
            if as_rows:
                cache.attend_rows(layer.index, q, inputs.lengths, c.attn_scale, layer.window, attn,
                                  inputs.max_length)
            else:
                cache.attend_chunk(layer.index, q, first_pos, c.attn_scale, layer.window, attn)
            o = layer.wo.matmul(attn.view(n_rows, c.n_heads * c.head_dim), split)  # (T, d_model)
            h = add_rms_norm(x, layer.ffn_norm, c.norm_eps, o, layer.post_attn_norm, out_dtype=ACT_DTYPE)
            gate, up = layer.gate_up(h, split)  # (T, d_ff) each
            act = gated_activation(gate, up, c.activation, scale=FFN_DOWN_SCALE)  # (T, d_ff)
            pending = (layer.down.matmul(act, split), layer.post_ffn_norm)  # added by the next norm kernel
        final = add_rms_norm(
            x, self.output_norm, c.norm_eps, *pending, out_dtype=ACT_DTYPE, delta_scale=down_scale
        )  # (T, d_model)
        if c.n_layers - 1 in capture:
            captured[c.n_layers - 1] = x.clone()
        hidden = [captured[i] for i in sorted(captured)]
        if logits_rows == "none":
            return None, hidden
        rows = final[-1:] if logits_rows == "last" else final
        logits = self.lm_head.matmul(rows)  # (rows, vocab) float16
        return (logits.to(torch.float32) if widen else logits), hidden

    def _heads(self, t: torch.Tensor | SplitOutput) -> torch.Tensor | SplitOutput:
        """A (T, H * Dh) projection output -> (T, H, Dh) view; a SplitOutput stays as it is (its reader,
        kernels.rope_kv_write, takes it as (T, H * Dh))."""
        return t.view(t.shape[0], -1, self.config.head_dim) if isinstance(t, torch.Tensor) else t

    def step(self, ids: list[int], pos: int, cache, capture: tuple[int, ...] = ()) -> StepOutput:
        """Rows ids at [pos, pos + len(ids)), len <= VERIFY_ROWS_MAX: logits and argmax of every row.

        Replays a CUDA graph when one applies (the outputs are then views of its static buffers, valid
        until the next step); otherwise runs eagerly.
        """
        n = len(ids)
        if not 1 <= n <= VERIFY_ROWS_MAX:
            raise ValueError(f"a step takes 1..{VERIFY_ROWS_MAX} rows, got {n}")
        self.check_tokens(ids)
        cache._check_room(pos, n)
        self.rope_for(cache.max_len)
        if self._graphs_apply(pos, cache):
            return self.graphs.run(ids, pos, cache, tuple(capture))
        self._forget_queued()
        logits, hidden = self.run_rows(self.inputs_for(ids, pos), cache, pos, "all", tuple(capture))
        return StepOutput(logits, logits.argmax(-1), hidden)

    def pick_next(
        self, token: int, pos: int, cache, ahead: bool = False, sampler: Sampler | None = None
    ) -> int:
        """The pick after token at pos, read to the host: the argmax, or the draw of a sampler that needs no
        recent tokens (`Sampler.graph_params`; the step then samples on the device). ahead: the caller will
        probably ask for the pick after this one next (plain decoding); that step is then queued on the
        device before the host waits for this one (engine.cuda_graphs, StepGraphs.pick), when there is room
        for it."""
        if sampler is not None and sampler.graph_params is None:
            raise ValueError("pick_next samples only without a repeat penalty (it needs the recent tokens)")
        self.check_tokens([token])
        cache._check_room(pos, 1)
        self.rope_for(cache.max_len)
        if self._graphs_apply(pos, cache):
            return self.graphs.pick(token, pos, cache, ahead and pos + 2 <= cache.max_len, sampler)
        out = self.step([token], pos, cache)
        return int(out.argmax[0]) if sampler is None else sampler.pick(out.logits[0], [])

    def _graphs_apply(self, pos: int, cache) -> bool:
        return self.graphs is not None and pos > 0 and cache.can_replay()

    def _forget_queued(self) -> None:
        if self.graphs is not None:
            self.graphs.forget_queued()  # a step queued ahead would read what this run rewrites

    def forward(
        self,
        tokens: torch.Tensor,
        pos: int,
        cache,
        logits_for: str = "last",
        capture_layers: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """As Transformer.forward: tokens (T,) at [pos, pos + T) -> (logits or None, captured layers)."""
        if not hasattr(cache, "write_rows"):
            raise SettingsError("the GPU model needs the GPU KV cache (engine.kv_cache.make_kv_cache)")
        ids = [int(t) for t in tokens.tolist()]
        capture = tuple(capture_layers)
        self._forget_queued()
        if logits_for != "none" and len(ids) <= VERIFY_ROWS_MAX:
            out = self.step(ids, pos, cache, capture)
            logits = out.logits[-1:] if logits_for == "last" else out.logits
            return logits.clone(), [h.clone() for h in out.hidden]
        self.check_tokens(ids)
        cache._check_room(pos, len(ids))
        self.rope_for(cache.max_len)
        return self.run_rows(self.inputs_for(ids, pos), cache, pos, logits_for, capture)


def _embedding_table(info: TensorInfo, device: torch.device) -> torch.Tensor:
    """The whole (vocab, d_model) table as float16 on the device, dequantized there a chunk of rows
    at a time."""
    if len(info.shape) != 2:
        raise ModelFileError(f"{info.name} has shape {info.shape}; an embedding table must be 2-D")
    n_rows, n_cols = (int(s) for s in info.shape)
    block_elems, block_bytes = BLOCK_TABLE[info.qtype]
    row_bytes = n_cols // block_elems * block_bytes
    raw = byte_tensor(info.data)  # (n_rows * row_bytes,) a view of the memory map
    table = torch.empty(n_rows, n_cols, dtype=torch.float16, device=device)
    for start in range(0, n_rows, EMBED_ROWS_PER_CHUNK):
        stop = min(n_rows, start + EMBED_ROWS_PER_CHUNK)
        chunk = raw[start * row_bytes : stop * row_bytes].to(device)
        table[start:stop] = dequantize(chunk, info.qtype, (stop - start, n_cols)).to(torch.float16)
    return table
