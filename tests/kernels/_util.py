"""Helpers shared by the kernel tests: device choice, GPU marks, random stores, relative RMS."""

from __future__ import annotations

import pytest
import torch

from engine import kv_quant
from engine.kv_quant import KVStore

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
KV_TYPES = ["f16", "bf16", "q8_0", "q4_0", "q4_1"]
QUANT_TYPES = ["q8_0", "q4_0", "q4_1"]


def gpu(test):
    """Mark a real-shape test: `gpu` marker, skipped when there is no CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")(test))


def rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).pow(2).mean() / want.pow(2).mean().clamp_min(1e-30)).sqrt().item()


def assert_close_rms(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = rel_rms(got, want)
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > {tol:.1e}"


def random_store(kv_type: str, shape: tuple[int, ...], head_dim: int, gen: torch.Generator,
                 scale: float = 1.0) -> KVStore:
    """A (B, H, P) store filled by quantizing random normal rows (with a few outlier channels)."""
    x = torch.randn(*shape, head_dim, generator=gen) * scale  # (B, H, P, D)
    x[..., 3] *= 8.0  # an outlier channel, as real K has
    store = kv_quant.allocate(kv_type, shape, head_dim)
    store.copy_(kv_quant.quantize(x, kv_type))
    return store.to(DEVICE)


def random_sinks(bsz: int, hkv: int, dim: int, gen: torch.Generator, n_sink: int = 4) -> torch.Tensor:
    """(B, Hkv, S, D) float16 attention-sink copies, unlike what random stores hold (so they must matter)."""
    return (3.0 * torch.randn(bsz, hkv, n_sink, dim, generator=gen)).to(torch.float16).to(DEVICE)


def assert_stores_equal(got: KVStore, want: KVStore) -> None:
    for field in ("qs", "d", "m"):
        a, b = getattr(got, field), getattr(want, field)
        if a is None:
            assert b is None
            continue
        a, b = a.cpu(), b.cpu()
        n_bad = (a.view(torch.uint8) != b.view(torch.uint8)).sum().item()
        assert n_bad == 0, f"store.{field}: {n_bad} of {a.numel()} elements differ from the reference"
