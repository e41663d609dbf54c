"""tests/tools/tune_decode_gpu.py's variant switching, on a tiny model's CUDA-path layers built on the CPU
(the timing itself needs a GPU)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.tools.tune_decode_gpu import SETS, Variants, _groups  # noqa: E402


def _tiny_model(tmp_path):
    from engine.gguf_file import GGUFModelFile
    from engine.models.cuda_transformer import CudaTransformer
    from tests.engine.tiny_models import write_tiny_model

    path = write_tiny_model(tmp_path / "m.gguf", "qwen2", seed=3, quantized=True)
    return CudaTransformer.from_gguf(GGUFModelFile.open(path), device="cpu")


def test_variants_change_launches_and_weights_and_undo_them(tmp_path):
    import kernels.layer_ops as lo

    model = _tiny_model(tmp_path)
    groups = _groups(model)
    linears = [lin for group in groups.values() for lin in group]
    weights = [lin.weight for lin in linears]
    configs = [w.gemv_config for w in weights]
    rules = (lo.norm_warps, lo.activation_block)
    switch = Variants(model)

    switch.apply({"gemv": {"gu": dict(programs_per_sm=12, num_warps=2)}, "norm_warps": lambda block: 4})
    assert all(lin.weight.gemv_config.num_warps == 2 for lin in groups["gu"])
    assert lo.norm_warps(2048) == 4
    switch.apply({})
    assert [lin.weight for lin in linears] == weights
    assert [w.gemv_config for w in weights] == configs
    assert (lo.norm_warps, lo.activation_block) == rules

    prescaled = [lin for lin in linears if lin.weight.prescaled]
    assert prescaled, "the tiny model has Q4_K weights with precomputed scales"
    switch.apply(SETS["q4k-scales"]["per K-tile"])
    assert all(not lin.weight.prescaled and lin.weight.gemv_config == w.gemv_config
               for lin, w in zip(linears, weights, strict=True) if w.prescaled)
    assert all(torch.equal(lin.weight.dequantize(), w.dequantize())
               for lin, w in zip(linears, weights, strict=True))
    switch.apply({})
    assert [lin.weight for lin in linears] == weights
    assert prescaled == [lin for lin in linears if lin.weight.prescaled]


def test_every_set_starts_with_the_defaults():
    for variants in SETS.values():
        assert next(iter(variants.values())) == {}
