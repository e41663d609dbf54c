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

Recipe (measured: docs/kv-quality-run.md, runs 2 and 3): after a rotation the 4-bit error of a key is
spread evenly over its channels and scales with the key's norm, so the error of one score q . k
grows like sum_c q_c^2 s_c^2 times sum_c k_c^2 / s_c^2, which is smallest at s_c^2 = rms_k,c / rms_q,c
(Cauchy-Schwarz). So with r_c the channel's root mean square over the first chunk, for the K it
scales (after smoothing when that is on) and for the queries of the KV head's GQA group, each
relative to its head's RMS and floored at RMS_FLOOR of it,
s_c = 2^round(ALPHA * log2(width_k,c / width_q,c)), ALPHA = 1/2. A K-only variant (the queries
ignored, run 2's recipe) remains for a first chunk written without its queries. A head whose
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
RECIPE = f"(rms_k/rms_q)^{ALPHA}-pow2-floor{round(1 / RMS_FLOOR)}"
CUDA_SUPPORTED = True  # engine.cuda_kv_cache scales K (kernels.k_write) and Q (kernels.layer_ops.rope_heads)


def resolve_k_equalize(mode: str, k_type: str, device: str | torch.device = "cpu") -> bool:
    """auto = on for every quantized K type (q8_0, q4_0, q4_1), off for f16/bf16 K, on the CPU and the
    GPU cache alike; on/off as given. Were CUDA_SUPPORTED turned off, auto would be off on CUDA and "on"
    a SettingsError.

    Measured (BENCHMARKS.md "K equalization", rotation and smoothing on): it takes Qwen2.5-Coder-0.5B's
    q4_0/q4_0 cache from +13.6%/+35.9% perplexity on code/prose to +3.7%/+6.4%, roughly halves
    Gemma-3-270m's KL divergence from the f16 cache, and with q8_0 brings Qwen2.5-Coder-0.5B's prose
    KL from 0.0054 to 0.0002 while changing nothing measurable on the other models (run 2, K-only
    scales). Run 3's scales from K and Q lower the q4_0/q4_0 KL further on all four default models
    (docs/kv-quality-run.md, "run 3"; e.g. SmolLM2 prose 0.0696 -> 0.0580 before the attention sinks).
    """
    on = k_type in ("q8_0", "q4_0", "q4_1") if mode == "auto" else mode == "on"
    if on and torch.device(device).type == "cuda" and not CUDA_SUPPORTED:
        if mode == "auto":
            return False
        raise SettingsError("K equalization is not available on the GPU yet; set it to auto or off.")
    return on


def _relative_widths(rms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rms: (n_kv, D) channel RMS -> (widths relative to the head's RMS, floored; (n_kv, 1) head RMS > 0)."""
    head = rms.pow(2).mean(dim=-1, keepdim=True).sqrt()  # (n_kv, 1)
    safe = torch.where(head > 0, head, torch.ones_like(head))
    return torch.maximum(rms, head * RMS_FLOOR) / safe, head > 0


def channel_scales(k: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
    """k: (n_kv, T, D) the first chunk's K as it will be stored (smoothed when smoothing is on);
    q: (H, T, D) its queries (H a multiple of n_kv, query head h reads KV head h // (H / n_kv)),
    or None for the K-only recipe -> (n_kv, D) float32 scales, each a power of two."""
    n_kv, _, dim = k.shape
    k_width, k_live = _relative_widths(k.to(torch.float32).pow(2).mean(dim=1).sqrt())  # (n_kv, D)
    width, live = k_width, k_live
    if q is not None:
        group = q.to(torch.float32).reshape(n_kv, q.shape[0] // n_kv, -1, dim)  # (n_kv, H/n_kv, T, D)
        q_width, q_live = _relative_widths(group.pow(2).mean(dim=(1, 2)).sqrt())  # (n_kv, D)
        width, live = k_width / q_width, k_live & q_live
    scales = torch.exp2(torch.round(ALPHA * torch.log2(width)))  # (n_kv, D)
    return torch.where(live, scales, torch.ones_like(scales))


def query_scales(scales: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_kv, D) K scales -> (n_heads, 1, D) multipliers for Q laid out (H, T, D) (GQA: query head h
    reads KV head h // (n_heads / n_kv))."""
    return scales.repeat_interleave(n_heads // scales.shape[0], dim=0)[:, None, :]
