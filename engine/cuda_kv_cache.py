"""The KV cache on the GPU: `engine.kv_cache.KVCache`'s stores, rotation, smoothing, K equalization and
attention sinks, written and read by the Triton kernels in kernels/ (k_write, v_write or both with RoPE in
rope_kv_write, decode_attention, verify_attention, prefill_attention).

Same numerics contract as the CPU cache: K is smoothed (fixed per-layer mean taken from the first
prefill chunk), divided by the K-equalization scales (engine/k_equalize.py, taken from the same chunk
and its queries), rotated (quantized K unless skip-WHT) and quantized into the same `KVStore` layout;
the first SINK_TOKENS positions of a quantized side are also kept in f16 and attention reads those
instead of their quantized copies. So snapshots save and restore either cache alike. What differs is
the form of the calls:

- positions come from a device tensor (`write_rows`, `attend_rows`), so a captured CUDA graph
  replays a decode or verify step at any position without the host reading anything;
- the smoothing vectors and K scales live in fixed buffers (a graph holds their addresses): assigning
  `k_mean` / `k_scale` copies into them instead of replacing the tensors; the sinks are fixed tensors too;
- a block's statistics are taken on the host's word (`first_pos`), so a captured step needs them known
  (`can_replay`); the sink rows of K and V are written by the write kernels, at any position;
- rows of up to VERIFY_ROWS_MAX queries are attended with split boundaries fixed per cache, each tile read
  once for all rows (kernels.verify_attention; windowed layers: one decode per row), so row p of a
  speculative verify block is computed exactly as the decode step at position p (greedy verification
  is lossless bit for bit).

Q must reach attention in K's basis: the engine scales (K equalization) and rotates it in its RoPE kernel
(kernels.layer_ops.rope_heads, `q_scale=` and `rotation=`); the KVCache interface (`attention`) does it
in torch.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from engine import k_equalize
from engine.api import VERIFY_ROWS_MAX
from engine.hadamard import rotate
from engine.kv_cache import KVCache
from engine.kv_quant import KVStore

log = logging.getLogger(__name__)

BLOCK_N = 64  # positions per attention tile; the decode split size is a multiple of it


def verify_attention_enabled() -> bool:
    """Verify rows through kernels.verify_attention unless TANDEM_VERIFY_ATTENTION is "0" (then one decode
    per row, the same bits: an A/B; read when a step runs or is captured)."""
    return os.environ.get("TANDEM_VERIFY_ATTENTION", "1") != "0"


def _shared(t: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """(H, ...) as (rows, H, ...): `rows` sequences sharing one tensor (stride 0)."""
    return None if t is None else t.unsqueeze(0).expand(rows, *t.shape)


def _batched(store: KVStore, rows: int = 1) -> KVStore:
    """A (Hkv, P, X) store as the kernels' (rows, Hkv, P, X): one sequence, or `rows` sharing it
    (stride 0)."""
    return KVStore(store.kv_type, _shared(store.qs, rows), _shared(store.d, rows), _shared(store.m, rows))


class _FixedVectors:
    """Per-layer (n_kv, D) float32 vectors in fixed device buffers (a captured graph holds their
    addresses), each known or not: the K smoothing means, the K equalization scales."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, device: torch.device, fill: float):
        shape = (n_kv_heads, head_dim)  # per layer
        self.buffers = [torch.full(shape, fill, dtype=torch.float32, device=device) for _ in range(n_layers)]
        self.known = [False] * n_layers

    def get(self) -> list[torch.Tensor | None]:
        return [buf if known else None for buf, known in zip(self.buffers, self.known, strict=True)]

    def set(self, vectors: list[torch.Tensor | None]) -> None:
        """Copy into the buffers (None: that layer's vector becomes unknown)."""
        if len(vectors) != len(self.buffers):
            raise ValueError(f"{len(vectors)} vectors for {len(self.buffers)} layers")
        for layer, vec in enumerate(vectors):
            self.known[layer] = vec is not None
            if vec is not None and vec is not self.buffers[layer]:
                self.buffers[layer].copy_(vec)

    def take(self, layer: int, vec: torch.Tensor) -> torch.Tensor:
        self.buffers[layer].copy_(vec)
        self.known[layer] = True
        return self.buffers[layer]


class CudaKVCache(KVCache):
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        k_type: str = "f16",
        v_type: str = "f16",
        device: str | torch.device = "cuda",
        rotate_k: bool | None = None,
        k_smooth: bool = False,
        k_equalize: bool = False,
        sink_tokens: int | None = None,
    ) -> None:
        """As KVCache; sink_tokens (None: SINK_TOKENS) may be at most BLOCK_N (one attention tile)."""
        from kernels.decode_attention import default_split_size
        from kernels.kv_blocks import check_kernel_head_dim

        check_kernel_head_dim(head_dim)
        if sink_tokens is not None and sink_tokens > BLOCK_N:
            raise ValueError(f"the GPU cache keeps at most {BLOCK_N} sink positions, not {sink_tokens}")
        self.device = torch.device(device)
        # fixed buffers, created before KVCache.__init__ assigns k_mean / k_scale through the properties below
        self._means = _FixedVectors(n_layers, n_kv_heads, head_dim, self.device, 0.0)
        self._scales = _FixedVectors(n_layers, n_kv_heads, head_dim, self.device, 1.0)
        super().__init__(
            n_layers, n_kv_heads, head_dim, max_len, k_type, v_type, self.device, rotate_k, k_smooth,
            k_equalize, sink_tokens,
        )
        # per row count: (K stores, V stores, K sinks, V sinks) seen as that many sequences sharing them
        self._rows_views: dict[int, tuple[list, list, list | None, list | None]] = {}
        # split boundaries of decode attention: fixed by the capacity, the same for every row count
        self.split_size = default_split_size(self.device, n_kv_heads, max_len, BLOCK_N)

    def length_bound(self, end: int) -> int | None:
        """A bound on attention lengths for steps whose rows end at length `end` (engine.cuda_graphs captures
        steps per bound): the split size while `end` fits in one split, where decode and verify attention
        write their output without a second (merge) launch; None (the capacity) past it, or when the
        capacity itself fits in one split. The splits are the same either way (`split_size`), so are the
        bits."""
        return self.split_size if end <= self.split_size < self.max_len else None

    # -- smoothing vectors and K scales in fixed buffers ------------------------------------------------
    @property
    def k_mean(self) -> list[torch.Tensor | None]:
        return self._means.get()

    @k_mean.setter
    def k_mean(self, means: list[torch.Tensor | None]) -> None:
        self._means.set(means)

    @property
    def k_scale(self) -> list[torch.Tensor | None]:
        return self._scales.get()

    @k_scale.setter
    def k_scale(self, scales: list[torch.Tensor | None]) -> None:
        self._scales.set(scales)

    def _statistics_known(self, layer: int) -> bool:
        """Whether the layer has the smoothing vector and K scales its recipe needs."""
        means = not self.k_smooth or self._means.known[layer]
        return means and (not self.k_equalize or self._scales.known[layer])

    def can_replay(self) -> bool:
        """Whether a step may run as a captured graph: every layer has its smoothing vector and K scales
        (a captured step cannot take them). Sink rows are written by the write kernels at any position."""
        return all(self._statistics_known(layer) for layer in range(len(self.k)))

    def q_scale(self, layer: int) -> torch.Tensor | None:
        """The (n_kv, D) K-equalization scales Q is multiplied by (kernels.layer_ops.rope_heads's q_scale),
        a fixed buffer; None without equalization."""
        return self._scales.buffers[layer] if self.k_equalize else None

    def stores_for_rows(self, rows: int) -> tuple[list[KVStore], list[KVStore]]:
        """Per layer K and V stores seen as `rows` sequences sharing the cache (views, cached)."""
        return self._views_for_rows(rows)[:2]

    def _views_for_rows(self, rows: int) -> tuple[list, list, list | None, list | None]:
        if rows not in self._rows_views:
            sinks = lambda side: None if side is None else [_shared(t, rows) for t in side]
            self._rows_views[rows] = (
                [_batched(s, rows) for s in self.k],
                [_batched(s, rows) for s in self.v],
                sinks(self.k_sink),  # per layer (rows, n_kv, S, D) float16
                sinks(self.v_sink),
            )
        return self._rows_views[rows]

    # -- a block's statistics (eager blocks: the host knows first_pos) -------------------------------
    def _mean_for(self, layer: int, k: torch.Tensor, first_pos: int | None) -> torch.Tensor:
        """The layer's smoothing vector (n_kv, D), taken from this block's k (T, n_kv, D) when first_pos
        is 0 or the layer has none yet."""
        if first_pos is not None and (first_pos == 0 or not self._means.known[layer]):
            return self._means.take(layer, k.mean(dim=0))  # fixed for the rest of the conversation
        if not self._means.known[layer]:
            raise RuntimeError(f"layer {layer} has no K smoothing vector; run a prefill chunk first")
        return self._means.buffers[layer]

    def takes_k_scales(self, layer: int, first_pos: int | None) -> bool:
        """Whether the block at first_pos sets the layer's K scales (first_pos 0, or none yet): then the
        engine calls `take_k_scales` with the block's queries before writing it."""
        return self.k_equalize and first_pos is not None and (first_pos == 0 or not self._scales.known[layer])

    def take_k_scales(self, layer: int, q: torch.Tensor | None, k: torch.Tensor, first_pos: int) -> None:
        """The layer's K scales from this block: k (T, n_kv, D) float32 after RoPE, q (T, Hq, D) its queries
        after RoPE (neither scaled nor rotated), or None for the K-only recipe (engine/k_equalize.py's
        recipe, computed by kernels.k_scales into the fixed buffer in two launches)."""
        from kernels.k_scales import k_scales

        k = k.to(torch.float32).contiguous()  # (T, n_kv, D)
        mean = self._mean_for(layer, k, first_pos) if self.k_smooth else None
        queries = None if q is None else q.to(torch.float32).contiguous()  # (T, Hq, D)
        k_scales(k, queries, mean, out=self._scales.buffers[layer])
        self._scales.known[layer] = True

    # -- the engine's kernel path --------------------------------------------------------------------------
    def write_rows(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, first_pos: int | None
    ) -> None:
        """k: (T, n_kv, D) float32 after RoPE, v: (T, n_kv, D) any float (row stride free), for the
        per-row positions (T,) (a device tensor; negative rows are skipped).

        first_pos: the first row's position when the host knows it (eager calls; the rows then sit at
        [first_pos, first_pos + T)). Smoothing takes its mean from this block when first_pos is 0 or the
        layer has none yet; K equalization needs the layer's scales taken already (`take_k_scales`). A
        captured step passes None and needs both known (`can_replay`).
        """
        from kernels.k_write import k_write
        from kernels.v_write import v_write

        mean = self._mean_for(layer, k, first_pos) if self.k_smooth else None
        scale = None
        if self.k_equalize:
            if not self._scales.known[layer]:
                raise RuntimeError(f"layer {layer} has no K scales; take them from the first chunk first")
            scale = self._scales.buffers[layer]
        k_stores, v_stores, k_sinks, v_sinks = self._views_for_rows(1)
        k_write(
            k.permute(1, 0, 2)[None], k_stores[layer], mean=mean, scale=scale, rotation=self.rotation,
            positions=positions, sink=None if k_sinks is None else k_sinks[layer],
        )  # K's sink rows: what k_write quantizes, in f16
        v_write(v.permute(1, 0, 2)[None], v_stores[layer], positions=positions,
                sink=None if v_sinks is None else v_sinks[layer])

    def fuses_rope_write(self, layer: int, first_pos: int | None) -> bool:
        """Whether `rope_write_rows` may stand for rope_heads + `write_rows`: the layer's smoothing vector
        and K scales are known, and this block does not take them (first_pos 0 takes them again)."""
        return first_pos != 0 and self._statistics_known(layer)

    def rope_write_rows(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
        cos: torch.Tensor, sin: torch.Tensor, *, neox: bool, q_norm: torch.Tensor | None,
        k_norm: torch.Tensor | None, eps: float,
    ) -> torch.Tensor:
        """kernels.layer_ops.rope_heads (Q scaled and rotated into K's basis) and `write_rows` in one launch
        (kernels.rope_kv_write), the same bits; only where `fuses_rope_write` says so.

        q: (T, Hq, D), k and v: (T, n_kv, D) the projections before RoPE (any float, row strides free);
        positions: (T,) on the device (negative rows: padding, not written); cos, sin: the RoPE tables.
        Returns q (T, Hq, D) float32."""
        from kernels.rope_kv_write import rope_kv_write

        if not self.fuses_rope_write(layer, None):
            raise RuntimeError(f"layer {layer} lacks its K smoothing vector or K scales; use write_rows")
        k_stores, v_stores, k_sinks, v_sinks = self._views_for_rows(1)
        return rope_kv_write(
            q, k, v, positions, cos, sin, k_stores[layer], v_stores[layer], neox=neox, q_norm=q_norm,
            k_norm=k_norm, eps=eps, rotation=self.rotation, k_scale=self.q_scale(layer),
            mean=self._means.buffers[layer] if self.k_smooth else None,
            k_sink=None if k_sinks is None else k_sinks[layer],
            v_sink=None if v_sinks is None else v_sinks[layer],
        )

    def attend_rows(
        self,
        layer: int,
        q: torch.Tensor,
        lengths: torch.Tensor,
        scale: float,
        window: int | None,
        out: torch.Tensor,
        max_length: int | None = None,
    ) -> None:
        """Each row of q (R, Hq, D) (float32, in K's basis) attends to cache positions [0, lengths[r])
        (lengths: (R,) int32 on the device; 0 = a padding row, max_length: a bound on them, None: the
        capacity) -> out (R, Hq, D). Several rows of a shape `verify_attention.applies` takes (no window, up
        to 16 query heads per KV head, head_dim up to 128), unless `verify_attention_enabled()` says no:
        kernels.verify_attention (each tile read once for all rows, past the first split); otherwise one
        decode per row. The same bits either way."""
        from kernels import verify_attention as verify
        from kernels.decode_attention import decode_attention

        k_stores, v_stores, k_sinks, v_sinks = self._views_for_rows(q.shape[0])
        batched = verify_attention_enabled() and verify.applies(
            q.shape[0], q.shape[1] // self.n_kv_heads, self.head_dim, window)
        attend = verify.verify_attention if batched else functools.partial(decode_attention, window=window)
        attend(
            q,
            k_stores[layer],
            v_stores[layer],
            lengths,
            scale=scale,
            max_length=max_length or self.max_len,
            split_size=self.split_size,
            block_n=BLOCK_N,
            out=out,
            k_sink=None if k_sinks is None else k_sinks[layer],
            v_sink=None if v_sinks is None else v_sinks[layer],
        )

    def attend_chunk(
        self, layer: int, q: torch.Tensor, pos: int, scale: float, window: int | None, out: torch.Tensor
    ) -> None:
        """A prefill chunk's queries q (T, Hq, D) at [pos, pos + T), causal over the cache
        -> out (T, Hq, D)."""
        from kernels.prefill_attention import prefill_attention

        k_stores, v_stores, k_sinks, v_sinks = self._views_for_rows(1)
        prefill_attention(
            q.permute(1, 0, 2)[None],
            k_stores[layer],
            v_stores[layer],
            pos,
            scale=scale,
            window=window,
            out=out.permute(1, 0, 2)[None],
            k_sink=None if k_sinks is None else k_sinks[layer],
            v_sink=None if v_sinks is None else v_sinks[layer],
        )

    # -- KVCache's interface, through the kernels (write() is KVCache's: it defers a first chunk) -------
    def _store(
        self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None
    ) -> None:
        """k, v: (T, n_kv, D) at positions [pos, pos + T); q: (H, T, D) their queries or None (as KVCache)."""
        k = k.to(torch.float32)
        if self.takes_k_scales(layer, pos):
            self.take_k_scales(layer, None if q is None else q.transpose(0, 1), k, pos)
        positions = torch.arange(pos, pos + k.shape[0], device=self.device)
        self.write_rows(layer, k, v, positions, pos)

    def attention(
        self, layer: int, q: torch.Tensor, pos: int, scale: float, window: int | None
    ) -> torch.Tensor:
        """q: (T, H, D) at positions [pos, pos + T), after write(). Returns (T, H, D) float32 (as KVCache)."""
        n_new, n_heads = q.shape[:2]
        q = q.to(torch.float32)
        pending = self._first_chunk[layer]
        if pending is not None:  # K equalization: the first chunk waited for its queries
            if pending[0] != pos or pending[1].shape[0] != n_new:
                raise ValueError(f"layer {layer}: attention at {pos}+{n_new} after a write at {pending[0]}")
            self._first_chunk[layer] = None
            self._store(layer, *pending, q=q.transpose(0, 1))
        if self.k_equalize:  # (q * s) . (k / s) = q . k, exactly
            q = q * k_equalize.query_scales(self._scales.buffers[layer], n_heads).transpose(0, 1)
        if self.rotation is not None:
            q = rotate(q, self.rotation)  # (T, H, D) in K's basis
        out = torch.empty_like(q)
        if n_new <= VERIFY_ROWS_MAX:
            lengths = torch.arange(pos + 1, pos + n_new + 1, dtype=torch.int32, device=self.device)
            self.attend_rows(layer, q.contiguous(), lengths, scale, window, out)
        else:
            self.attend_chunk(layer, q, pos, scale, window, out)
        return out
