"""KV-cache element types: GGML numerics on blocks of 32 along head_dim, split layout.

A `KVStore` holds one tensor (..., head_dim) in a cache type:
  f16 / bf16  qs: (..., D) in that dtype                          d, m: None
  q8_0        qs: (..., D) int8           d: (..., D/32) float16   m: None
  q4_0        qs: (..., D/2) uint8        d: (..., D/32) float16   m: None
  q4_1        qs: (..., D/2) uint8        d: (..., D/32) float16   m: (..., D/32) float16 (block min)
q4 nibbles keep GGML's order: byte j of a 32-block holds element j (low nibble) and j + 16 (high).
Quantized values equal `gguf.quants.quantize` bit for bit (`to_ggml_blocks` gives GGML's bytes).

`attend_quantized` is the plain-torch attention over such stores (dequantize, then SDPA) used on
CPU and as the oracle of the Triton attention kernels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine.errors import SettingsError

log = logging.getLogger(__name__)

QK = 32  # elements per quantization block (GGML's QK8_0 / QK4_0 / QK4_1)


@dataclass
class KVStore:
    """One tensor of shape (..., head_dim) stored in a KV cache type (see the module docstring)."""

    kv_type: str
    qs: torch.Tensor  # values / quants: (..., D) or (..., D/2)
    d: torch.Tensor | None = None  # (..., D/32) float16 block scales
    m: torch.Tensor | None = None  # (..., D/32) float16 block minimums (q4_1)

    @property
    def head_dim(self) -> int:
        return self.qs.shape[-1] * 2 if self.kv_type in ("q4_0", "q4_1") else self.qs.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.qs.shape[:-1], self.head_dim)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> KVStore:
        d = None if self.d is None else fn(self.d)
        m = None if self.m is None else fn(self.m)
        return KVStore(self.kv_type, fn(self.qs), d, m)

    def narrow(self, dim: int, start: int, length: int) -> KVStore:
        """A view of positions [start, start+length) along a leading dim (not the last)."""
        if dim < 0:
            dim += self.qs.dim()
        if dim >= self.qs.dim() - 1:
            raise ValueError("KVStore.narrow works on leading dims only")
        return self._map(lambda t: t.narrow(dim, start, length))

    def copy_(self, src: KVStore) -> KVStore:
        if src.kv_type != self.kv_type:
            raise ValueError(f"cannot copy a {src.kv_type} store into a {self.kv_type} store")
        self.qs.copy_(src.qs)
        if self.d is not None:
            self.d.copy_(src.d)
        if self.m is not None:
            self.m.copy_(src.m)
        return self

    def to(self, device: torch.device | str) -> KVStore:
        return self._map(lambda t: t.to(device))

    def shared_by(self, rows: int) -> KVStore:
        """A (1, ...) store seen as `rows` sequences sharing it: (rows, ...) views with batch stride 0."""
        if self.qs.shape[0] != 1:
            raise ValueError(f"only a one-sequence store can be shared, not {tuple(self.qs.shape)}")
        return self._map(lambda t: t.expand(rows, *t.shape[1:]))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)


# ---- quantize / dequantize (float32 arithmetic in the same order as gguf-py) ---------------------


def _blocks(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // QK, QK)  # (..., NB, 32)


def _div(x: torch.Tensor, divisor: float) -> torch.Tensor:
    # elementwise IEEE division: CUDA torch turns `x / python_scalar` into x * (1 / scalar), which
    # can differ from gguf-py's float32 division in the last bit
    return x / torch.full_like(x, divisor)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / safe)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    # roundf as gguf-py computes it: floor(|v|) + floor(2 * frac(|v|)), sign restored
    a = v.abs()
    fl = a.floor()
    return torch.sign(v) * (fl + (2 * (a - fl)).floor())


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.uint8)  # (..., NB, 32)
    packed = q[..., :16] | (q[..., 16:] << 4)  # (..., NB, 16)
    return packed.reshape(*q.shape[:-2], q.shape[-2] * 16)  # (..., D/2)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    b = qs.reshape(*qs.shape[:-1], qs.shape[-1] // 16, 16)  # (..., NB, 16)
    return torch.cat([b & 0x0F, b >> 4], dim=-1)  # (..., NB, 32) uint8


def _quantize_q8_0(x: torch.Tensor) -> KVStore:
    xb = _blocks(x)  # (..., NB, 32)
    d = _div(xb.abs().amax(dim=-1, keepdim=True), 127.0)  # (..., NB, 1)
    q = _round_half_away(xb * _inverse(d)).to(torch.int8)  # (..., NB, 32)
    return KVStore("q8_0", q.reshape(x.shape), d.squeeze(-1).to(torch.float16))


def _dequantize_q8_0(s: KVStore) -> torch.Tensor:
    qb = _blocks(s.qs)  # (..., NB, 32)
    return (qb * s.d.to(torch.float32).unsqueeze(-1)).reshape(s.shape)


def _quantize_q4_0(x: torch.Tensor) -> KVStore:
    xb = _blocks(x)  # (..., NB, 32)
    imax = xb.abs().argmax(dim=-1, keepdim=True)  # (..., NB, 1) first index of the largest |x|
    d = _div(torch.gather(xb, -1, imax), -8.0)  # (..., NB, 1)
    q = torch.trunc(xb * _inverse(d) + 8.5).clamp(0, 15)  # (..., NB, 32)
    return KVStore("q4_0", _pack_nibbles(q), d.squeeze(-1).to(torch.float16))


def _dequantize_q4_0(s: KVStore) -> torch.Tensor:
    q = _unpack_nibbles(s.qs).to(torch.float32) - 8  # (..., NB, 32)
    return (s.d.to(torch.float32).unsqueeze(-1) * q).reshape(s.shape)


def _quantize_q4_1(x: torch.Tensor) -> KVStore:
    xb = _blocks(x)  # (..., NB, 32)
    mx = xb.amax(dim=-1, keepdim=True)  # (..., NB, 1)
    mn = xb.amin(dim=-1, keepdim=True)  # (..., NB, 1)
    d = _div(mx - mn, 15.0)  # (..., NB, 1)
    q = torch.trunc((xb - mn) * _inverse(d) + 0.5).clamp(0, 15)  # (..., NB, 32)
    d16, m16 = d.squeeze(-1).to(torch.float16), mn.squeeze(-1).to(torch.float16)  # (..., NB)
    return KVStore("q4_1", _pack_nibbles(q), d16, m16)


def _dequantize_q4_1(s: KVStore) -> torch.Tensor:
    q = _unpack_nibbles(s.qs).to(torch.float32)  # (..., NB, 32)
    y = s.d.to(torch.float32).unsqueeze(-1) * q + s.m.to(torch.float32).unsqueeze(-1)  # (..., NB, 32)
    return y.reshape(s.shape)


def _float_type(name: str, dtype: torch.dtype) -> tuple[Callable, Callable]:
    return (lambda x: KVStore(name, x.to(dtype))), (lambda s: s.qs.to(torch.float32))


@dataclass(frozen=True)
class KVType:
    name: str
    block_bytes: int  # bytes per 32 elements
    quantized: bool
    code: int  # the constexpr the Triton kernels switch on
    quantize: Callable[[torch.Tensor], KVStore]
    dequantize: Callable[[KVStore], torch.Tensor]


KV_TYPES: dict[str, KVType] = {
    "f16": KVType("f16", 64, False, 0, *_float_type("f16", torch.float16)),
    "bf16": KVType("bf16", 64, False, 1, *_float_type("bf16", torch.bfloat16)),
    "q8_0": KVType("q8_0", 34, True, 2, _quantize_q8_0, _dequantize_q8_0),
    "q4_0": KVType("q4_0", 18, True, 3, _quantize_q4_0, _dequantize_q4_0),
    "q4_1": KVType("q4_1", 20, True, 4, _quantize_q4_1, _dequantize_q4_1),
}


def kv_type(name: str) -> KVType:
    try:
        return KV_TYPES[name]
    except KeyError:
        raise SettingsError(f"unknown KV cache type {name!r}; choose one of {', '.join(KV_TYPES)}") from None


def check_head_dim(name: str, head_dim: int) -> None:
    """Raise a SettingsError when a cache type cannot store vectors of this head_dim."""
    if kv_type(name).quantized and head_dim % QK:
        raise SettingsError(
            f"KV cache type {name} needs head_dim divisible by {QK}, but this model has head_dim {head_dim}; "
            "choose f16 or bf16 for the K/V cache"
        )


def kv_bytes_per_token(name: str, head_dim: int) -> int:
    """Bytes one token takes for one head's K (or V) vector; multiply by n_kv_heads * n_layers."""
    check_head_dim(name, head_dim)
    return kv_type(name).block_bytes * head_dim // QK


def quantize(x: torch.Tensor, name: str) -> KVStore:
    """x: (..., head_dim) float -> KVStore of the given type."""
    check_head_dim(name, x.shape[-1])
    return kv_type(name).quantize(x)


def dequantize(store: KVStore) -> torch.Tensor:
    """KVStore -> float32 tensor (..., head_dim)."""
    return kv_type(store.kv_type).dequantize(store)


def allocate(name: str, shape: tuple[int, ...], head_dim: int, device: torch.device | str = "cpu") -> KVStore:
    """A zero store of logical shape (*shape, head_dim), e.g. shape = (B, n_kv_heads, max_positions)."""
    check_head_dim(name, head_dim)
    if name == "f16":
        return KVStore(name, torch.zeros(*shape, head_dim, dtype=torch.float16, device=device))
    if name == "bf16":
        return KVStore(name, torch.zeros(*shape, head_dim, dtype=torch.bfloat16, device=device))
    nb = head_dim // QK
    scales = lambda: torch.zeros(*shape, nb, dtype=torch.float16, device=device)  # (..., D/32)
    if name == "q8_0":
        return KVStore(name, torch.zeros(*shape, head_dim, dtype=torch.int8, device=device), scales())
    qs = torch.zeros(*shape, head_dim // 2, dtype=torch.uint8, device=device)  # (..., D/2)
    return KVStore(name, qs, scales(), scales() if name == "q4_1" else None)


def to_ggml_blocks(store: KVStore) -> np.ndarray:
    """The store as GGML block bytes, (n_blocks, block_bytes) uint8, as gguf.quants.quantize lays them out."""
    if not kv_type(store.kv_type).quantized:
        raise ValueError("only quantized stores have GGML blocks")
    nb = store.head_dim // QK
    parts = [store.d.reshape(-1, nb, 1).cpu().view(torch.uint8)]  # (N, NB, 2)
    if store.m is not None:
        parts.append(store.m.reshape(-1, nb, 1).cpu().view(torch.uint8))  # (N, NB, 2)
    per_block = store.qs.shape[-1] // nb
    parts.append(store.qs.reshape(-1, nb, per_block).cpu().view(torch.uint8))  # (N, NB, 32 or 16)
    return torch.cat(parts, dim=-1).reshape(-1, kv_type(store.kv_type).block_bytes).numpy()


# ---- attention over stores (CPU path and oracle of the Triton kernels) ---------------------------


def attention_mask(
    start_pos: int, n_queries: int, n_keys: int, window: int | None, device: torch.device | str
) -> torch.Tensor:
    """(T, L) bool: query i (position start_pos + i) sees key j iff j <= start_pos + i and, with a
    sliding window W, j > start_pos + i - W (the W most recent positions, itself included)."""
    qpos = torch.arange(start_pos, start_pos + n_queries, device=device)[:, None]  # (T, 1)
    kpos = torch.arange(n_keys, device=device)[None, :]  # (1, L)
    mask = kpos <= qpos  # (T, L)
    if window:
        mask &= kpos > qpos - window
    return mask


def attend_quantized(
    q: torch.Tensor,
    k_store: KVStore,
    v_store: KVStore,
    start_pos: int,
    *,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of T new queries over a cache holding positions [0, start_pos + T).

    q: (B, Hq, T, D) queries at positions [start_pos, start_pos + T), already in K's basis: when K
       is stored rotated, pass `hadamard.rotate(q, rotation)` (K smoothing needs nothing on Q).
    k_store, v_store: logical shape (B, Hkv, max_positions, D); the new tokens' K/V must already be
       written at [start_pos, start_pos + T). Hq must be a multiple of Hkv (GQA).
    scale: softmax scale, default 1/sqrt(D). window: sliding window W (None or 0: full causal).
    Returns (B, Hq, T, D) in q.dtype, computed in float32.
    """
    b, hq, t, dim = q.shape
    hkv = k_store.qs.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    n_keys = start_pos + t
    k = dequantize(k_store.narrow(2, 0, n_keys))  # (B, Hkv, L, D) float32
    v = dequantize(v_store.narrow(2, 0, n_keys))  # (B, Hkv, L, D) float32
    k = k.repeat_interleave(hq // hkv, dim=1)  # (B, Hq, L, D)
    v = v.repeat_interleave(hq // hkv, dim=1)  # (B, Hq, L, D)
    mask = attention_mask(start_pos, t, n_keys, window, q.device)  # (T, L)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.to(torch.float32), k, v, attn_mask=mask, scale=scale if scale is not None else dim**-0.5
    )  # (B, Hq, T, D)
    return out.to(q.dtype)
