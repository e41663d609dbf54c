"""K equalization: per-channel K scales that even out the channels a 4-bit K quantizer sees.

A GGML block of 32 K channels shares one scale, set by its largest element, so a channel that is
much wider than its neighbours makes every other channel of the block coarse. Equalization divides
K, per layer, KV head and channel, by a scale s taken from the first prefill chunk (then fixed, like
the smoothing mean) before rotation and quantization, and multiplies Q by the same s before
attention: (q * s) . (k / s) = q . k, so attention is unchanged in exact arithmetic.

Each s is a power of two, so both the division and the multiplication are exact in floating point
(barring underflow): with an unquantized cache the scores are the very same numbers, and dividing
K and the smoothing mean separately, (k / s) - (mean / s), gives bit for bit (k - mean) / s, which
lets a write kernel that subtracts the mean take pre-divided inputs unchanged.

Recipe (measured, BENCHMARKS.md "K equalization"): with r_c the channel's root mean square over the first
chunk of the K it scales (after smoothing when that is on), floored at RMS_FLOOR times the head's
RMS, s_c = 2^round(ALPHA * log2(r_c / head RMS)): channels within a factor 2^(1/(2 ALPHA)) of the
head's RMS keep s = 1. ALPHA < 1 only narrows the spread: a full s = r_c made Gemma and SmolLM2
prose worse with the rotation on, the square root helped every model that needed it. A head whose
first-chunk K is all zero (one token with smoothing: K minus its own mean) gets s = 1.
"""

from __future__ import annotations

import torch

from engine.errors import SettingsError

# A channel narrower than this fraction of its head's RMS is scaled as if it had that width, so a
# channel that was (nearly) constant in the first chunk is not blown up when it moves later.
RMS_FLOOR = 1.0 / 16
ALPHA = 0.5
# recorded in snapshot fingerprints: change it whenever the scales would change
RECIPE = f"rms^{ALPHA}-pow2-floor{round(1 / RMS_FLOOR)}"
CUDA_SUPPORTED = False  # engine.cuda_kv_cache does not scale K and Q yet


def resolve_k_equalize(mode: str, k_type: str, device: str | torch.device = "cpu") -> bool:
    """auto = on for every quantized K type (q8_0, q4_0, q4_1) on the CPU cache, off for f16/bf16 K;
    on/off as given. Raises SettingsError for "on" where the cache cannot do it (the GPU cache, for now).

    Measured (BENCHMARKS.md "K equalization", rotation and smoothing on): it takes Qwen2.5-Coder-0.5B's
    q4_0/q4_0 cache from +13.6%/+35.9% perplexity on code/prose to +3.7%/+6.4%, roughly halves
    Gemma-3-270m's KL divergence from the f16 cache, and with q8_0 brings Qwen2.5-Coder-0.5B's prose
    KL from 0.0054 to 0.0002 while changing nothing measurable on the other models.
    """
    on = k_type in ("q8_0", "q4_0", "q4_1") if mode == "auto" else mode == "on"
    if on and torch.device(device).type == "cuda" and not CUDA_SUPPORTED:
        if mode == "auto":
            return False
        raise SettingsError("K equalization is not available on the GPU yet; set it to auto or off.")
    return on


def channel_scales(k: torch.Tensor) -> torch.Tensor:
    """k: (n_kv, T, D) float32, the first chunk's K as it will be stored (smoothed when smoothing
    is on) -> (n_kv, D) float32 scales, each a power of two."""
    rms = k.to(torch.float32).pow(2).mean(dim=1).sqrt()  # (n_kv, D)
    head = rms.pow(2).mean(dim=-1, keepdim=True).sqrt()  # (n_kv, 1)
    safe = torch.where(head > 0, head, torch.ones_like(head))
    width = torch.maximum(rms, head * RMS_FLOOR) / safe  # (n_kv, D) relative to the head's RMS
    scales = torch.exp2(torch.round(ALPHA * torch.log2(width)))  # (n_kv, D)
    return torch.where(head > 0, scales, torch.ones_like(scales))


def query_scales(scales: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_kv, D) K scales -> (n_heads, 1, D) multipliers for Q laid out (H, T, D) (GQA: query head h
    reads KV head h // (n_heads / n_kv))."""
    return scales.repeat_interleave(n_heads // scales.shape[0], dim=0)[:, None, :]
