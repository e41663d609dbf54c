"""Random-weight GGUFs from a real file's header (engine/random_gguf.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from engine import quants, random_gguf
from engine.cli import main as cli_main
from engine.errors import ModelFileError
from engine.gguf_file import GGUFModelFile
from engine.kv_cache import KVCache
from engine.models.transformer import Transformer
from tests.engine import tiny_models
from tests.engine.tiny_models import write_tiny_model


def tensor_offsets(model: GGUFModelFile) -> dict[str, int]:
    """Each tensor's data offset relative to the start of the tensor data, from the mapped views."""
    base = np.frombuffer(model._buffer, dtype=np.uint8).__array_interface__["data"][0]
    return {
        name: info.data.__array_interface__["data"][0] - base - model.data_offset
        for name, info in model.tensors.items()
    }


@pytest.fixture
def tiny_quantized(tmp_path):
    """A 2-layer qwen2 file that mixes Q4_0..Q6_K, Q8_0 embeddings, F32 norms and biases."""
    return write_tiny_model(tmp_path / "tiny.gguf", "qwen2", seed=3, quantized=True)


def test_header_file_is_the_original_header_region(tmp_path, tiny_quantized):
    header_path = tmp_path / "tiny.header.gguf"
    layout = random_gguf.write_header_file(tiny_quantized, header_path)
    original = GGUFModelFile.open(tiny_quantized)
    raw = tiny_quantized.read_bytes()
    assert header_path.read_bytes() == raw[: original.data_offset]
    assert layout.data_offset == original.data_offset
    assert layout.file_size == len(raw)
    assert [t.name for t in layout.tensors] == list(original.tensors)


def test_random_file_keeps_header_and_layout(tmp_path, tiny_quantized):
    header_path = tmp_path / "tiny.header.gguf"
    random_gguf.write_header_file(tiny_quantized, header_path)
    out = tmp_path / "random.gguf"
    random_gguf.write_random_gguf(header_path, out, seed=5)

    original, rand = GGUFModelFile.open(tiny_quantized), GGUFModelFile.open(out)
    assert out.read_bytes()[: rand.data_offset] == header_path.read_bytes()
    assert rand.file_size == original.file_size
    assert rand.metadata == original.metadata
    assert tensor_offsets(rand) == tensor_offsets(original)
    for name, info in original.tensors.items():
        other = rand.tensors[name]
        assert (other.qtype, other.shape, other.n_bytes) == (info.qtype, info.shape, info.n_bytes), name
        assert not np.array_equal(other.data, info.data), f"{name} was copied, not randomized"


def test_xz_header_file_round_trip(tmp_path, tiny_quantized):
    plain, packed = tmp_path / "h.gguf", tmp_path / "h.gguf.xz"
    random_gguf.write_header_file(tiny_quantized, plain)
    random_gguf.write_header_file(tiny_quantized, packed)
    assert packed.read_bytes().startswith(random_gguf.XZ_MAGIC)
    assert random_gguf.read_header_file(packed) == plain.read_bytes()
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    random_gguf.write_random_gguf(plain, a, seed=9)
    random_gguf.write_random_gguf(packed, b, seed=9)
    assert a.read_bytes() == b.read_bytes()


def test_same_seed_same_file_other_seed_other_data(tmp_path, tiny_quantized):
    header_path = tmp_path / "h.gguf"
    random_gguf.write_header_file(tiny_quantized, header_path)
    a, b, c = (tmp_path / f"{n}.gguf" for n in "abc")
    random_gguf.write_random_gguf(header_path, a, seed=1)
    random_gguf.write_random_gguf(header_path, b, seed=1)
    random_gguf.write_random_gguf(header_path, c, seed=2)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


@pytest.mark.parametrize("qtype", list(quants.BLOCK_TABLE), ids=lambda q: q.name)
def test_every_type_dequantizes_finite_with_row_rms_about_one_over_sqrt_k(qtype):
    block_elems, _ = quants.BLOCK_TABLE[qtype]
    cols = 4 * 256
    shape = (96, cols)
    slot = random_gguf.TensorSlot("blk.0.ffn_up.weight", qtype, shape, 0, quants.tensor_nbytes(qtype, shape))
    data = random_gguf.random_tensor_bytes(slot, seed=7)
    assert data.dtype == np.uint8 and data.shape == (slot.n_bytes,)
    w = quants.dequantize(data, qtype, shape).double()  # (96, cols)
    assert torch.isfinite(w).all()
    target = cols**-0.5
    rms = float(w.pow(2).mean().sqrt())
    assert abs(rms / target - 1) < 0.05, f"{qtype.name}: RMS {rms:.3e}, want {target:.3e}"
    row_rms = w.pow(2).mean(dim=1).sqrt() / target  # (96,)
    assert float(row_rms.min()) > 0.5 and float(row_rms.max()) < 1.6, qtype.name  # K-quants vary most
    # Mean about 0: Q4_0/Q5_0/Q8_0/Q3_K/Q6_K codes are centred on -0.5 (Q4_0: 0.107 RMS, the most).
    assert abs(float(w.mean())) < 0.15 * target, f"{qtype.name}: mean {float(w.mean()):.2e}"
    if qtype in random_gguf._RECIPES:  # scales vary from block to block, not one constant
        scales = data.reshape(-1, quants.BLOCK_TABLE[qtype][1])
        offset = random_gguf._RECIPES[qtype].d_offset
        d = scales[:, offset : offset + 2].copy().view(np.float16)
        assert np.isfinite(d).all() and len(np.unique(d)) > 10


def test_float_vectors_norms_biases_and_rope_factors():
    def values(name: str, qtype: QT = QT.F32) -> np.ndarray:
        slot = random_gguf.TensorSlot(name, qtype, (512,), 0, quants.tensor_nbytes(qtype, (512,)))
        return quants.dequantize(random_gguf.random_tensor_bytes(slot), qtype, (512,)).numpy()

    norm = values("blk.3.attn_norm.weight")
    assert abs(norm.mean() - 1) < 0.02 and 0.02 < norm.std() < 0.1
    bias = values("blk.3.attn_q.bias", QT.BF16)
    assert abs(bias.mean()) < 0.01 and 0.01 < bias.std() < 0.04
    assert (values("rope_freqs.weight") == 1).all()


def test_random_model_runs_with_finite_logits(tmp_path, tiny_quantized):
    header_path = tmp_path / "h.gguf"
    random_gguf.write_header_file(tiny_quantized, header_path)
    out = tmp_path / "random.gguf"
    random_gguf.write_random_gguf(header_path, out)
    logits, _ = forward(out, [5, 77, 300, 12, 250, 9])
    assert torch.isfinite(logits).all()


def forward(path, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (T, vocab), the residual stream after the last layer (T, d_model))."""
    model = Transformer.from_gguf(GGUFModelFile.open(path), cpu_weights="exact")
    c = model.config
    cache = KVCache(c.n_layers, c.n_kv_heads, c.head_dim, 64, "f32", "f32")
    with torch.inference_mode():
        logits, captured = model(
            torch.tensor(tokens), 0, cache, logits_for="all", capture_layers=(c.n_layers - 1,)
        )
    return logits, captured[0]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])  # gemma3: embedding scale, four norms per layer
def test_28_layer_random_model_keeps_activations_in_range(tmp_path, monkeypatch, arch):
    """A real-depth model (28 layers, like Qwen2.5-1.5B): logits stay finite and of order 1."""
    _, heads, kv_heads, head_dim = tiny_models.ARCH_SHAPES[arch]
    monkeypatch.setitem(tiny_models.ARCH_SHAPES, arch, (28, heads, kv_heads, head_dim))
    source = write_tiny_model(tmp_path / "deep.gguf", arch, quantized=True, with_tokenizer=False)
    header_path = tmp_path / "deep.header.gguf"
    random_gguf.write_header_file(source, header_path)
    out = tmp_path / "deep-random.gguf"
    random_gguf.write_random_gguf(header_path, out, seed=11)
    assert GGUFModelFile.open(out).arch_get("block_count") == 28
    logits, residual = forward(out, [5, 77, 300, 12, 250, 9, 133, 64])
    assert torch.isfinite(logits).all() and torch.isfinite(residual).all()
    # Each layer adds about unit RMS to the residual stream: ~sqrt(28) after 28 (6-7 measured).
    rms = float(residual.pow(2).mean().sqrt())
    assert 1 < rms < 30, f"{arch}: residual RMS {rms:.3g} after 28 random layers"
    std = float(logits.std())
    assert 0.3 < std < 3, f"{arch}: logits std {std:.3g}"  # output rows have RMS 1/sqrt(d_model)


def test_cli_writes_header_and_random_file(tmp_path, tiny_quantized):
    header_path, out = tmp_path / "h.gguf", tmp_path / "r.gguf"
    assert cli_main(["gguf-header", "--model", str(tiny_quantized), "--out", str(header_path)]) == 0
    assert cli_main(["random-gguf", "--header", str(header_path), "--out", str(out), "--seed", "3"]) == 0
    assert out.read_bytes()[: len(header_path.read_bytes())] == header_path.read_bytes()
    assert out.stat().st_size == tiny_quantized.stat().st_size


def test_a_whole_model_file_is_not_a_header_file(tmp_path, tiny_quantized):
    with pytest.raises(ModelFileError, match="not a header file"):
        random_gguf.write_random_gguf(tiny_quantized, tmp_path / "x.gguf")
    with pytest.raises(ModelFileError, match="not a whole GGUF header"):
        header = random_gguf.read_header_bytes(tiny_quantized)
        random_gguf.parse_header(header[: len(header) // 2])


def test_real_header_layout_matches_the_real_file(qwen_05b_path):
    layout = random_gguf.parse_header(random_gguf.read_header_bytes(qwen_05b_path))
    real = GGUFModelFile.open(qwen_05b_path)
    assert layout.file_size == qwen_05b_path.stat().st_size
    offsets = tensor_offsets(real)
    assert {t.name: t.offset for t in layout.tensors} == offsets
    assert {t.name: t.qtype for t in layout.tensors} == {n: i.qtype for n, i in real.tensors.items()}


def test_llama_cpp_loads_the_random_file_and_agrees(tmp_path, tiny_quantized):
    """llama.cpp (an independent reader) runs the random file; its logits are finite and close to ours."""
    llama_cpp = pytest.importorskip("llama_cpp")
    header_path, out = tmp_path / "h.gguf", tmp_path / "r.gguf"
    random_gguf.write_header_file(tiny_quantized, header_path)
    random_gguf.write_random_gguf(header_path, out, seed=4)
    tokens = [5, 77, 300, 12, 250, 9]
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    llm.eval(tokens)
    theirs = torch.tensor(np.array(llm.scores[: len(tokens)]))  # (T, vocab)
    ours, _ = forward(out, tokens)
    assert torch.isfinite(theirs).all()
    err = float((ours - theirs).norm() / theirs.norm())
    assert err < 0.05, f"relative RMS difference to llama.cpp {err:.3g}"  # its 8-bit activations
