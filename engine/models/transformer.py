"""The decoder-only transformer behind every supported GGUF architecture.

One file, read top to bottom. The families differ only in a few switches, all carried by
ModelConfig and by which tensors the GGUF has:
- llama  (SmolLM2, Llama 3): adjacent-pair RoPE (GGUF permutes Q/K for it), optional rope_freqs.
- qwen2  (Qwen2.5): biases on Q, K, V.
- qwen3:  RMSNorm over each head of Q and K before RoPE.
- gemma3: embedding scaled by sqrt(d_model), Q/K norms, norms after attention and FFN as well as
          before ("sandwich"), GELU(tanh), 5 sliding-window layers (local RoPE base) per global one.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.errors import ModelFileError
from engine.linear import make_linear
from engine.lm_head import make_lm_head
from engine.quants import dequantize, dequantize_rows

log = logging.getLogger(__name__)

# EngineConfig.cpu_weights -> engine.linear mode. "fast": 4-bit weights repacked for torch's int4 kernel with
# bf16 activations (1.2 GB instead of 6.2 GB for Qwen2.5-1.5B, 1.6-1.8x faster decode, ~3e-3 relative
# error per layer; the LM head's near-top logits re-scored in float32, engine/lm_head.py); "exact": weights
# dequantized to float32, bit-exact with gguf-py (the oracle tests).
CPU_WEIGHT_MODES = {"fast": "int4-bf16", "exact": "dense"}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., D), weight: (D,)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_tables(
    positions: torch.Tensor, rope_dim: int, base: float, scale: float, freq_factors: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (T, rope_dim // 2) for integer positions (T,)."""
    inv_freq = base ** (
        -torch.arange(0, rope_dim, 2, dtype=torch.float32, device=positions.device) / rope_dim
    )
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors
    angles = (positions.to(torch.float32) / scale)[:, None] * inv_freq[None, :]  # (T, rope_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """x: (T, H, D); rotates the first rope_dim = 2 * cos.shape[-1] channels of each head."""
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, half)
    if neox:  # pairs (i, i + half)
        a, b = rot[..., :half], rot[..., half:]
        rotated = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    else:  # pairs (2i, 2i + 1)
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated


class Layer(torch.nn.Module):
    def __init__(self, config: ModelConfig, index: int, weights: dict, device: str, linear_mode: str) -> None:
        super().__init__()
        self.config, self.index = config, index
        self.sliding = config.is_sliding(index)
        self.window = config.sliding_window if self.sliding else None
        self.rope_base = config.rope_local_base if self.sliding else config.rope_base

        def vector(name: str) -> torch.Tensor | None:
            info = weights.get(f"blk.{index}.{name}")
            return None if info is None else dequantize(info.data, info.qtype, info.shape).to(device)

        def linear(name: str, required: bool = True) -> torch.nn.Module | None:
            info = weights.get(f"blk.{index}.{name}.weight")
            if info is None:
                if required:
                    raise ModelFileError(
                        f"Tensor blk.{index}.{name}.weight is missing; the model file is incomplete."
                    )
                return None
            return make_linear(info, vector(f"{name}.bias"), device=device, mode=linear_mode)

        self.attn_norm = vector("attn_norm.weight")
        self.wq, self.wk, self.wv, self.wo = (
            linear(n) for n in ("attn_q", "attn_k", "attn_v", "attn_output")
        )
        self.q_norm, self.k_norm = vector("attn_q_norm.weight"), vector("attn_k_norm.weight")
        self.post_attn_norm = vector("post_attention_norm.weight")
        self.ffn_norm = vector("ffn_norm.weight")
        self.w_gate, self.w_up, self.w_down = (linear(n) for n in ("ffn_gate", "ffn_up", "ffn_down"))
        self.post_ffn_norm = vector("post_ffw_norm.weight")
        if self.attn_norm is None or self.ffn_norm is None:
            raise ModelFileError(f"Layer {index} lacks its norm weights; the model file is incomplete.")

    def forward(
        self, x: torch.Tensor, pos: int, cache, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """x: (T, d_model) at positions [pos, pos + T)."""
        c = self.config
        n_new = x.shape[0]
        h = rms_norm(x, self.attn_norm, c.norm_eps)  # (T, d_model)
        q = self.wq(h).view(n_new, c.n_heads, c.head_dim)  # (T, H, Dh)
        k = self.wk(h).view(n_new, c.n_kv_heads, c.head_dim)  # (T, Hkv, Dh)
        v = self.wv(h).view(n_new, c.n_kv_heads, c.head_dim)  # (T, Hkv, Dh)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, c.norm_eps)
            k = rms_norm(k, self.k_norm, c.norm_eps)
        cos, sin = rope
        q = apply_rope(q, cos, sin, c.rope_neox)
        k = apply_rope(k, cos, sin, c.rope_neox)
        cache.write(self.index, pos, k, v)
        attn = cache.attention(self.index, q, pos, c.attn_scale, self.window)  # (T, H, Dh)
        attn = self.wo(attn.reshape(n_new, c.n_heads * c.head_dim))  # (T, d_model)
        if self.post_attn_norm is not None:
            attn = rms_norm(attn, self.post_attn_norm, c.norm_eps)
        x = x + attn
        h = rms_norm(x, self.ffn_norm, c.norm_eps)
        gate = self.w_gate(h)  # (T, d_ff)
        gate = F.gelu(gate, approximate="tanh") if c.activation == "gelu_tanh" else F.silu(gate)
        ffn = self.w_down(gate * self.w_up(h))  # (T, d_model)
        if self.post_ffn_norm is not None:
            ffn = rms_norm(ffn, self.post_ffn_norm, c.norm_eps)
        return x + ffn


class Transformer(torch.nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        weights: dict,
        device: str = "cpu",
        progress=None,
        cpu_weights: str = "fast",
    ) -> None:
        super().__init__()
        self.config, self.device = config, device
        if "token_embd.weight" not in weights:
            raise ModelFileError("Tensor token_embd.weight is missing; the model file is incomplete.")
        self.embedding = weights["token_embd.weight"]  # stays quantized; rows dequantized on lookup
        layers = []
        for i in range(config.n_layers):
            layers.append(Layer(config, i, weights, device, CPU_WEIGHT_MODES[cpu_weights]))
            if progress:
                progress("Loading layers", (i + 1) / (config.n_layers + 1))
        self.layers = torch.nn.ModuleList(layers)
        norm = weights.get("output_norm.weight")
        if norm is None:
            raise ModelFileError("Tensor output_norm.weight is missing; the model file is incomplete.")
        self.output_norm = dequantize(norm.data, norm.qtype, norm.shape).to(device)
        self.lm_head = make_lm_head(
            weights.get("output.weight", self.embedding), device=device, mode=CPU_WEIGHT_MODES[cpu_weights]
        )  # tied to the embedding if absent
        factors = weights.get("rope_freqs.weight")
        self.rope_freq_factors = (
            None if factors is None else dequantize(factors.data, factors.qtype, factors.shape)
        )

    @classmethod
    def from_gguf(
        cls, gguf_file, device: str = "cpu", progress=None, cpu_weights: str = "fast"
    ) -> Transformer:
        """The model on `device`: this module on CPU, engine.models.cuda_transformer on CUDA (the same
        interface; cpu_weights does not apply there)."""
        if torch.device(device).type == "cuda":
            from engine.models.cuda_transformer import CudaTransformer

            return CudaTransformer.from_gguf(gguf_file, device, progress)
        config = ModelConfig.from_gguf(gguf_file)
        return cls(config, gguf_file.tensors, device, progress, cpu_weights)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (T,) int64 -> (T, d_model) float32."""
        if int(tokens.max()) >= self.config.vocab_size or int(tokens.min()) < 0:
            raise ValueError("token id outside the vocabulary")
        x = dequantize_rows(self.embedding, tokens.cpu()).to(self.device)  # (T, d_model)
        return x * self.config.embed_scale if self.config.embed_scale != 1.0 else x

    def forward(
        self,
        tokens: torch.Tensor,
        pos: int,
        cache,
        logits_for: str = "last",
        capture_layers: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Run tokens (T,) at positions [pos, pos + T) through the model, writing the cache.

        logits_for: "last" -> (1, vocab) for the final row only, "all" -> (T, vocab), "none" -> None.
        capture_layers: layer indices whose outputs (T, d_model) are returned (DFlash drafts).
        """
        c = self.config
        x = self.embed(tokens)  # (T, d_model)
        positions = torch.arange(pos, pos + x.shape[0], device=self.device)
        tables = {}
        captured = []
        for layer in self.layers:
            if layer.rope_base not in tables:
                tables[layer.rope_base] = rope_tables(
                    positions, c.rope_dim, layer.rope_base, c.rope_scale, self.rope_freq_factors
                )
            x = layer(x, pos, cache, tables[layer.rope_base])
            if layer.index in capture_layers:
                captured.append(x)
        if logits_for == "none":
            return None, captured
        rows = x[-1:] if logits_for == "last" else x  # (1 or T, d_model)
        logits = self.lm_head(rms_norm(rows, self.output_norm, c.norm_eps))  # (rows, vocab)
        return logits, captured
