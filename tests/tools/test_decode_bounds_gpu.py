"""tests/tools/decode_bounds_gpu.py's kernel skipping, on a tiny model's CUDA path built on the CPU (the
timing itself needs a GPU): every variant's step runs with the replacements' signatures, and they are
undone."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.engine.test_cuda_engine import fast_qmatmul  # noqa: E402, F401  (a fixture)
from tests.tools.decode_bounds_gpu import KINDS, VARIANTS, Skips  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="builds the model on CPU tensors for the interpreter")
def test_each_variant_steps_and_everything_is_restored(tmp_path, fast_qmatmul):  # noqa: F811
    import kernels.layer_ops as lo
    from engine.cuda_kv_cache import CudaKVCache
    from engine.gguf_file import GGUFModelFile
    from engine.kv_cache import resolve_k_smooth
    from engine.models.cuda_transformer import CudaTransformer
    from tests.engine.tiny_models import write_tiny_model

    path = write_tiny_model(tmp_path / "m.gguf", "qwen2", seed=3, quantized=True)
    model = CudaTransformer.from_gguf(GGUFModelFile.open(path), device="cpu")
    c = model.config
    cache = CudaKVCache(c.n_layers, c.n_kv_heads, c.head_dim, 32, "f16", "f16", device="cpu",
                        k_smooth=resolve_k_smooth("auto", "f16"))
    real = (lo.add_rms_norm, lo.gated_activation, cache.attend_rows, cache.rope_write_rows,
            model.lm_head.matmul)
    skips = Skips(model, cache)
    assert set(kind for kinds in VARIANTS.values() for kind in kinds) == set(KINDS)
    with torch.inference_mode():
        model(torch.arange(40, 60), 0, cache, logits_for="none")  # 20 rows: the chunk path, statistics set
        full = model.step([7], 20, cache).logits.clone()
        for kinds in VARIANTS.values():
            skips.apply(kinds)
            assert model.step([7], 20, cache).logits.shape == (1, c.vocab_size)
        skips.apply(())
        assert torch.equal(model.step([7], 20, cache).logits, full)
    assert (lo.add_rms_norm, lo.gated_activation, cache.attend_rows, cache.rope_write_rows,
            model.lm_head.matmul) == real
