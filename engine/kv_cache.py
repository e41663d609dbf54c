"""Position-indexed KV cache: one K and one V store per layer, written at absolute positions.

Speculative rollback needs nothing here: rejected positions are simply overwritten later.
K and V types are chosen independently (engine/kv_quant.py). For a quantized K type, K is
rotated (engine/hadamard.py) before quantization and Q the same way before attention, unless
skip-WHT turned the rotation off; with K smoothing, a per-layer, per-head channel mean taken from
the first prefill chunk is subtracted from K first. Both leave attention unchanged in exact
arithmetic: the rotation is orthonormal, and the mean shifts every score of a query equally.
With K equalization (engine/k_equalize.py), K is then divided per channel by power-of-two scales
from the same first chunk and Q multiplied by them: (q * s) . (k / s) = q . k, exactly. The scales
need the first chunk's queries too, so that chunk's K/V are written when attention() brings them.

Attention sinks: the first SINK_TOKENS positions of a quantized K or V are also kept in f16 (K as
stored: smoothed, scaled, rotated), and attention reads those instead of their 4/8-bit copies.
Most heads put a large share of their attention on the first token(s), and after smoothing their
keys are often the farthest from the mean, so their quantization error moved every weight of the
softmax (measured, docs/kv-quality-run.md run 3). The quantized copies stay in the stores, so
anything reading the stores alone still works. engine/cuda_kv_cache.py does all of this on the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine import k_equalize, kv_quant
from engine.api import VERIFY_ROWS_MAX
from engine.errors import SettingsError
from engine.hadamard import Rotation, make_rotation, rotate

QUANTIZED_K_TYPES = ("q8_0", "q4_0", "q4_1")
# positions kept in f16 besides their quantized copies; 4 was better than 1 or 2 on SmolLM2, Gemma-3
# and Qwen2.5-Coder-0.5B and no worse than 8 (docs/kv-quality-run.md, run 3)
SINK_TOKENS = 4


def attention_mask(pos: int, n_new: int, n_keys: int, window: int | None, device) -> torch.Tensor | None:
    """(T, L) bool, True where query pos+i may see key j: causal, and inside the sliding window."""
    if n_new == 1 and (window is None or n_keys <= window):
        return None
    q_pos = torch.arange(pos, pos + n_new, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(n_keys, device=device)[None, :]  # (1, L)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= (q_pos - k_pos) < window
    return mask


def resolve_k_smooth(mode: str, k_type: str) -> bool:
    """auto = on for every quantized K type, off for f16/bf16 K.

    Measured (BENCHMARKS.md, KV cache table, 512 tokens of code and prose, K quantized, V f16): with the
    rotation on, smoothing is the better choice on all four default models for q4_0 except
    Qwen2.5-Coder-0.5B (where smoothing alone is better still), and for q8_0 it takes Qwen2.5-Coder-0.5B
    from +2.4%/+3.8% to +0.2%/-0.6% perplexity while changing the others by < 0.3%.
    """
    if mode == "auto":
        return k_type in QUANTIZED_K_TYPES
    return mode == "on"


def make_kv_cache(
    n_layers: int,
    n_kv_heads: int,
    head_dim: int,
    max_len: int,
    k_type: str = "f16",
    v_type: str = "f16",
    device: str | torch.device = "cpu",
    rotate_k: bool | None = None,
    k_smooth: bool = False,
    k_equalize: bool = False,
) -> KVCache:
    """The cache for a device: this module's torch path on CPU, the Triton kernels' on CUDA."""
    if torch.device(device).type == "cuda":
        from engine.cuda_kv_cache import CudaKVCache

        return CudaKVCache(
            n_layers, n_kv_heads, head_dim, max_len, k_type, v_type, device, rotate_k, k_smooth, k_equalize
        )
    return KVCache(
        n_layers, n_kv_heads, head_dim, max_len, k_type, v_type, device, rotate_k, k_smooth, k_equalize
    )


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        k_type: str = "f16",
        v_type: str = "f16",
        device: str | torch.device = "cpu",
        rotate_k: bool | None = None,
        k_smooth: bool = False,
        k_equalize: bool = False,
        sink_tokens: int | None = None,
    ) -> None:
        """sink_tokens: how many first positions of a quantized K or V also stay in f16 (None: SINK_TOKENS)"""
        for name, kind in (("K", k_type), ("V", v_type)):
            if kind not in kv_quant.KV_TYPES and kind != "f32":
                raise SettingsError(
                    f"{name} cache type '{kind}' is not supported; choose one of "
                    f"{', '.join(kv_quant.KV_TYPES)}."
                )
            if kind != "f32":
                kv_quant.check_head_dim(kind, head_dim)
        self.max_len, self.head_dim, self.n_kv_heads = max_len, head_dim, n_kv_heads
        self.k_type, self.v_type = k_type, v_type
        k_quantized = k_type != "f32" and kv_quant.kv_type(k_type).quantized
        # f16/bf16 K is never rotated; a quantized K is, unless the caller (skip-WHT) says no
        self.rotation: Rotation | None = (
            make_rotation(head_dim) if (k_quantized and rotate_k is not False) else None
        )
        if self.rotation is not None:
            self.rotation = self.rotation.to(device)
        self.k_smooth = k_smooth
        self.k_mean: list[torch.Tensor | None] = [None] * n_layers  # per layer (n_kv, D) float32
        # k-equalize: per layer (n_kv, D) float32 powers of two (engine/k_equalize.py); K / s is stored
        self.k_equalize = k_equalize
        self.k_scale: list[torch.Tensor | None] = [None] * n_layers
        # the first chunk's (pos, k, v) of each layer, held until attention() brings its queries
        self._first_chunk: list[tuple[int, torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        shape = (n_kv_heads, max_len)
        self.k = [self._allocate(k_type, shape, device) for _ in range(n_layers)]
        self.v = [self._allocate(v_type, shape, device) for _ in range(n_layers)]
        # attention sinks: per layer (n_kv, S, D) float16 copies of the first S positions (quantized sides)
        wanted = SINK_TOKENS if sink_tokens is None else sink_tokens
        quantized = any(kind != "f32" and kv_quant.kv_type(kind).quantized for kind in (k_type, v_type))
        self.sink_tokens = min(max_len, wanted) if quantized else 0
        self.k_sink = self._allocate_sinks(k_type, n_layers, device)
        self.v_sink = self._allocate_sinks(v_type, n_layers, device)

    def _allocate(self, kind: str, shape: tuple[int, int], device) -> kv_quant.KVStore:
        if kind == "f32":  # test-only reference type
            return kv_quant.KVStore(
                "f32", torch.zeros(*shape, self.head_dim, dtype=torch.float32, device=device)
            )
        return kv_quant.allocate(kind, shape, self.head_dim, device)

    def _allocate_sinks(self, kind: str, n_layers: int, device) -> list[torch.Tensor] | None:
        if self.sink_tokens == 0 or kind == "f32" or not kv_quant.kv_type(kind).quantized:
            return None
        shape = (self.n_kv_heads, self.sink_tokens, self.head_dim)
        return [torch.zeros(shape, dtype=torch.float16, device=device) for _ in range(n_layers)]

    @property
    def nbytes(self) -> int:
        vectors = [m for m in self.k_mean + self.k_scale if m is not None]
        sinks = (self.k_sink or []) + (self.v_sink or [])
        extra = sum(t.numel() * t.element_size() for t in vectors + sinks)
        return sum(s.nbytes() for s in self.k + self.v) + extra

    def reset(self) -> None:
        """Forget the smoothing vectors (a new conversation will take them from its first chunk)."""
        self.k_mean = [None] * len(self.k_mean)
        self.k_scale = [None] * len(self.k_scale)  # k-equalize
        self._first_chunk = [None] * len(self._first_chunk)

    @staticmethod
    def _encode(x: torch.Tensor, kind: str) -> kv_quant.KVStore:
        if kind == "f32":
            return kv_quant.KVStore("f32", x.to(torch.float32))
        return kv_quant.quantize(x, kind)

    @staticmethod
    def _decode(store: kv_quant.KVStore) -> torch.Tensor:
        return store.qs.to(torch.float32) if store.kv_type == "f32" else kv_quant.dequantize(store)

    def _check_room(self, pos: int, n_new: int) -> None:
        if pos + n_new > self.max_len:
            raise SettingsError(
                f"The conversation needs {pos + n_new} tokens of context but only {self.max_len} "
                "are allocated; raise the context length or start a new chat."
            )

    def write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (T, n_kv, D) for positions [pos, pos + T). With K equalization the first chunk is
        stored by the attention() call that follows (its scales need the chunk's queries)."""
        self._check_room(pos, k.shape[0])
        if self._first_chunk[layer] is not None:  # written twice without attention: scales from K alone
            self._store(layer, *self._first_chunk[layer])
            self._first_chunk[layer] = None
        if self.k_equalize and (self.k_scale[layer] is None or pos == 0):
            self._first_chunk[layer] = (pos, k, v)
            return
        self._store(layer, pos, k, v)

    def _store(
        self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None
    ) -> None:
        """k, v: (T, n_kv, D) for positions [pos, pos + T); q: (H, T, D) their queries or None."""
        n_new = k.shape[0]
        k = k.transpose(0, 1).to(torch.float32)  # (n_kv, T, D)
        v = v.transpose(0, 1)  # (n_kv, T, D)
        if self.k_smooth:
            if self.k_mean[layer] is None or pos == 0:
                self.k_mean[layer] = k.mean(dim=1)  # (n_kv, D), fixed for the rest of the conversation
            k = k - self.k_mean[layer][:, None, :]
        if self.k_equalize:  # k-equalize: scales from the first chunk, like the mean
            if self.k_scale[layer] is None or pos == 0:
                self.k_scale[layer] = k_equalize.channel_scales(k, q)  # (n_kv, D)
            k = k / self.k_scale[layer][:, None, :]
        if self.rotation is not None:
            k = rotate(k, self.rotation)  # (n_kv, T, D)
        self.k[layer].narrow(1, pos, n_new).copy_(self._encode(k, self.k_type))
        self.v[layer].narrow(1, pos, n_new).copy_(self._encode(v, self.v_type))
        n_sink = min(self.sink_tokens - pos, n_new)
        if n_sink > 0:  # attention sinks: f16 copies of the first positions
            for sinks, x in ((self.k_sink, k), (self.v_sink, v)):
                if sinks is not None:
                    sinks[layer][:, pos : pos + n_sink].copy_(x[:, :n_sink])

    def _read(self, layer: int, first: int, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions [first, n_keys) as float32 (n_kv, L, D), the sinks from their f16 copies."""
        k = self._decode(self.k[layer].narrow(1, first, n_keys - first))  # (n_kv, L, D) float32
        v = self._decode(self.v[layer].narrow(1, first, n_keys - first))  # (n_kv, L, D) float32
        n_sink = min(self.sink_tokens, n_keys) - first
        if n_sink > 0:
            for sinks, x in ((self.k_sink, k), (self.v_sink, v)):
                if sinks is not None:
                    x[:, :n_sink] = sinks[layer][:, first : first + n_sink]
        return k, v

    def attention(
        self, layer: int, q: torch.Tensor, pos: int, scale: float, window: int | None
    ) -> torch.Tensor:
        """q: (T, H, D) at positions [pos, pos + T), after write(). Returns (T, H, D).

        Blocks of up to VERIFY_ROWS_MAX queries (speculative verification) are attended one row at a
        time through the same code path as single-token decoding: SDPA with a mask picks another
        kernel and sums in another order, and greedy verification must reproduce plain decoding
        bit for bit, not merely to rounding (measured: 3 of 6 SmolLM2 n-gram prompts diverged at
        near-ties before this). K/V are dequantized once per call either way.
        """
        n_new = q.shape[0]
        q = q.transpose(0, 1).to(torch.float32)  # (H, T, D)
        pending = self._first_chunk[layer]
        if pending is not None:
            if pending[0] != pos or pending[1].shape[0] != n_new:
                raise ValueError(f"layer {layer}: attention at {pos}+{n_new} after a write at {pending[0]}")
            self._store(layer, *pending, q=q)
            self._first_chunk[layer] = None
        first = 0 if window is None else max(0, pos - window + 1)  # keys no query of this block can see
        k, v = self._read(layer, first, pos + n_new)  # (n_kv, L, D) float32 each
        if self.k_equalize:  # k-equalize: (q * s) . (k / s) = q . k
            q = q * k_equalize.query_scales(self.k_scale[layer], q.shape[0])
        if self.rotation is not None:
            q = rotate(q, self.rotation)  # same basis as the stored K: Q.K unchanged
        if 1 < n_new <= VERIFY_ROWS_MAX:
            rows = [_sdpa(q[:, i : i + 1], k, v, first, pos + i, scale, window) for i in range(n_new)]
            out = torch.cat(rows, dim=1)  # (H, T, D)
        else:
            out = _sdpa(q, k, v, first, pos, scale, window)
        return out.transpose(0, 1)  # (T, H, D)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, pos: int, scale: float, window: int | None
) -> torch.Tensor:
    """q: (H, T, D) at positions [pos, pos + T); k, v: (n_kv, L, D) holding positions [first, ...)."""
    n_new = q.shape[1]
    n_keys = pos + n_new
    start = 0 if window is None else max(0, pos - window + 1)
    k = k[:, start - first : n_keys - first]  # (n_kv, keys visible to this block, D)
    v = v[:, start - first : n_keys - first]
    mask = attention_mask(pos - start, n_new, n_keys - start, window, q.device)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(0),  # (1, H, T, D)
        k.unsqueeze(0),  # (1, n_kv, L, D)
        v.unsqueeze(0),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )  # (1, H, T, D)
    return out[0]  # (H, T, D)
