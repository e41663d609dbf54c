"""Model hyper-parameters read from GGUF metadata (one dataclass, built by `from_gguf`)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ModelFileError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")

# Gemma 3: five sliding-window layers, then one global layer; local layers use base 10k RoPE.
GEMMA3_SWA_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10_000.0


@dataclass
class ModelConfig:
    architecture: str
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    rope_base: float
    rope_dim: int
    rope_neox: bool  # rotate halves (qwen2/qwen3/gemma3) instead of adjacent pairs (llama GGUFs)
    rope_local_base: float  # RoPE base of sliding-window layers (gemma3); else = rope_base
    rope_scale: float  # linear position scaling (1.0 = none)
    context_length: int  # training context
    attn_scale: float  # multiplier of Q.K
    sliding_window: int | None  # None = every layer global
    swa_pattern: int  # layer i is sliding when sliding_window and (i % swa_pattern) < swa_pattern - 1
    embed_scale: float  # multiplier of the token embedding (gemma: sqrt(d_model))
    activation: str  # "silu" | "gelu_tanh"

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and (layer % self.swa_pattern) < self.swa_pattern - 1

    @classmethod
    def from_gguf(cls, gguf_file) -> ModelConfig:
        arch = gguf_file.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelFileError(
                f"{gguf_file.path.name}: architecture '{arch}' is not supported yet "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}). Open a model of a supported family."
            )

        def need(suffix: str) -> object:
            value = gguf_file.arch_get(suffix)
            if value is None:
                raise ModelFileError(
                    f"{gguf_file.path.name}: metadata '{arch}.{suffix}' is missing; the file is incomplete."
                )
            return value

        d_model = int(need("embedding_length"))
        n_heads = int(need("attention.head_count"))
        n_kv_heads = int(gguf_file.arch_get("attention.head_count_kv", n_heads))
        head_dim = int(gguf_file.arch_get("attention.key_length", d_model // max(n_heads, 1)))
        tokens = gguf_file.get("tokenizer.ggml.tokens")
        embd = gguf_file.tensors.get("token_embd.weight")
        vocab = int(
            gguf_file.arch_get("vocab_size", len(tokens) if tokens else (embd.shape[0] if embd else 0))
        )
        is_gemma = arch == "gemma3"
        rope_base = float(gguf_file.arch_get("rope.freq_base", 10_000.0))
        scaling_type = gguf_file.arch_get("rope.scaling.type", "none")
        rope_scale = (
            float(gguf_file.arch_get("rope.scaling.factor", 1.0)) if scaling_type == "linear" else 1.0
        )
        if is_gemma and gguf_file.arch_get("rope.scaling.factor") is not None:
            rope_scale = float(gguf_file.arch_get("rope.scaling.factor"))
        window = gguf_file.arch_get("attention.sliding_window") if is_gemma else None
        config = cls(
            architecture=arch,
            n_layers=int(need("block_count")),
            d_model=d_model,
            d_ff=int(need("feed_forward_length")),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            vocab_size=vocab,
            norm_eps=float(gguf_file.arch_get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_base=rope_base,
            rope_dim=int(gguf_file.arch_get("rope.dimension_count", head_dim)),
            rope_neox=arch != "llama",
            rope_local_base=GEMMA3_LOCAL_ROPE_BASE if is_gemma else rope_base,
            rope_scale=rope_scale,
            context_length=int(gguf_file.arch_get("context_length", 4096)),
            attn_scale=head_dim**-0.5,
            sliding_window=int(window) if window else None,
            swa_pattern=GEMMA3_SWA_PATTERN if is_gemma else 1,
            embed_scale=d_model**0.5 if is_gemma else 1.0,
            activation="gelu_tanh" if is_gemma else "silu",
        )
        config.check()
        return config

    def check(self) -> None:
        """Reject counts that would make the model nonsensical or allocate absurd memory."""
        problems = []
        if not 1 <= self.n_layers <= 1024:
            problems.append(f"{self.n_layers} layers")
        if not 1 <= self.n_heads <= 1024 or not 1 <= self.n_kv_heads <= self.n_heads:
            problems.append(f"{self.n_heads} heads / {self.n_kv_heads} KV heads")
        if self.n_heads % self.n_kv_heads:
            problems.append("head count not a multiple of the KV head count")
        if not 1 <= self.head_dim <= 1024 or self.rope_dim > self.head_dim or self.rope_dim % 2:
            problems.append(f"head size {self.head_dim} / RoPE size {self.rope_dim}")
        if not 1 <= self.d_model <= 1 << 16 or not 1 <= self.d_ff <= 1 << 18:
            problems.append(f"widths {self.d_model}/{self.d_ff}")
        if not 1 <= self.vocab_size <= 1 << 22:
            problems.append(f"vocabulary of {self.vocab_size}")
        if problems:
            raise ModelFileError(
                f"The model's metadata is inconsistent ({'; '.join(problems)}); the file is damaged."
            )
