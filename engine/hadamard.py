"""Randomised Walsh–Hadamard rotation of K (and Q) for the quantized KV cache.

Per group of G = min(128, head_dim) elements:  y = s2 * H_G(s1 * x) / sqrt(G), with H_G the
(Sylvester-ordered) Walsh–Hadamard matrix and s1, s2 fixed +-1 vectors drawn from a fixed seed.
The map is orthonormal, so rotating Q and K the same way leaves Q.K unchanged while an outlier
channel of K is spread over the whole group before quantization.

`fwht` uses the constant-shape "perfect shuffle" form of the butterfly (each of the log2(G) stages
maps x -> [x[0::2] + x[1::2], x[0::2] - x[1::2]]). The Triton K-write kernel runs the very same
sequence of fp32 additions, so its rotated values are bit-identical to `rotate` here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from engine.errors import SettingsError

log = logging.getLogger(__name__)

ROTATION_SEED = 0x7A4D5EED  # fixed; recorded in snapshots together with the group size
MAX_ROTATION_GROUP = 128


def rotation_group(head_dim: int) -> int:
    """The group size G = min(128, head_dim); it must be a power of two dividing head_dim."""
    group = min(MAX_ROTATION_GROUP, head_dim)
    if group < 2 or group & (group - 1) or head_dim % group:
        raise SettingsError(
            f"head_dim {head_dim} cannot be WHT-rotated (needs min(128, head_dim) to be a power of two "
            "dividing head_dim); choose an f16/bf16 K cache type for this model"
        )
    return group


@dataclass(frozen=True)
class Rotation:
    """The fixed rotation of one head_dim: group size, seed and the two sign vectors."""

    head_dim: int
    group: int
    seed: int
    s1: torch.Tensor  # (G,) float32, entries +-1
    s2: torch.Tensor  # (G,) float32, entries +-1

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.group)

    def to(self, device: torch.device | str) -> Rotation:
        return Rotation(self.head_dim, self.group, self.seed, self.s1.to(device), self.s2.to(device))


def make_rotation(head_dim: int, seed: int = ROTATION_SEED) -> Rotation:
    """Sign vectors from a CPU generator seeded with `seed` (deterministic on every platform)."""
    group = rotation_group(head_dim)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bits = torch.randint(0, 2, (2, group), generator=gen)  # (2, G)
    signs = (bits * 2 - 1).to(torch.float32)  # (2, G)
    return Rotation(head_dim, group, seed, signs[0].contiguous(), signs[1].contiguous())


def k_rotation_for(k_type: str, head_dim: int, skip_wht: bool) -> Rotation | None:
    """DESIGN.md's rule: quantized K is rotated, except q4_0 K with skip-WHT; f16/bf16 K never is."""
    if k_type in ("f16", "bf16") or (k_type == "q4_0" and skip_wht):
        return None
    return make_rotation(head_dim)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform along the last dim (a power of two): x @ H_G."""
    g = x.shape[-1]
    if g & (g - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {g}")
    for _ in range(g.bit_length() - 1):
        pairs = x.reshape(*x.shape[:-1], g // 2, 2)  # (..., G/2, 2)
        x = torch.cat([pairs[..., 0] + pairs[..., 1], pairs[..., 0] - pairs[..., 1]], dim=-1)  # (..., G)
    return x


def _grouped(x: torch.Tensor, rot: Rotation) -> torch.Tensor:
    if x.shape[-1] != rot.head_dim:
        raise ValueError(f"last dim {x.shape[-1]} does not match the rotation's head_dim {rot.head_dim}")
    return x.to(torch.float32).reshape(*x.shape[:-1], rot.head_dim // rot.group, rot.group)  # (..., D/G, G)


def rotate(x: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """y = s2 * H(s1 * x) / sqrt(G) per group; returns float32 of x's shape (..., head_dim)."""
    s1, s2 = rot.s1.to(x.device), rot.s2.to(x.device)
    scale = torch.tensor(rot.scale, dtype=torch.float32, device=x.device)
    y = fwht(_grouped(x, rot) * s1) * s2 * scale  # (..., D/G, G)
    return y.reshape(x.shape)


def unrotate(y: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """Inverse of `rotate` (its transpose): x = s1 * H(s2 * y) / sqrt(G)."""
    s1, s2 = rot.s1.to(y.device), rot.s2.to(y.device)
    scale = torch.tensor(rot.scale, dtype=torch.float32, device=y.device)
    x = fwht(_grouped(y, rot) * s2) * s1 * scale  # (..., D/G, G)
    return x.reshape(y.shape)
