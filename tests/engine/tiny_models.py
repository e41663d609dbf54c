"""Tiny random GGUF models of each supported architecture, written with gguf.GGUFWriter.

Weights are random but shaped and named exactly as llama.cpp's converter writes them, so the
same file can be loaded by our engine and by transformers' GGUF loader (the oracle).
"""

from __future__ import annotations

import pathlib

import numpy as np
from gguf import GGMLQuantizationType as QT

from tests.engine.gguf_builders import random_blocks, write_gguf

VOCAB = 320
D_MODEL = 256
D_FF = 512

# fp16 super-block scale bound that gives K-quant weights a spread of about 1/sqrt(cols)
K_QUANT_SCALE = {QT.Q4_K: 2e-3, QT.Q5_K: 1e-3, QT.Q6_K: 5e-4}

ARCH_SHAPES = {
    # arch: (n_layers, n_heads, n_kv_heads, head_dim)
    "llama": (2, 4, 2, 64),
    "qwen2": (2, 4, 2, 64),
    "qwen3": (2, 4, 2, 128),  # transformers reads no key_length for qwen3: its default head_dim is 128
    "gemma3": (6, 2, 1, 256),  # head_dim 256 matches transformers' default query_pre_attn_scalar
}


def tiny_tokenizer_metadata(vocab: int = VOCAB) -> dict:
    """A byte-level BPE vocabulary: 256 byte tokens, then a few specials (no merges)."""
    from tests.engine.byte_vocab import byte_tokens

    tokens = byte_tokens()[:256] + [f"<|special_{i}|>" for i in range(vocab - 256)]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 256 + [3] * (vocab - 256),
        "tokenizer.ggml.merges": ["Ġ Ġ"],
        "tokenizer.ggml.bos_token_id": 256,
        "tokenizer.ggml.eos_token_id": 257,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": (
            "{% for m in messages %}<|special_2|>{{ m['role'] }}\n{{ m['content'] }}<|special_1|>\n"
            "{% endfor %}"
            "{% if add_generation_prompt %}<|special_2|>assistant\n{% endif %}"
        ),
    }


def write_tiny_model(
    path: pathlib.Path,
    arch: str,
    seed: int = 0,
    quantized: bool = False,
    tied: bool = False,
    sliding_window: int = 5,
    with_tokenizer: bool = True,
) -> pathlib.Path:
    n_layers, n_heads, n_kv, head_dim = ARCH_SHAPES[arch]
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int, qtype: QT = QT.F32) -> tuple[np.ndarray, QT]:
        if quantized and qtype in K_QUANT_SCALE:  # gguf-py cannot quantize these: random valid blocks
            return random_blocks(
                qtype, (rows, cols), rng, max_abs=K_QUANT_SCALE[qtype] / np.sqrt(cols)
            ), qtype
        return (
            rng.standard_normal((rows, cols)).astype(np.float32) / np.sqrt(cols),
            qtype if quantized else QT.F32,
        )

    def vec(n: int, center: float = 1.0) -> tuple[np.ndarray, QT]:
        return (center + 0.1 * rng.standard_normal(n).astype(np.float32), QT.F32)

    tensors = {"token_embd.weight": mat(VOCAB, D_MODEL, QT.Q8_0), "output_norm.weight": vec(D_MODEL)}
    if not tied:
        tensors["output.weight"] = mat(VOCAB, D_MODEL, QT.Q6_K)
    q_types = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]
    for i in range(n_layers):
        pick = lambda k, i=i: q_types[(i * 7 + k) % len(q_types)]  # noqa: E731 - vary types across tensors
        p = f"blk.{i}."
        tensors[p + "attn_norm.weight"] = vec(D_MODEL)
        tensors[p + "attn_q.weight"] = mat(n_heads * head_dim, D_MODEL, pick(0))
        tensors[p + "attn_k.weight"] = mat(n_kv * head_dim, D_MODEL, pick(1))
        tensors[p + "attn_v.weight"] = mat(n_kv * head_dim, D_MODEL, pick(2))
        tensors[p + "attn_output.weight"] = mat(D_MODEL, n_heads * head_dim, pick(3))
        tensors[p + "ffn_norm.weight"] = vec(D_MODEL)
        tensors[p + "ffn_gate.weight"] = mat(D_FF, D_MODEL, pick(4))
        tensors[p + "ffn_up.weight"] = mat(D_FF, D_MODEL, pick(5))
        tensors[p + "ffn_down.weight"] = mat(D_MODEL, D_FF, pick(6))
        if arch == "qwen2":
            for name, n in (
                ("attn_q", n_heads * head_dim),
                ("attn_k", n_kv * head_dim),
                ("attn_v", n_kv * head_dim),
            ):
                tensors[p + name + ".bias"] = vec(n, 0.0)
        if arch in ("qwen3", "gemma3"):
            tensors[p + "attn_q_norm.weight"] = vec(head_dim)
            tensors[p + "attn_k_norm.weight"] = vec(head_dim)
        if arch == "gemma3":
            tensors[p + "post_attention_norm.weight"] = vec(D_MODEL)
            tensors[p + "post_ffw_norm.weight"] = vec(D_MODEL)

    meta = {
        f"{arch}.context_length": 256,
        f"{arch}.embedding_length": D_MODEL,
        f"{arch}.block_count": n_layers,
        f"{arch}.feed_forward_length": D_FF,
        f"{arch}.attention.head_count": n_heads,
        f"{arch}.attention.head_count_kv": n_kv,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{arch}.rope.freq_base": 10000.0 if arch != "gemma3" else 1_000_000.0,
        f"{arch}.vocab_size": VOCAB,
    }
    if arch in ("qwen3", "gemma3"):
        meta[f"{arch}.attention.key_length"] = head_dim
        meta[f"{arch}.attention.value_length"] = head_dim
    if arch == "llama":
        meta[f"{arch}.rope.dimension_count"] = head_dim
    if arch == "gemma3":
        meta[f"{arch}.attention.sliding_window"] = sliding_window
    if with_tokenizer:
        meta.update(tiny_tokenizer_metadata())
    return write_gguf(path, arch, meta, tensors)
