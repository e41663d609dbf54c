"""Write tiny GGUF files with `gguf.GGUFWriter`, and damaged copies of them, for tests.

    write_gguf(path, "qwen2", {"qwen2.block_count": 2}, {"token_embd.weight": (array, QT.Q8_0)})

Metadata values: str, bool, float (FLOAT32), int (UINT32 when it fits, else INT64), lists of
those (int lists are INT32, as llama.cpp writes token types), or `(value, GGUFValueType.X)` to
choose the type; for a list, X is the element type. Tensors: `(float array, qtype)` in torch
order (a weight is (out_features, in_features)), quantized with `gguf.quants.quantize`; gguf-py
cannot quantize the K-quants, so for those pass raw blocks from `random_blocks` (uint8, shaped
(rows, row_bytes)).

The corruption helpers copy a valid file and damage one thing; they locate header fields
with `gguf.GGUFReader`, an implementation independent of `engine.gguf_file`.
"""

from __future__ import annotations

import pathlib
import struct
from collections.abc import Sequence

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

PathArg = str | pathlib.Path

# Types gguf-py can quantize from floats (the rest need `random_blocks`).
QUANTIZABLE = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.BF16)
# Byte offsets of the fp16 scale/min fields inside one block of each quantized type.
F16_FIELDS: dict[QT, tuple[int, ...]] = {
    QT.Q4_0: (0,),
    QT.Q4_1: (0, 2),
    QT.Q5_0: (0,),
    QT.Q5_1: (0, 2),
    QT.Q8_0: (0,),
    QT.Q2_K: (80, 82),
    QT.Q3_K: (108,),
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q6_K: (208,),
}


def _metadata_type(value: object) -> VT:
    if isinstance(value, str):
        return VT.STRING
    if isinstance(value, bool):
        return VT.BOOL
    if isinstance(value, int):
        return VT.UINT32 if 0 <= value < 2**32 else VT.INT64
    if isinstance(value, float):
        return VT.FLOAT32
    raise TypeError(f"no GGUF type for {value!r}")


def _array_item_type(items: Sequence[object]) -> VT:
    first = items[0]
    if isinstance(first, int) and not isinstance(first, bool):
        return VT.INT32
    return _metadata_type(first)


def random_f16_bits(rng: np.random.Generator, n: int, max_abs: float | None = None) -> np.ndarray:
    """n fp16 values as uint16 bits: any finite bit pattern (subnormals included), or |x| < max_abs."""
    if max_abs is None:
        bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
        exponent_all_ones = (bits & 0x7C00) == 0x7C00  # inf or NaN: clear one exponent bit
        return np.where(exponent_all_ones, bits & ~np.uint16(0x4000), bits).astype(np.uint16)
    return rng.uniform(-max_abs, max_abs, size=n).astype(np.float16).view(np.uint16)


def random_blocks(
    qtype: QT, shape: Sequence[int], rng: np.random.Generator, max_abs: float | None = None
) -> np.ndarray:
    """Valid random GGML data for a tensor of `shape` (torch order): uint8 (*shape[:-1], row_bytes).

    Quantized types get random bytes with every fp16 field finite; `max_abs` bounds those fields
    (and F32/F16/BF16 values) for a usable model, None allows any finite bit pattern.
    """
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    *lead, cols = (int(s) for s in shape)
    if cols % block_elems:
        raise ValueError(f"{qtype.name} rows must be a multiple of {block_elems}, got {cols}")
    n_rows = int(np.prod(lead)) if lead else 1
    n_blocks = n_rows * cols // block_elems
    if qtype in (QT.F32, QT.F16, QT.BF16):
        if max_abs is not None:
            values = rng.uniform(-max_abs, max_abs, size=n_blocks).astype(np.float32)
            if qtype == QT.F32:
                raw = values.view(np.uint8)
            elif qtype == QT.F16:
                raw = values.astype(np.float16).view(np.uint8)
            else:
                raw = gguf.quants.quantize(values, QT.BF16)
        elif qtype == QT.F32:
            bits = rng.integers(0, 1 << 32, size=n_blocks, dtype=np.uint32)
            bits = np.where((bits & 0x7F800000) == 0x7F800000, bits & ~np.uint32(1 << 30), bits)
            raw = bits.astype(np.uint32).view(np.uint8)
        elif qtype == QT.F16:
            raw = random_f16_bits(rng, n_blocks).view(np.uint8)
        else:
            bits = rng.integers(0, 1 << 16, size=n_blocks, dtype=np.uint16)
            bits = np.where((bits & 0x7F80) == 0x7F80, bits & ~np.uint16(1 << 14), bits)
            raw = bits.astype(np.uint16).view(np.uint8)
        return np.ascontiguousarray(raw).reshape(*lead, cols * block_bytes)
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        blocks[:, offset : offset + 2] = random_f16_bits(rng, n_blocks, max_abs).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(*lead, cols // block_elems * block_bytes)


def encode_tensor(values: np.ndarray, qtype: QT) -> np.ndarray:
    """Float values -> what GGUFWriter.add_tensor takes for `qtype` (quantized with gguf-py)."""
    if qtype == QT.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == QT.F16:
        return np.ascontiguousarray(values, dtype=np.float16)
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(np.asarray(values, dtype=np.float32), qtype)
    raise ValueError(f"gguf-py cannot quantize {qtype.name}; pass random_blocks(...) bytes instead")


def write_gguf(
    path: PathArg,
    arch: str,
    metadata: dict[str, object],
    tensors: dict[str, tuple[np.ndarray, QT]],
    *,
    alignment: int | None = None,
) -> pathlib.Path:
    """Write a GGUF v3 file with GGUFWriter; `general.architecture` = arch. Returns the path."""
    path = pathlib.Path(path)
    writer = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value in metadata.items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], VT):
            value, vtype = value
            if isinstance(value, list):
                writer.add_key_value(key, value, VT.ARRAY, sub_type=vtype)
            else:
                writer.add_key_value(key, value, vtype)
        elif isinstance(value, list):
            writer.add_key_value(key, value, VT.ARRAY, sub_type=_array_item_type(value))
        else:
            writer.add_key_value(key, value, _metadata_type(value))
    for name, (array, qtype) in tensors.items():
        if array.dtype == np.uint8 and qtype in (QT.F32, QT.F16):  # raw bytes from random_blocks
            dtype = np.float32 if qtype == QT.F32 else np.float16
            writer.add_tensor(name, np.ascontiguousarray(array).view(dtype))
        elif array.dtype == np.uint8:
            writer.add_tensor(name, array, raw_dtype=qtype)  # raw blocks, (rows, row_bytes)
        elif qtype in (QT.F32, QT.F16):
            writer.add_tensor(name, encode_tensor(array, qtype))
        else:
            writer.add_tensor(name, encode_tensor(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_sample_gguf(path: PathArg, seed: int = 0) -> pathlib.Path:
    """A small valid file: a few tensors of different types and metadata of every value type."""
    rng = np.random.default_rng(seed)
    metadata: dict[str, object] = {
        "general.name": "sample",
        "tiny.block_count": 2,
        "tiny.context_length": (4096, VT.UINT32),
        "tiny.embedding_length": (64, VT.UINT64),
        "tiny.rope.freq_base": 10000.0,
        "tiny.flag": True,
        "tokenizer.ggml.tokens": ["<s>", "</s>", "a", "b", "é", "你好"],
        "tokenizer.ggml.token_type": [3, 3, 1, 1, 1, 1],
        "tokenizer.ggml.scores": ([0.0, 0.0, -1.5, -2.5, -3.0, -4.0], VT.FLOAT32),
    }
    tensors = {
        "token_embd.weight": (rng.standard_normal((6, 64)).astype(np.float32), QT.Q8_0),
        "output_norm.weight": (rng.standard_normal(64).astype(np.float32), QT.F32),
        "blk.0.attn_q.weight": (random_blocks(QT.Q4_K, (4, 256), rng), QT.Q4_K),
        "blk.0.ffn_down.weight": (rng.standard_normal((3, 32)).astype(np.float32), QT.F16),
    }
    return write_gguf(path, "tiny", metadata, tensors)


# --------------------------------------------------------------------------------------------
# Damaged copies. Each takes a valid `src`, writes `dst` and returns it.


def _patched(src: PathArg, dst: PathArg, pos: int, new: bytes) -> pathlib.Path:
    data = bytearray(pathlib.Path(src).read_bytes())
    data[pos : pos + len(new)] = new
    dst = pathlib.Path(dst)
    dst.write_bytes(bytes(data))
    return dst


def _file_pos(reader: gguf.GGUFReader, part: np.ndarray) -> int:
    """Byte offset in the file of a field part that GGUFReader returned (a view of its memmap)."""
    return int(part.ctypes.data - reader.data.ctypes.data)


def header_size(path: PathArg) -> int:
    """Where the tensor data starts (GGUFReader's data_offset)."""
    return int(gguf.GGUFReader(path).data_offset)


def write_empty(dst: PathArg) -> pathlib.Path:
    dst = pathlib.Path(dst)
    dst.write_bytes(b"")
    return dst


def truncate(src: PathArg, dst: PathArg, size: int) -> pathlib.Path:
    """The first `size` bytes of src."""
    dst = pathlib.Path(dst)
    dst.write_bytes(pathlib.Path(src).read_bytes()[:size])
    return dst


def set_magic(src: PathArg, dst: PathArg, magic: bytes = b"GGML") -> pathlib.Path:
    return _patched(src, dst, 0, magic)


def set_version(src: PathArg, dst: PathArg, version: int, byteorder: str = "<") -> pathlib.Path:
    return _patched(src, dst, 4, struct.pack(byteorder + "I", version))


def set_counts(
    src: PathArg, dst: PathArg, n_tensors: int | None = None, n_kv: int | None = None
) -> pathlib.Path:
    data = pathlib.Path(src).read_bytes()
    old_tensors, old_kv = struct.unpack_from("<QQ", data, 8)
    new_tensors = old_tensors if n_tensors is None else n_tensors
    new = struct.pack("<QQ", new_tensors, old_kv if n_kv is None else n_kv)
    return _patched(src, dst, 8, new)


def _tensor_field(reader: gguf.GGUFReader, name: str) -> gguf.ReaderField:
    for tensor in reader.tensors:
        if tensor.name == name:
            return tensor.field
    raise KeyError(name)


def set_tensor_type(src: PathArg, dst: PathArg, name: str, type_id: int) -> pathlib.Path:
    reader = gguf.GGUFReader(src)
    pos = _file_pos(reader, _tensor_field(reader, name).parts[4])
    del reader
    return _patched(src, dst, pos, struct.pack("<I", type_id))


def set_tensor_offset(src: PathArg, dst: PathArg, name: str, offset: int) -> pathlib.Path:
    """Set a tensor's data offset (relative to the start of the tensor data)."""
    reader = gguf.GGUFReader(src)
    pos = _file_pos(reader, _tensor_field(reader, name).parts[5])
    del reader
    return _patched(src, dst, pos, struct.pack("<Q", offset))


def tensor_offset(path: PathArg, name: str) -> int:
    reader = gguf.GGUFReader(path)
    return int(_tensor_field(reader, name).parts[5][0])


def set_tensor_dims(src: PathArg, dst: PathArg, name: str, ne: Sequence[int]) -> pathlib.Path:
    """Overwrite a tensor's GGUF ne (innermost first); the number of dims stays the same."""
    reader = gguf.GGUFReader(src)
    dims = _tensor_field(reader, name).parts[3]
    if len(ne) != len(dims):
        raise ValueError(f"{name} has {len(dims)} dims, got {len(ne)}")
    pos = _file_pos(reader, dims)
    del reader
    return _patched(src, dst, pos, struct.pack(f"<{len(ne)}Q", *ne))


def set_tensor_n_dims(src: PathArg, dst: PathArg, name: str, n_dims: int) -> pathlib.Path:
    reader = gguf.GGUFReader(src)
    pos = _file_pos(reader, _tensor_field(reader, name).parts[2])
    del reader
    return _patched(src, dst, pos, struct.pack("<I", n_dims))


def rename_tensor(src: PathArg, dst: PathArg, name: str, new_name: str) -> pathlib.Path:
    """Rename in place; the new name must have the same length in UTF-8."""
    reader = gguf.GGUFReader(src)
    part = _tensor_field(reader, name).parts[1]
    pos = _file_pos(reader, part)
    del reader
    encoded = new_name.encode()
    if len(encoded) != len(name.encode()):
        raise ValueError("rename_tensor keeps the length: pick a name of the same length")
    return _patched(src, dst, pos, encoded)


def _kv_field(reader: gguf.GGUFReader, key: str) -> gguf.ReaderField:
    field = reader.fields.get(key)
    if field is None:
        raise KeyError(key)
    return field


def rename_key(src: PathArg, dst: PathArg, key: str, new_key: bytes | str) -> pathlib.Path:
    """Overwrite a metadata key's bytes (same length; bytes allow invalid UTF-8)."""
    reader = gguf.GGUFReader(src)
    pos = _file_pos(reader, _kv_field(reader, key).parts[1])
    del reader
    encoded = new_key.encode() if isinstance(new_key, str) else new_key
    if len(encoded) != len(key.encode()):
        raise ValueError("rename_key keeps the length: pick a key of the same length")
    return _patched(src, dst, pos, encoded)


def set_value_type(src: PathArg, dst: PathArg, key: str, type_id: int) -> pathlib.Path:
    reader = gguf.GGUFReader(src)
    pos = _file_pos(reader, _kv_field(reader, key).parts[2])
    del reader
    return _patched(src, dst, pos, struct.pack("<I", type_id))


def set_string_length(src: PathArg, dst: PathArg, key: str, length: int) -> pathlib.Path:
    """Overwrite the length prefix of a STRING metadata value."""
    reader = gguf.GGUFReader(src)
    field = _kv_field(reader, key)
    if field.types != [VT.STRING]:
        raise ValueError(f"{key} is not a string")
    pos = _file_pos(reader, field.parts[3])
    del reader
    return _patched(src, dst, pos, struct.pack("<Q", length))


def set_array_length(src: PathArg, dst: PathArg, key: str, length: int) -> pathlib.Path:
    """Overwrite the element count of an ARRAY metadata value."""
    reader = gguf.GGUFReader(src)
    field = _kv_field(reader, key)
    if field.types[0] != VT.ARRAY:
        raise ValueError(f"{key} is not an array")
    pos = _file_pos(reader, field.parts[4])
    del reader
    return _patched(src, dst, pos, struct.pack("<Q", length))
