"""Open a GGUF model file: metadata as plain Python values, tensors as zero-copy byte views.

The header is parsed here rather than with `gguf.GGUFReader`, for two reasons: every count and
length is checked against the file size *before* anything is allocated or looped over (a
corrupt count of 2**60 fails at once instead of hanging or exhausting memory), and the
151936-entry vocabulary of a Qwen2.5 file parses in a fraction of a second instead of many
seconds. The layout and the type constants come from the `gguf` package; the tests check the
result against `GGUFReader` on real files.

Layout (little-endian): magic "GGUF", u32 version (2 or 3), u64 tensor count, u64 KV count,
the KV pairs, one info record per tensor (name, u32 n_dims, u64 ne[n_dims], u32 type,
u64 offset), padding to `general.alignment` (default 32), then the tensor data; tensor offsets
are relative to the start of that data.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import pathlib
import stat
import struct
from dataclasses import dataclass

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from engine import quants
from engine.errors import ModelFileError

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT  # 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# Sanity caps far above any real model (a 1T-parameter MoE has ~2k tensors; vocabularies and
# merge lists are under a million entries) that keep a corrupt file from costing minutes or GiBs.
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_METADATA_VALUES = 1 << 24  # array elements over all keys
MAX_ARRAY_NESTING = 4
MAX_TENSOR_BYTES = 1 << 44  # 16 TiB: beyond it a shape is damage, not a big model

_FIXED_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, KV count
# Smallest possible encodings, used to bound counts by the bytes left in the file.
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset

_SCALARS: dict[GGUFValueType, tuple[struct.Struct, np.dtype]] = {
    GGUFValueType.UINT8: (struct.Struct("<B"), np.dtype("<u1")),
    GGUFValueType.INT8: (struct.Struct("<b"), np.dtype("<i1")),
    GGUFValueType.UINT16: (struct.Struct("<H"), np.dtype("<u2")),
    GGUFValueType.INT16: (struct.Struct("<h"), np.dtype("<i2")),
    GGUFValueType.UINT32: (struct.Struct("<I"), np.dtype("<u4")),
    GGUFValueType.INT32: (struct.Struct("<i"), np.dtype("<i4")),
    GGUFValueType.FLOAT32: (struct.Struct("<f"), np.dtype("<f4")),
    GGUFValueType.BOOL: (struct.Struct("<?"), np.dtype("?")),
    GGUFValueType.UINT64: (struct.Struct("<Q"), np.dtype("<u8")),
    GGUFValueType.INT64: (struct.Struct("<q"), np.dtype("<i8")),
    GGUFValueType.FLOAT64: (struct.Struct("<d"), np.dtype("<f8")),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_REDOWNLOAD = "Re-download it, or pick another model file."


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order = reversed GGUF ne: a weight is (out_features, in_features)
    data: np.ndarray  # raw bytes, uint8, 1-D, a read-only view of the memory map, exactly n_bytes long

    @property
    def n_bytes(self) -> int:
        return int(self.data.shape[0])

    @property
    def n_elements(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


class _Truncated(Exception):
    """The header claims more bytes than the file has."""


class _Corrupt(Exception):
    """The header holds an impossible value; the message says which."""


class _HeaderReader:
    """A bounds-checked cursor over the mapped file. Raises `_Truncated` instead of reading past the end."""

    def __init__(self, buf: mmap.mmap, size: int, pos: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = pos
        self.metadata_values = 0

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise _Truncated(f"{what} needs {n} bytes at offset {self.pos}, but the file ends at {self.size}")
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.need(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.need(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        if n > self.left():
            raise _Truncated(f"{what} claims {n} bytes at offset {self.pos}; the file ends at {self.size}")
        start = self.need(n, what)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Corrupt(f"{what} at offset {start} is not valid UTF-8 text") from e

    def string_array(self, count: int, what: str) -> list[str]:
        """`count` strings; the hot loop of every vocabulary (150k+ tokens and merges), kept tight."""
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        i = 0
        try:
            for i in range(count):
                if pos + 8 > size:
                    raise _Truncated(f"{what}[{i}] starts at offset {pos}; the file ends at {size}")
                end = pos + 8 + unpack(buf, pos)[0]
                if end > size:
                    raise _Truncated(f"{what}[{i}] runs past the end of the file ({size} bytes)")
                append(buf[pos + 8 : end].decode("utf-8"))
                pos = end
        except UnicodeDecodeError as e:
            raise _Corrupt(f"{what}[{i}] at offset {pos} is not valid UTF-8 text") from e
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> object:
        try:
            gtype = GGUFValueType(vtype)
        except ValueError:
            raise _Corrupt(f"{what} has unknown value type id {vtype}") from None
        if gtype == GGUFValueType.STRING:
            return self.string(what)
        if gtype in _SCALARS:
            packer, _ = _SCALARS[gtype]
            return packer.unpack_from(self.buf, self.need(packer.size, what))[0]
        # An array: u32 element type, u64 count, then the elements.
        if depth >= MAX_ARRAY_NESTING:
            raise _Corrupt(f"{what} nests arrays more than {MAX_ARRAY_NESTING} deep")
        item_type = self.u32(f"the element type of {what}")
        count = self.u64(f"the length of {what}")
        try:
            item_gtype = GGUFValueType(item_type)
        except ValueError:
            raise _Corrupt(f"{what} has unknown element type id {item_type}") from None
        if item_gtype in _SCALARS:
            min_item = _SCALARS[item_gtype][0].size
        else:
            min_item = 8 if item_gtype == GGUFValueType.STRING else 12
        if count > self.left() // min_item:
            raise _Truncated(f"{what} claims {count} elements, more than {self.left()} bytes can hold")
        self.metadata_values += count
        if self.metadata_values > MAX_METADATA_VALUES:
            raise _Corrupt(f"the metadata holds more than {MAX_METADATA_VALUES} values (at {what})")
        if item_gtype in _SCALARS:
            _, dtype = _SCALARS[item_gtype]
            start = self.need(count * dtype.itemsize, what)
            return np.frombuffer(self.buf, dtype=dtype, count=count, offset=start).tolist()
        if item_gtype == GGUFValueType.STRING:
            return self.string_array(count, what)
        return [self.value(item_type, f"{what}[{i}]", depth + 1) for i in range(count)]


def _close_quietly(buf: mmap.mmap) -> None:
    try:
        buf.close()
    except BufferError:  # a view is still alive somewhere; the map goes when it does
        pass


def read_header_records(
    buf, size: int, shown: str
) -> tuple[int, dict[str, object], list[tuple[str, tuple[int, ...], int, int]], int, int]:
    """The fixed header, the metadata and the tensor records of a GGUF file (or of a header alone) in
    buf[:size] -> (version, metadata, raw tensor records (name, ne, type id, offset), alignment, data offset).

    Raises ModelFileError (not GGUF, unsupported version or byte order), _Truncated or _Corrupt.
    """
    if size < 4 or buf[:4] != GGUF_MAGIC:
        head = bytes(buf[:4])
        raise ModelFileError(
            f"{shown} is not a GGUF model file (it starts with {head!r}, not {GGUF_MAGIC!r}). "
            "Tandem runs llama.cpp-style .gguf files."
        )
    if size < _FIXED_HEADER.size:
        raise _Truncated(f"the {_FIXED_HEADER.size}-byte GGUF header is cut off after {size} bytes")
    _, version, n_tensors, n_kv = _FIXED_HEADER.unpack_from(buf, 0)
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if version & 0xFFFF == 0 and swapped in SUPPORTED_VERSIONS:
            raise ModelFileError(
                f"{shown} is a big-endian GGUF file; Tandem reads little-endian GGUF files only "
                "(the usual kind). Download the standard version of this model."
            )
        raise ModelFileError(
            f"{shown} is GGUF version {version}; Tandem reads versions 2 and 3. "
            "Download a file made by a current llama.cpp."
        )
    reader = _HeaderReader(buf, size, _FIXED_HEADER.size)
    if n_tensors > MAX_TENSORS or n_tensors > reader.left() // _MIN_TENSOR_INFO_BYTES:
        raise _Corrupt(f"the header claims {n_tensors} tensors, more than the file can hold")
    if n_kv > MAX_KV or n_kv > reader.left() // _MIN_KV_BYTES:
        raise _Corrupt(f"the header claims {n_kv} metadata entries, more than the file can hold")

    metadata: dict[str, object] = {}
    for i in range(n_kv):
        key = reader.string(f"the name of metadata entry {i}")
        vtype = reader.u32(f"the type of metadata entry {key!r}")
        value = reader.value(vtype, f"metadata entry {key!r}")
        if key in metadata:
            raise _Corrupt(f"metadata entry {key!r} appears twice")
        metadata[key] = value

    raw_infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for i in range(n_tensors):
        name = reader.string(f"the name of tensor {i}")
        n_dims = reader.u32(f"the number of dimensions of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise _Corrupt(f"tensor {name!r} claims {n_dims} dimensions (at most {MAX_DIMS})")
        ne = tuple(reader.u64(f"the shape of tensor {name!r}") for _ in range(n_dims))
        type_id = reader.u32(f"the type of tensor {name!r}")
        offset = reader.u64(f"the data offset of tensor {name!r}")
        raw_infos.append((name, ne, type_id, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (
        not isinstance(alignment, int)
        or isinstance(alignment, bool)
        or alignment <= 0
        or alignment & (alignment - 1)
        or alignment > 1 << 30
    ):
        raise _Corrupt(f"general.alignment is {alignment!r}; it must be a power of two")
    data_offset = -(-reader.pos // alignment) * alignment
    return version, metadata, raw_infos, alignment, data_offset


class GGUFModelFile:
    """A memory-mapped GGUF file. Create it with `GGUFModelFile.open(path)`."""

    path: pathlib.Path
    file_size: int
    version: int
    alignment: int
    data_offset: int  # where the tensor data starts; everything before it is the header
    architecture: str  # general.architecture
    metadata: dict[str, object]  # plain python values: str, int, float, bool, lists of those
    tensors: dict[str, TensorInfo]

    def __init__(
        self,
        path: pathlib.Path,
        file_size: int,
        version: int,
        alignment: int,
        data_offset: int,
        metadata: dict[str, object],
        tensors: dict[str, TensorInfo],
        buffer: mmap.mmap,
    ) -> None:
        self.path = path
        self.file_size = file_size
        self.version = version
        self.alignment = alignment
        self.data_offset = data_offset
        self.metadata = metadata
        self.tensors = tensors
        self.architecture = str(metadata["general.architecture"])
        self._buffer = buffer
        self._header_sha256: str | None = None

    def __repr__(self) -> str:
        return (
            f"GGUFModelFile({str(self.path)!r}, architecture={self.architecture!r}, "
            f"tensors={len(self.tensors)}, metadata keys={len(self.metadata)})"
        )

    def get(self, key: str, default: object = None) -> object:
        return self.metadata.get(key, default)

    def arch_get(self, suffix: str, default: object = None) -> object:
        """metadata[f"{architecture}.{suffix}"], e.g. arch_get("block_count")."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    def header_sha256(self) -> str:
        """sha256 of every byte before the tensor data: the model's identity for snapshots."""
        if self._header_sha256 is None:
            view = memoryview(self._buffer)
            try:
                self._header_sha256 = hashlib.sha256(view[: self.data_offset]).hexdigest()
            finally:
                view.release()
        return self._header_sha256

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> GGUFModelFile:
        """Map and validate `path`. Raises ModelFileError with a message a user can act on."""
        path = pathlib.Path(path)
        shown = str(path)
        folder = f"{shown} is a folder, not a model file. Choose a .gguf file."
        try:
            mode = os.stat(path).st_mode
            if stat.S_ISDIR(mode):
                raise ModelFileError(folder)
            if not stat.S_ISREG(mode):  # a pipe or device would block or never end
                raise ModelFileError(f"{shown} is not a regular file. Choose a .gguf model file.")
            with open(path, "rb") as f:
                file_size = os.fstat(f.fileno()).st_size
                if file_size == 0:
                    raise ModelFileError(f"The model file {shown} is empty. {_REDOWNLOAD}")
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise ModelFileError(f"The model file {shown} does not exist. Check the model path.") from None
        except IsADirectoryError:
            raise ModelFileError(folder) from None
        except PermissionError:
            raise ModelFileError(f"Tandem may not read {shown}. Check the file's permissions.") from None
        except OSError as e:
            raise ModelFileError(f"Cannot read the model file {shown}: {e.strerror or e}.") from None
        try:
            return cls._parse(path, buf, file_size)
        except ModelFileError:
            _close_quietly(buf)
            raise
        except _Truncated as e:
            _close_quietly(buf)
            raise ModelFileError(
                f"The model file {shown} is truncated: {e}. It was probably not downloaded completely. "
                f"{_REDOWNLOAD}"
            ) from None
        except _Corrupt as e:
            _close_quietly(buf)
            raise ModelFileError(f"The model file {shown} is damaged: {e}. {_REDOWNLOAD}") from None
        except Exception as e:  # a bug in the parser must still reach the user as a readable error
            _close_quietly(buf)
            logger.exception("unexpected error while reading %s", shown)
            raise ModelFileError(f"The model file {shown} cannot be read ({type(e).__name__}: {e}).") from e

    @classmethod
    def _parse(cls, path: pathlib.Path, buf: mmap.mmap, file_size: int) -> GGUFModelFile:
        shown = str(path)
        version, metadata, raw_infos, alignment, data_offset = read_header_records(buf, file_size, shown)

        architecture = metadata.get("general.architecture")
        if not isinstance(architecture, str) or not architecture:
            raise ModelFileError(
                f"{shown} has no general.architecture entry, so it is not a model Tandem can load. "
                "Choose a language-model .gguf file."
            )

        tensors = cls._build_tensors(shown, buf, file_size, data_offset, alignment, raw_infos)
        logger.info(
            "opened %s: GGUF v%d, %s, %d tensors, %d metadata entries, header %d bytes",
            shown, version, architecture, len(tensors), len(metadata), data_offset,
        )
        return cls(path, file_size, version, alignment, data_offset, metadata, tensors, buf)

    @staticmethod
    def _build_tensors(
        shown: str,
        buf: mmap.mmap,
        file_size: int,
        data_offset: int,
        alignment: int,
        raw_infos: list[tuple[str, tuple[int, ...], int, int]],
    ) -> dict[str, TensorInfo]:
        # First validate every record (types, shapes, extents) without touching the data.
        spans: list[tuple[int, int, str]] = []  # (start, end, name), relative to data_offset
        checked: list[tuple[str, GGMLQuantizationType, tuple[int, ...], int, int]] = []
        names: set[str] = set()
        canonical_size = 0  # the data size a writer laying tensors out back to back would produce
        for name, ne, type_id, offset in raw_infos:
            if name in names:
                raise _Corrupt(f"two tensors are named {name!r}")
            names.add(name)
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise _Corrupt(
                    f"tensor {name!r} has unknown type id {type_id} (a newer llama.cpp format, or damage)"
                ) from None
            if qtype not in quants.BLOCK_TABLE:
                raise ModelFileError(
                    f"{shown} stores tensor {name!r} as {qtype.name}, which Tandem cannot run. "
                    f"Supported types: {quants.supported_type_names()}. "
                    "Choose a file quantized as Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0 or similar."
                )
            block_elems, block_bytes = quants.BLOCK_TABLE[qtype]
            row = ne[0] if ne else 1  # zero dimensions: a scalar
            if row % block_elems != 0:
                raise _Corrupt(
                    f"tensor {name!r} has rows of {row} elements, not a multiple of the "
                    f"{qtype.name} block size {block_elems}"
                )
            n_elems = 1
            for dim in ne:
                n_elems *= dim
            n_bytes = n_elems // block_elems * block_bytes
            if n_bytes > MAX_TENSOR_BYTES:
                raise _Corrupt(f"tensor {name!r} has shape {tuple(reversed(ne))}: an impossible size")
            if offset % alignment != 0:
                raise _Corrupt(f"tensor {name!r} starts at offset {offset}, not a multiple of {alignment}")
            shape = tuple(reversed(ne))
            spans.append((offset, offset + n_bytes, name))
            checked.append((name, qtype, shape, offset, n_bytes))
            canonical_size += -(-n_bytes // alignment) * alignment

        # Overlaps first: a damaged shape or offset shows up here, before it can look like truncation.
        spans.sort()
        for (_, end, name), (start, _, next_name) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise _Corrupt(f"the data of tensors {name!r} and {next_name!r} overlap")
        have = max(0, file_size - data_offset)
        needed = max((end for _, end, _ in spans), default=0)
        if needed > have:
            if needed <= canonical_size:
                raise _Truncated(f"expected {needed} bytes of tensor data, the file has {have}")
            worst = max(spans, key=lambda s: s[1])
            raise _Corrupt(
                f"the data of tensor {worst[2]!r} (bytes {worst[0]}..{worst[1]} after the header) lies "
                f"outside the file, which has {have} bytes of tensor data"
            )

        whole = np.frombuffer(buf, dtype=np.uint8)  # (file_size,) read-only, zero-copy
        tensors: dict[str, TensorInfo] = {}
        for name, qtype, shape, offset, n_bytes in checked:
            start = data_offset + offset
            tensors[name] = TensorInfo(name, qtype, shape, whole[start : start + n_bytes])
        return tensors
