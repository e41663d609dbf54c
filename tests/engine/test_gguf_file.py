"""engine.gguf_file: valid files read like gguf.GGUFReader reads them; damaged files raise ModelFileError."""

from __future__ import annotations

import hashlib
import os
import pathlib
import time
import tracemalloc

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from engine.errors import ModelFileError, TandemError
from engine.gguf_file import GGUFModelFile
from tests.engine import gguf_builders as gb
from tests.engine.test_quants import REAL_MODELS


@pytest.fixture
def sample(tmp_path: pathlib.Path) -> pathlib.Path:
    return gb.write_sample_gguf(tmp_path / "sample.gguf")


def assert_matches_reader(model: GGUFModelFile, path: pathlib.Path) -> None:
    """Metadata, shapes, types and bytes equal what gguf.GGUFReader (the oracle) reads."""
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert model.metadata == fields
    assert model.data_offset == reader.data_offset
    assert list(model.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = model.tensors[t.name]
        assert info.qtype == t.tensor_type
        assert info.shape == tuple(reversed(t.shape.tolist()))
        assert info.n_bytes == t.n_bytes
        assert np.array_equal(info.data, np.asarray(t.data).reshape(-1).view(np.uint8)), t.name


def open_error(path: pathlib.Path) -> str:
    """Open a damaged file; it must raise ModelFileError (never another exception) naming the file."""
    with pytest.raises(ModelFileError) as excinfo:
        GGUFModelFile.open(path)
    message = str(excinfo.value)
    assert str(path) in message
    # Expected failures are raised "from None"; a chained cause means the parser crashed and
    # the catch-all turned the crash into an error: that is a bug even if the user sees a message.
    assert excinfo.value.__cause__ is None, message
    return message


# ---------------------------------------------------------------------------------------------
# Valid files


def test_sample_reads_like_gguf_reader(sample: pathlib.Path) -> None:
    model = GGUFModelFile.open(sample)
    assert_matches_reader(model, sample)
    assert model.architecture == "tiny"
    assert model.version == 3
    assert model.file_size == sample.stat().st_size
    assert model.path == sample


def test_metadata_values_are_plain_python(sample: pathlib.Path) -> None:
    model = GGUFModelFile.open(sample)
    assert model.get("general.name") == "sample"
    assert model.arch_get("block_count") == 2 and type(model.arch_get("block_count")) is int
    assert model.arch_get("embedding_length") == 64
    assert model.arch_get("rope.freq_base") == 10000.0 and type(model.arch_get("rope.freq_base")) is float
    assert model.arch_get("flag") is True
    assert model.get("tokenizer.ggml.tokens") == ["<s>", "</s>", "a", "b", "é", "你好"]
    assert model.get("tokenizer.ggml.token_type") == [3, 3, 1, 1, 1, 1]
    assert model.get("tokenizer.ggml.scores") == [0.0, 0.0, -1.5, -2.5, -3.0, -4.0]
    assert model.get("missing.key") is None and model.get("missing.key", 7) == 7
    assert model.arch_get("missing", "x") == "x"


def test_every_value_type_round_trips(tmp_path: pathlib.Path) -> None:
    values = {
        "t.u8": (200, VT.UINT8), "t.i8": (-100, VT.INT8), "t.u16": (60000, VT.UINT16),
        "t.i16": (-30000, VT.INT16), "t.u32": (4_000_000_000, VT.UINT32), "t.i32": (-2_000_000_000, VT.INT32),
        "t.f32": (0.1, VT.FLOAT32), "t.bool": (False, VT.BOOL), "t.str": ("", VT.STRING),
        "t.u64": (2**63 + 5, VT.UINT64), "t.i64": (-(2**62), VT.INT64), "t.f64": (0.1, VT.FLOAT64),
        "t.arr_u8": ([1, 2, 255], VT.UINT8), "t.arr_i64": ([-1, 2**40], VT.INT64),
        "t.arr_bool": ([True, False], VT.BOOL), "t.arr_f64": ([1.5, -2.25], VT.FLOAT64),
        "t.arr_str": (["", "x", "ü"], VT.STRING),
    }  # fmt: skip
    path = gb.write_gguf(tmp_path / "v.gguf", "t", values, {})
    model = GGUFModelFile.open(path)
    assert_matches_reader(model, path)
    for key, (value, vtype) in values.items():
        got = model.get(key)
        if vtype == VT.FLOAT32:
            assert got == float(np.float32(value))
        else:
            assert got == value, key
    assert model.tensors == {}


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q8_0, QT.Q2_K, QT.Q6_K], ids=str)
def test_tensor_shape_is_torch_order(tmp_path: pathlib.Path, qtype: QT) -> None:
    rng = np.random.default_rng(0)
    block_elems = gguf.GGML_QUANT_SIZES[qtype][0]
    cols = 256 if block_elems == 256 else 64
    if qtype in (QT.F32, QT.F16, *gb.QUANTIZABLE):
        array = rng.standard_normal((3, cols)).astype(np.float32)
    else:
        array = gb.random_blocks(qtype, (3, cols), rng)
    tensors = {"w": (array, qtype), "b": (np.ones(5, np.float32), QT.F32)}
    path = gb.write_gguf(tmp_path / "s.gguf", "t", {}, tensors)
    model = GGUFModelFile.open(path)
    assert model.tensors["w"].shape == (3, cols)  # (out_features, in_features): GGUF ne is (cols, 3)
    assert model.tensors["b"].shape == (5,)
    assert_matches_reader(model, path)


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q5_K])
def test_builder_takes_raw_blocks_of_any_type(tmp_path: pathlib.Path, qtype: QT) -> None:
    raw = gb.random_blocks(qtype, (3, 256), np.random.default_rng(2))
    path = gb.write_gguf(tmp_path / "r.gguf", "t", {}, {"w": (raw, qtype)})
    info = GGUFModelFile.open(path).tensors["w"]
    assert info.qtype == qtype and info.shape == (3, 256)
    assert info.data.tobytes() == raw.tobytes()


def test_tensor_data_is_a_read_only_zero_copy_view(sample: pathlib.Path) -> None:
    model = GGUFModelFile.open(sample)
    info = model.tensors["token_embd.weight"]
    assert info.data.dtype == np.uint8 and info.data.ndim == 1
    assert not info.data.flags.writeable
    assert not info.data.flags.owndata
    raw = sample.read_bytes()
    start = model.data_offset + gb.tensor_offset(sample, "token_embd.weight")
    assert info.data.tobytes() == raw[start : start + info.n_bytes]
    # Every tensor is a view of the same buffer (the memory map), not a copy.
    others = [t.data for t in model.tensors.values()]
    bases = {id(_root_base(a)) for a in others}
    assert len(bases) == 1


def _root_base(array: np.ndarray) -> object:
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array


def test_custom_alignment(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(1)
    tensors = {
        "a": (rng.standard_normal(7).astype(np.float32), QT.F32),
        "b": (rng.standard_normal((2, 32)).astype(np.float32), QT.Q4_0),
    }
    path = gb.write_gguf(tmp_path / "a.gguf", "t", {}, tensors, alignment=256)
    model = GGUFModelFile.open(path)
    assert model.alignment == 256 and model.data_offset % 256 == 0
    assert_matches_reader(model, path)


def test_header_sha256(tmp_path: pathlib.Path, sample: pathlib.Path) -> None:
    model = GGUFModelFile.open(sample)
    raw = sample.read_bytes()
    assert model.header_sha256() == hashlib.sha256(raw[: gb.header_size(sample)]).hexdigest()
    # Changing tensor data keeps the identity; changing metadata changes it.
    flipped = bytearray(raw)
    flipped[-1] ^= 0xFF
    (tmp_path / "data.gguf").write_bytes(bytes(flipped))
    assert GGUFModelFile.open(tmp_path / "data.gguf").header_sha256() == model.header_sha256()
    other = gb.write_sample_gguf(tmp_path / "other.gguf")
    gb.rename_key(other, tmp_path / "renamed.gguf", "general.name", "general.nama")
    assert GGUFModelFile.open(tmp_path / "renamed.gguf").header_sha256() != model.header_sha256()


@pytest.mark.parametrize("path", REAL_MODELS, ids=lambda p: p.name)
def test_real_models_open_fast(path: pathlib.Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not installed")
    start = time.perf_counter()
    model = GGUFModelFile.open(path)
    seconds = time.perf_counter() - start
    assert model.architecture in ("qwen2", "gemma3", "llama")
    assert model.file_size == path.stat().st_size
    assert "token_embd.weight" in model.tensors
    assert len(model.get("tokenizer.ggml.tokens")) == model.tensors["token_embd.weight"].shape[0]
    assert seconds < 10, f"opening took {seconds:.1f} s"  # ~0.5 s for Qwen2.5 on a loaded 2-core box
    # The last tensor's data ends inside the file, within the final alignment padding.
    end = max(model.data_offset + t.n_bytes + int(_offset_in(model, t.name)) for t in model.tensors.values())
    assert model.file_size - model.alignment < end <= model.file_size


def _offset_in(model: GGUFModelFile, name: str) -> int:
    info = model.tensors[name]
    root = _root_base(info.data)
    start = np.frombuffer(root, np.uint8).ctypes.data
    return info.data.__array_interface__["data"][0] - start - model.data_offset


@pytest.mark.slow
def test_real_model_reads_like_gguf_reader() -> None:
    path = REAL_MODELS[3]  # SmolLM2-135M: the smallest; GGUFReader needs several seconds for it
    if not path.exists():
        pytest.skip(f"{path} is not installed")
    assert_matches_reader(GGUFModelFile.open(path), path)


# ---------------------------------------------------------------------------------------------
# Bad paths and damaged files: each raises ModelFileError with a readable message.


def test_missing_file(tmp_path: pathlib.Path) -> None:
    message = open_error(tmp_path / "nope.gguf")
    assert "does not exist" in message


def test_directory(tmp_path: pathlib.Path) -> None:
    message = open_error(tmp_path)
    assert "folder" in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_does_not_hang(tmp_path: pathlib.Path) -> None:
    pipe = tmp_path / "pipe.gguf"
    os.mkfifo(pipe)
    assert "not a regular file" in open_error(pipe)


def test_error_type_is_the_project_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(TandemError):
        GGUFModelFile.open(tmp_path / "nope.gguf")


def test_empty_file(tmp_path: pathlib.Path) -> None:
    message = open_error(gb.write_empty(tmp_path / "empty.gguf"))
    assert "is empty" in message and "Re-download" in message


@pytest.mark.parametrize("head", [b"GGML", b"\x00\x00\x00\x00", b"<htm", b"PK\x03\x04"])
def test_bad_magic(tmp_path: pathlib.Path, sample: pathlib.Path, head: bytes) -> None:
    message = open_error(gb.set_magic(sample, tmp_path / "bad.gguf", head))
    assert "not a GGUF model file" in message


def test_tiny_non_gguf_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "short.gguf"
    path.write_bytes(b"GG")
    assert "not a GGUF model file" in open_error(path)


@pytest.mark.parametrize("version", [0, 1, 4, 2**31])
def test_unsupported_version(tmp_path: pathlib.Path, sample: pathlib.Path, version: int) -> None:
    message = open_error(gb.set_version(sample, tmp_path / "v.gguf", version))
    assert f"version {version}" in message and "versions 2 and 3" in message


def test_version_2_is_read(tmp_path: pathlib.Path, sample: pathlib.Path) -> None:
    # v2 and v3 share the layout (v3 only allowed big-endian files); GGUFReader reads it the same way.
    path = gb.set_version(sample, tmp_path / "v2.gguf", 2)
    model = GGUFModelFile.open(path)
    assert model.version == 2
    assert_matches_reader(model, path)


def test_big_endian_file(tmp_path: pathlib.Path, sample: pathlib.Path) -> None:
    assert "big-endian" in open_error(gb.set_version(sample, tmp_path / "be.gguf", 3, byteorder=">"))


def test_truncated_inside_fixed_header(tmp_path: pathlib.Path, sample: pathlib.Path) -> None:
    message = open_error(gb.truncate(sample, tmp_path / "t.gguf", 12))
    assert "truncated" in message


def test_truncated_at_every_header_byte(tmp_path: pathlib.Path, sample: pathlib.Path) -> None:
    """Cut the file at every byte of the header (and into the padding): always a clean error."""
    raw = sample.read_bytes()
    header = gb.header_size(sample)
    path = tmp_path / "cut.gguf"
    for size in range(4, header + 1):
        path.write_bytes(raw[:size])
        message = open_error(path)
        assert "truncated" in message, (size, message)


def test_truncated_tensor_data(tmp_path: pathlib.Path, sample: pathlib.Path) -> None:
    size = sample.stat().st_size
    model = GGUFModelFile.open(sample)
    needed = max(gb.tensor_offset(sample, n) + t.n_bytes for n, t in model.tensors.items())
    del model
    path = gb.truncate(sample, tmp_path / "t.gguf", size - 100)
    message = open_error(path)
    have = size - 100 - gb.header_size(sample)
    assert f"truncated: expected {needed} bytes of tensor data, the file has {have}" in message
    assert "Re-download" in message


def test_missing_padding_after_last_tensor_is_accepted(tmp_path: pathlib.Path, sample: pathlib.Path) -> None:
    """The padding after the last tensor holds no data; llama.cpp accepts files without it."""
    model = GGUFModelFile.open(sample)
    end = max(gb.tensor_offset(sample, n) + t.n_bytes for n, t in model.tensors.items()) + model.data_offset
    del model
    short = GGUFModelFile.open(gb.truncate(sample, tmp_path / "t.gguf", end))
    assert set(short.tensors) == {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight",
                                  "blk.0.ffn_down.weight"}  # fmt: skip


@pytest.mark.parametrize("offset", [2**40, 2**63 - 32, 2**64 - 32])
def test_tensor_offset_out_of_bounds(tmp_path: pathlib.Path, sample: pathlib.Path, offset: int) -> None:
    message = open_error(gb.set_tensor_offset(sample, tmp_path / "o.gguf", "output_norm.weight", offset))
    assert "output_norm.weight" in message and "outside the file" in message


def test_tensor_offset_misaligned(tmp_path: pathlib.Path, sample: pathlib.Path) -> None:
    message = open_error(gb.set_tensor_offset(sample, tmp_path / "o.gguf", "output_norm.weight", 8))
    assert "not a multiple of 32" in message


def test_tensors_overlap(tmp_path: pathlib.Path, sample: pathlib.Path) -> None:
    first = gb.tensor_offset(sample, "token_embd.weight")
    message = open_error(gb.set_tensor_offset(sample, tmp_path / "o.gguf", "output_norm.weight", first))
    assert "overlap" in message


def test_tensor_dims_absurd(tmp_path: pathlib.Path, sample: pathlib.Path) -> None:
    path = gb.set_tensor_dims(sample, tmp_path / "d.gguf", "blk.0.ffn_down.weight", [2**31, 2**31])
    assert "(2147483648, 2147483648): an impossible size" in open_error(path)


def test_tensor_dims_larger_than_the_data(tmp_path: pathlib.Path, sample: pathlib.Path) -> None:
    # output_norm.weight is not the last tensor: grown, it runs into its neighbour.
    path = gb.set_tensor_dims(sample, tmp_path / "d.gguf", "output_norm.weight", [1024])
    assert "overlap" in open_error(path)


def test_tensor_row_not_whole_blocks(tmp_path: pathlib.Path, sample: pathlib.Path) -> None:
    path = gb.set_tensor_dims(sample, tmp_path / "d.gguf", "token_embd.weight", [48, 6])
    assert "not a multiple of the Q8_0 block size 32" in open_error(path)


def test_too_many_dims(tmp_path: pathlib.Path, sample: pathlib.Path) -> None:
    path = gb.set_tensor_n_dims(sample, tmp_path / "d.gguf", "output_norm.weight", 2**31)
    assert "dimensions" in open_error(path)


@pytest.mark.parametrize("type_id", [99, 2**32 - 1, 4, 5])  # 4 and 5: removed Q4_2/Q4_3
def test_unknown_tensor_type(tmp_path: pathlib.Path, sample: pathlib.Path, type_id: int) -> None:
    message = open_error(gb.set_tensor_type(sample, tmp_path / "u.gguf", "blk.0.attn_q.weight", type_id))
    assert f"unknown type id {type_id}" in message and "blk.0.attn_q.weight" in message


@pytest.mark.parametrize("qtype", [QT.IQ2_XXS, QT.IQ4_XS, QT.Q8_K, QT.I32, QT.F64, QT.TQ1_0])
def test_known_but_unsupported_tensor_type(tmp_path: pathlib.Path, sample: pathlib.Path, qtype: QT) -> None:
    message = open_error(gb.set_tensor_type(sample, tmp_path / "u.gguf", "blk.0.attn_q.weight", qtype))
    assert f"as {qtype.name}, which Tandem cannot run" in message and "Q4_K_M" in message


@pytest.mark.parametrize(
    ("n_tensors", "n_kv"),
    [(2**60, None), (None, 2**60), (2**64 - 1, 2**64 - 1), (10_000, None), (None, 10_000)],
)
def test_absurd_counts_fail_fast_without_allocating(
    tmp_path: pathlib.Path, sample: pathlib.Path, n_tensors: int | None, n_kv: int | None
) -> None:
    path = gb.set_counts(sample, tmp_path / "c.gguf", n_tensors=n_tensors, n_kv=n_kv)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        message = open_error(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 1 << 20, f"peak {peak} bytes"
    assert "claims" in message


@pytest.mark.parametrize("length", [2**60, 2**64 - 1, 10_000])
def test_absurd_string_length(tmp_path: pathlib.Path, sample: pathlib.Path, length: int) -> None:
    path = gb.set_string_length(sample, tmp_path / "s.gguf", "general.name", length)
    tracemalloc.start()
    try:
        message = open_error(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert "general.name" in message and "truncated" in message


@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.scores"])
@pytest.mark.parametrize("length", [2**60, 2**64 - 1, 10_000])
def test_absurd_array_length(tmp_path: pathlib.Path, sample: pathlib.Path, key: str, length: int) -> None:
    path = gb.set_array_length(sample, tmp_path / "a.gguf", key, length)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        message = open_error(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 1 << 20
    assert key in message


def test_huge_array_of_tiny_values_is_capped(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An array the file can hold but that would cost GiBs as Python objects is refused."""
    import engine.gguf_file as gguf_file

    monkeypatch.setattr(gguf_file, "MAX_METADATA_VALUES", 1000)
    path = gb.write_gguf(tmp_path / "big.gguf", "t", {"t.values": ([1] * 1001, VT.UINT8)}, {})
    assert "more than 1000 values" in open_error(path)


def test_unknown_value_type(tmp_path: pathlib.Path, sample: pathlib.Path) -> None:
    message = open_error(gb.set_value_type(sample, tmp_path / "v.gguf", "tiny.block_count", 77))
    assert "unknown value type id 77" in message and "tiny.block_count" in message


def test_duplicate_key(tmp_path: pathlib.Path) -> None:
    path = gb.write_gguf(tmp_path / "dup.gguf", "t", {"t.aaaa": 1, "t.bbbb": 2}, {})
    path = gb.rename_key(path, tmp_path / "dup2.gguf", "t.bbbb", "t.aaaa")
    assert "'t.aaaa' appears twice" in open_error(path)


def test_duplicate_tensor_name(tmp_path: pathlib.Path) -> None:
    ones = np.ones(4, np.float32)
    path = gb.write_gguf(tmp_path / "t.gguf", "t", {}, {"wa": (ones, QT.F32), "wb": (ones, QT.F32)})
    path = gb.rename_tensor(path, tmp_path / "t2.gguf", "wb", "wa")
    assert "two tensors are named 'wa'" in open_error(path)


def test_invalid_utf8_key(tmp_path: pathlib.Path, sample: pathlib.Path) -> None:
    path = gb.rename_key(sample, tmp_path / "k.gguf", "general.name", b"general.\xff\xfeme")
    assert "not valid UTF-8" in open_error(path)


def test_missing_architecture(tmp_path: pathlib.Path, sample: pathlib.Path) -> None:
    path = gb.rename_key(sample, tmp_path / "k.gguf", "general.architecture", "general.architectury")
    assert "general.architecture" in open_error(path)


@pytest.mark.parametrize("alignment", [0, 3, 48])
def test_bad_alignment(tmp_path: pathlib.Path, alignment: int) -> None:
    path = gb.write_gguf(tmp_path / "a.gguf", "t", {"general.alignment": (alignment, VT.UINT32)}, {})
    assert "power of two" in open_error(path)


def test_random_header_damage_never_crashes(tmp_path: pathlib.Path, sample: pathlib.Path) -> None:
    """Flip random header bytes: the file opens (harmless damage) or raises ModelFileError, nothing else."""
    raw = sample.read_bytes()
    header = gb.header_size(sample)
    rng = np.random.default_rng(1234)
    path = tmp_path / "fuzz.gguf"
    failures = 0
    for _ in range(400):
        damaged = bytearray(raw)
        for pos in rng.integers(0, header, size=int(rng.integers(1, 4))):
            damaged[pos] = int(rng.integers(0, 256))
        path.write_bytes(bytes(damaged))
        try:
            GGUFModelFile.open(path)
        except ModelFileError as e:
            assert e.__cause__ is None, str(e)
            failures += 1
    assert failures > 100  # most random damage must be detected
