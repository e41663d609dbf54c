"""The KV cache on the GPU: `engine.kv_cache.KVCache`'s stores, rotation and smoothing, written and read
by the Triton kernels in kernels/ (k_write, v_write, decode_attention, prefill_attention).

Same numerics contract as the CPU cache: K is smoothed (fixed per-layer mean taken from the first
prefill chunk), rotated (quantized K unless skip-WHT) and quantized into the same `KVStore` layout,
so snapshots save and restore either cache alike. What differs is the form of the calls:

- positions come from a device tensor (`write_rows`, `attend_rows`), so a captured CUDA graph
  replays a decode or verify step at any position without the host reading anything;
- the smoothing vectors live in fixed buffers (a graph holds their addresses): assigning `k_mean`
  copies into them instead of replacing the tensors;
- rows of up to VERIFY_ROWS_MAX queries are attended as independent single-token decodes over the
  same cache, with split boundaries fixed per cache, so row p of a speculative verify block is
  computed exactly as the decode step at position p (greedy verification is lossless bit for bit).

Q must reach attention in K's basis: the engine rotates it in its RoPE kernel (kernels.layer_ops).
"""

from __future__ import annotations

import logging

import torch

from engine.api import VERIFY_ROWS_MAX
from engine.hadamard import rotate
from engine.kv_cache import KVCache
from engine.kv_quant import KVStore

log = logging.getLogger(__name__)

BLOCK_N = 64  # positions per attention tile; the decode split size is a multiple of it


def _batched(store: KVStore, rows: int = 1) -> KVStore:
    """A (Hkv, P, X) store as the kernels' (rows, Hkv, P, X): one sequence, or `rows` sharing it
    (stride 0)."""
    view = lambda t: None if t is None else t.unsqueeze(0).expand(rows, *t.shape)
    return KVStore(store.kv_type, view(store.qs), view(store.d), view(store.m))


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
    ) -> None:
        from kernels.decode_attention import default_split_size
        from kernels.kv_blocks import check_kernel_head_dim

        check_kernel_head_dim(head_dim)
        self.device = torch.device(device)
        # fixed smoothing buffers, created before KVCache.__init__ assigns k_mean through the property below
        self._mean_buffers = [
            torch.zeros(n_kv_heads, head_dim, dtype=torch.float32, device=self.device)
            for _ in range(n_layers)
        ]  # per layer (n_kv, D)
        self._mean_known = [False] * n_layers
        super().__init__(  # no attention sinks in f16 here yet (the kernels read only the stores)
            n_layers, n_kv_heads, head_dim, max_len, k_type, v_type, self.device, rotate_k, k_smooth,
            sink_tokens=0,
        )
        self._rows_views: dict[int, tuple[list[KVStore], list[KVStore]]] = {}
        # split boundaries of decode attention: fixed by the capacity, the same for every row count
        self.split_size = default_split_size(self.device, n_kv_heads, max_len, BLOCK_N)

    # -- smoothing vectors in fixed buffers ----------------------------------------------------------------
    @property
    def k_mean(self) -> list[torch.Tensor | None]:
        return [
            buf if known else None for buf, known in zip(self._mean_buffers, self._mean_known, strict=True)
        ]

    @k_mean.setter
    def k_mean(self, means: list[torch.Tensor | None]) -> None:
        if len(means) != len(self._mean_buffers):
            raise ValueError(f"{len(means)} smoothing vectors for {len(self._mean_buffers)} layers")
        for layer, mean in enumerate(means):
            self._mean_known[layer] = mean is not None
            if mean is not None and mean is not self._mean_buffers[layer]:
                self._mean_buffers[layer].copy_(mean)

    def means_known(self) -> bool:
        """Whether every layer has its smoothing vector (a captured step cannot take one)."""
        return not self.k_smooth or all(self._mean_known)

    def stores_for_rows(self, rows: int) -> tuple[list[KVStore], list[KVStore]]:
        """Per layer K and V stores seen as `rows` sequences sharing the cache (views, cached)."""
        if rows not in self._rows_views:
            self._rows_views[rows] = (
                [_batched(s, rows) for s in self.k],
                [_batched(s, rows) for s in self.v],
            )
        return self._rows_views[rows]

    # -- the engine's kernel path --------------------------------------------------------------------------
    def write_rows(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, first_pos: int | None
    ) -> None:
        """k: (T, n_kv, D) float32 after RoPE, v: (T, n_kv, D) any float (row stride free), for the
        per-row positions (T,) (a device tensor; negative rows are skipped).

        first_pos: the first row's position when the host knows it (eager calls). Smoothing takes its
        mean from this block when first_pos is 0 or the layer has none yet; a captured step passes None
        and needs the mean already known.
        """
        from kernels.k_write import k_write
        from kernels.v_write import v_write

        mean = None
        if self.k_smooth:
            if first_pos is not None and (first_pos == 0 or not self._mean_known[layer]):
                self._mean_buffers[layer].copy_(k.mean(dim=0))  # (n_kv, D), fixed for the conversation
                self._mean_known[layer] = True
            elif not self._mean_known[layer]:
                raise RuntimeError(f"layer {layer} has no K smoothing vector; run a prefill chunk first")
            mean = self._mean_buffers[layer]
        k_stores, v_stores = self.stores_for_rows(1)
        k_write(
            k.permute(1, 0, 2)[None], k_stores[layer], mean=mean, rotation=self.rotation, positions=positions
        )
        v_write(v.permute(1, 0, 2)[None], v_stores[layer], positions=positions)

    def attend_rows(
        self,
        layer: int,
        q: torch.Tensor,
        lengths: torch.Tensor,
        scale: float,
        window: int | None,
        out: torch.Tensor,
    ) -> None:
        """Each row of q (R, Hq, D) (float32, in K's basis) attends to cache positions [0, lengths[r])
        (lengths: (R,) int32 on the device; 0 = a padding row) -> out (R, Hq, D)."""
        from kernels.decode_attention import decode_attention

        k_stores, v_stores = self.stores_for_rows(q.shape[0])
        decode_attention(
            q,
            k_stores[layer],
            v_stores[layer],
            lengths,
            scale=scale,
            window=window,
            max_length=self.max_len,
            split_size=self.split_size,
            block_n=BLOCK_N,
            out=out,
        )

    def attend_chunk(
        self, layer: int, q: torch.Tensor, pos: int, scale: float, window: int | None, out: torch.Tensor
    ) -> None:
        """A prefill chunk's queries q (T, Hq, D) at [pos, pos + T), causal over the cache
        -> out (T, Hq, D)."""
        from kernels.prefill_attention import prefill_attention

        k_stores, v_stores = self.stores_for_rows(1)
        prefill_attention(
            q.permute(1, 0, 2)[None],
            k_stores[layer],
            v_stores[layer],
            pos,
            scale=scale,
            window=window,
            out=out.permute(1, 0, 2)[None],
        )

    # -- KVCache's interface, through the kernels ------------------------------------------------------
    def write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (T, n_kv, D) for positions [pos, pos + T) (as KVCache.write)."""
        self._check_room(pos, k.shape[0])
        positions = torch.arange(pos, pos + k.shape[0], device=self.device)
        self.write_rows(layer, k.to(torch.float32), v, positions, pos)

    def attention(
        self, layer: int, q: torch.Tensor, pos: int, scale: float, window: int | None
    ) -> torch.Tensor:
        """q: (T, H, D) at positions [pos, pos + T), after write(). Returns (T, H, D) float32 (as KVCache)."""
        n_new = q.shape[0]
        q = q.to(torch.float32)
        if self.rotation is not None:
            q = rotate(q, self.rotation)  # (T, H, D) in K's basis
        out = torch.empty_like(q)
        if n_new <= VERIFY_ROWS_MAX:
            lengths = torch.arange(pos + 1, pos + n_new + 1, dtype=torch.int32, device=self.device)
            self.attend_rows(layer, q.contiguous(), lengths, scale, window, out)
        else:
            self.attend_chunk(layer, q, pos, scale, window, out)
        return out
