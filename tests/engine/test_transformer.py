"""Our forward pass against transformers' modeling code on the same GGUF weights."""

from __future__ import annotations

import pytest
import torch

from engine.gguf_file import GGUFModelFile
from engine.kv_cache import KVCache
from engine.models.transformer import Transformer
from tests.engine.tiny_models import VOCAB, write_tiny_model

TOKENS = [5, 77, 300, 12, 250, 9, 133, 64, 201, 33, 7, 88, 190, 41]  # longer than gemma3's window of 5


def our_logits(path, tokens: list[int], chunk: int | None = None) -> torch.Tensor:
    model = Transformer.from_gguf(GGUFModelFile.open(path), cpu_weights="exact")
    c = model.config
    cache = KVCache(c.n_layers, c.n_kv_heads, c.head_dim, 64, "f32", "f32")
    chunk = chunk or len(tokens)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(tokens), chunk):
            piece = torch.tensor(tokens[start : start + chunk])
            logits, _ = model(piece, start, cache, logits_for="all")
            rows.append(logits)
    return torch.cat(rows)  # (T, vocab)


def transformers_logits(path, tokens: list[int]) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    model.eval()
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0]  # (T, vocab)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("quantized", [False, True], ids=["f32", "mixed-quant"])
def test_tiny_model_matches_transformers(tmp_path, arch, quantized):
    path = write_tiny_model(
        tmp_path / f"{arch}.gguf", arch, seed=1, quantized=quantized, with_tokenizer=False
    )
    ours = our_logits(path, TOKENS)
    ref = transformers_logits(path, TOKENS)
    assert ours.shape == ref.shape == (len(TOKENS), VOCAB)
    err = rel_err(ours, ref)
    # Both sides compute in float32 from identical dequantized weights: only summation order differs.
    assert err < 1e-4, f"{arch} logits: relative RMS error {err:.2e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1)), f"{arch}: argmax differs"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_chunked_prefill_matches_one_pass(tmp_path, arch):
    path = write_tiny_model(tmp_path / f"{arch}.gguf", arch, seed=2, quantized=True, with_tokenizer=False)
    whole = our_logits(path, TOKENS)
    for chunk in (1, 3, 7):
        chunked = our_logits(path, TOKENS, chunk=chunk)
        assert rel_err(chunked, whole) < 1e-5, f"{arch} chunk={chunk}"


def test_unsupported_architecture_is_a_readable_error(tmp_path):
    import numpy as np
    from gguf import GGMLQuantizationType as QT

    from engine.errors import ModelFileError
    from tests.engine.gguf_builders import write_gguf

    path = write_gguf(
        tmp_path / "mamba.gguf",
        "mamba",
        {"mamba.block_count": 1},
        {"token_embd.weight": (np.zeros((4, 32), np.float32), QT.F32)},
    )
    with pytest.raises(ModelFileError, match="architecture 'mamba' is not supported"):
        Transformer.from_gguf(GGUFModelFile.open(path))
