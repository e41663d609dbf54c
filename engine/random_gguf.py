"""Random-weight GGUF files with a real model's exact header (DESIGN.md, "Benchmarks").

Real model files cannot travel to the GPU machine (64 MiB limit), but their headers can: a header
holds the metadata (vocabulary included) and every tensor's name, type, shape and offset, which is
all a throughput benchmark needs. Two steps:

    python -m engine gguf-header --model qwen2.5-coder-1.5b --out qwen15b.header.gguf.xz
    python -m engine random-gguf --header qwen15b.header.gguf.xz --out /tmp/qwen15b-random.gguf --seed 0

The header file is exactly the bytes of the real file before its tensor data (alignment padding
included), xz-compressed when its name ends in ".xz" (a 6 MB Qwen header becomes 1.3 MB). The
random file starts with those same bytes, and every tensor sits at the same offset with the same
type and shape; only the data differs. Blocks are valid: every fp16 scale is finite
and of the magnitude a real quantizer produces, chosen so that each weight row has an RMS of about
1/sqrt(row length) with mean about 0 (an output of a random-weight linear layer then has about the
RMS of its normalized input, so activations stay finite through any number of layers). Norm
weights are about 1, biases small, rope frequency factors exactly 1. Quant codes are uniform
random, drawn with vectorised numpy (the 1.1 GB Qwen2.5-1.5B file: 3.5 s on the GPU machine, 8 s on
the 2-core development VM).
"""

from __future__ import annotations

import logging
import lzma
import math
import os
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from engine import quants
from engine.errors import ModelFileError
from engine.gguf_file import GGUFModelFile, _Corrupt, _Truncated, read_header_records

logger = logging.getLogger(__name__)

CHUNK_BYTES = 32 << 20  # random data generated and written this many bytes at a time
SCALE_SPREAD = 0.25  # each block's scale is the tensor's scale times U(1 - spread, 1 + spread)
NORM_SPREAD = 0.05  # norm weights: 1 + N(0, spread)
BIAS_STD = 0.02  # other 1-D tensors (biases): N(0, std)
XZ_MAGIC = b"\xfd7zXZ\x00"


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of a header: where its data goes, not the data."""

    name: str
    qtype: QT
    shape: tuple[int, ...]  # torch order: a weight is (out_features, in_features)
    offset: int  # relative to the start of the tensor data
    n_bytes: int


@dataclass(frozen=True)
class HeaderLayout:
    header: bytes  # every byte before the tensor data, alignment padding included
    version: int
    alignment: int
    metadata: dict[str, object]
    tensors: list[TensorSlot]  # in header order

    @property
    def data_offset(self) -> int:
        return len(self.header)

    @property
    def data_size(self) -> int:
        """Bytes of tensor data: the end of the last tensor, rounded up to the alignment."""
        end = max((t.offset + t.n_bytes for t in self.tensors), default=0)
        return -(-end // self.alignment) * self.alignment

    @property
    def file_size(self) -> int:
        return self.data_offset + self.data_size

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


# ---------------------------------------------------------------------------------------------
# Headers


def read_header_bytes(model_path: str | os.PathLike[str]) -> bytes:
    """The bytes of a real GGUF before its tensor data; the file is validated first."""
    model = GGUFModelFile.open(model_path)
    with open(model.path, "rb") as f:
        header = f.read(model.data_offset)
    if len(header) != model.data_offset:
        raise ModelFileError(f"{model.path} changed while it was read. Try again.")
    return header


def write_header_file(model_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> HeaderLayout:
    """Write the header of `model_path` (metadata + tensor infos + padding, no data) to `out_path`."""
    header = read_header_bytes(model_path)
    layout = parse_header(header, str(model_path))
    out_path = pathlib.Path(out_path)
    out_path.write_bytes(lzma.compress(header) if out_path.name.endswith(".xz") else header)
    return layout


def read_header_file(path: str | os.PathLike[str]) -> bytes:
    """The header bytes of a file written by `write_header_file` (plain or xz)."""
    path = pathlib.Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ModelFileError(f"Cannot read the header file {path}: {e.strerror or e}.") from None
    if raw.startswith(XZ_MAGIC):
        try:
            return lzma.decompress(raw)
        except lzma.LZMAError as e:
            raise ModelFileError(f"The header file {path} is a damaged xz file ({e}).") from None
    return raw


def parse_header(header: bytes, shown: str = "the header") -> HeaderLayout:
    """Parse a header file's bytes. Raises ModelFileError if they are not exactly one GGUF header."""
    try:
        return _parse_header(header, shown)
    except _Truncated as e:
        raise ModelFileError(f"{shown} is not a whole GGUF header: {e}.") from None
    except _Corrupt as e:
        raise ModelFileError(f"{shown} is a damaged GGUF header: {e}.") from None


def _parse_header(header: bytes, shown: str) -> HeaderLayout:
    version, metadata, raw, alignment, data_offset = read_header_records(header, len(header), shown)
    if len(header) != data_offset:
        raise ModelFileError(
            f"{shown} has {len(header)} bytes, but its header ends at byte {data_offset}: "
            "it is not a header file written by `python -m engine gguf-header`."
        )
    tensors = []
    for name, ne, type_id, offset in raw:
        try:
            qtype = QT(type_id)
        except ValueError:
            raise _Corrupt(f"tensor {name!r} has unknown type id {type_id}") from None
        if qtype not in quants.BLOCK_TABLE:
            raise ModelFileError(
                f"{shown}: tensor {name!r} is {qtype.name}, which Tandem cannot run "
                f"(supported: {quants.supported_type_names()})."
            )
        shape = tuple(int(d) for d in reversed(ne))
        try:
            n_bytes = quants.tensor_nbytes(qtype, shape)
        except ValueError as e:
            raise _Corrupt(f"tensor {name!r}: {e}") from None
        tensors.append(TensorSlot(name, qtype, shape, int(offset), n_bytes))
    return HeaderLayout(bytes(header), int(version), int(alignment), metadata, tensors)


# ---------------------------------------------------------------------------------------------
# Random blocks
#
# With uniform random bytes every quant code is uniform over its range, so the second moment of a
# dequantized value is known exactly; the fp16 scale d is then sigma / sqrt(that moment). Formats
# with a min (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) get dmin = d * E[q] so that every row has mean ~0.


def _uniform_moments(lo: int, hi: int) -> tuple[float, float]:
    """(mean, mean of squares) of an integer uniform on [lo, hi]."""
    n = hi - lo + 1
    mean = (lo + hi) / 2
    return mean, (n * n - 1) / 12 + mean * mean


def _product_m2(scale: tuple[int, int], code: tuple[int, int]) -> float:
    """E[(s*q)^2] for independent uniform integers s (sub-block scale) and q (code)."""
    return _uniform_moments(*scale)[1] * _uniform_moments(*code)[1]


def _centered_m2(code: tuple[int, int]) -> float:
    """E[(q - E[q])^2]: a format with a min, d * q + m, where m = -d * E[q]."""
    mean, m2 = _uniform_moments(*code)
    return m2 - mean * mean


def _k_min_m2(scale: tuple[int, int], code: tuple[int, int]) -> float:
    """E[(sc*q - E[q]*mn)^2], sc and mn independent and uniform on `scale`, q uniform on `code`."""
    mu, s2 = _uniform_moments(*scale)
    q_mean, q2 = _uniform_moments(*code)
    return s2 * (q2 + q_mean * q_mean) - 2 * mu * mu * q_mean * q_mean


@dataclass(frozen=True)
class _BlockRecipe:
    d_offset: int  # byte offset of the fp16 scale in a block
    min_offset: int | None  # byte offset of the fp16 min / dmin, if the format has one
    min_ratio: float  # the min field = min_ratio * d (negative for Q4_1/Q5_1's additive m)
    unit_m2: float  # E[x^2] / d^2 for uniform random codes


_RECIPES: dict[QT, _BlockRecipe] = {
    # x = d * (q - 8), q in 0..15
    QT.Q4_0: _BlockRecipe(0, None, 0.0, _uniform_moments(-8, 7)[1]),
    # x = d * q + m, q in 0..15, m = -7.5 d
    QT.Q4_1: _BlockRecipe(0, 2, -7.5, _centered_m2((0, 15))),
    # x = d * (q - 16), q in 0..31
    QT.Q5_0: _BlockRecipe(0, None, 0.0, _uniform_moments(-16, 15)[1]),
    QT.Q5_1: _BlockRecipe(0, 2, -15.5, _centered_m2((0, 31))),
    # x = d * q, q int8
    QT.Q8_0: _BlockRecipe(0, None, 0.0, _uniform_moments(-128, 127)[1]),
    # x = d * sc * q - dmin * mn, sc and mn 4-bit, q 2-bit
    QT.Q2_K: _BlockRecipe(80, 82, 1.5, _k_min_m2((0, 15), (0, 3))),
    # x = d * (sc - 32) * q, sc 6-bit, q in -4..3
    QT.Q3_K: _BlockRecipe(108, None, 0.0, _product_m2((-32, 31), (-4, 3))),
    # x = d * sc * q - dmin * mn, sc and mn 6-bit, q 4-bit / 5-bit
    QT.Q4_K: _BlockRecipe(0, 2, 7.5, _k_min_m2((0, 63), (0, 15))),
    QT.Q5_K: _BlockRecipe(0, 2, 15.5, _k_min_m2((0, 63), (0, 31))),
    # x = d * sc * (q - 32), sc int8, q 6-bit
    QT.Q6_K: _BlockRecipe(208, None, 0.0, _product_m2((-128, 127), (-32, 31))),
}
_FLOAT_DTYPES = {QT.F32: np.dtype("<f4"), QT.F16: np.dtype("<f2")}  # BF16 is made from float32
assert set(_RECIPES) | set(_FLOAT_DTYPES) | {QT.BF16} == set(quants.BLOCK_TABLE)


def weight_std(shape: tuple[int, ...]) -> float:
    """The RMS a random weight gets: 1/sqrt(row length)."""
    return 1.0 / math.sqrt(shape[-1]) if shape else 1.0


def _random_quant_blocks(qtype: QT, n_blocks: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """(n_blocks, block_bytes) uint8: uniform random codes, scales for an RMS of `sigma`."""
    recipe = _RECIPES[qtype]
    _, block_bytes = quants.BLOCK_TABLE[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)  # (n, block_bytes)
    unit_m2 = recipe.unit_m2 * (1 + SCALE_SPREAD**2 / 3)  # E[f^2] of the per-block factor
    spread = rng.uniform(1 - SCALE_SPREAD, 1 + SCALE_SPREAD, size=n_blocks)  # (n,)
    d = spread * (sigma / math.sqrt(unit_m2))  # (n,) float64
    blocks[:, recipe.d_offset : recipe.d_offset + 2] = d.astype("<f2").view(np.uint8).reshape(n_blocks, 2)
    if recipe.min_offset is not None:
        m = (d * recipe.min_ratio).astype("<f2")  # (n,)
        blocks[:, recipe.min_offset : recipe.min_offset + 2] = m.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def _random_floats(slot: TensorSlot, n: int, rng: np.random.Generator) -> np.ndarray:
    """n float32 values for a float tensor: weights, norm weights, biases or rope factors."""
    if slot.name.startswith("rope_freqs"):
        return np.ones(n, dtype=np.float32)  # frequency divisors: 1 = the plain rope
    if len(slot.shape) <= 1:
        if "norm" in slot.name:
            return (1.0 + NORM_SPREAD * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)
        return BIAS_STD * rng.standard_normal(n, dtype=np.float32)
    return weight_std(slot.shape) * rng.standard_normal(n, dtype=np.float32)


def _float_bytes(qtype: QT, values: np.ndarray) -> np.ndarray:
    if qtype == QT.BF16:  # round to nearest even (values are finite and far from overflow)
        bits = values.astype("<f4").view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype("<u2").view(np.uint8)
    return values.astype(_FLOAT_DTYPES[qtype]).view(np.uint8)


def random_tensor_chunks(slot: TensorSlot, rng: np.random.Generator, chunk_bytes: int = CHUNK_BYTES):
    """Yield the random data of one tensor as 1-D uint8 arrays, `chunk_bytes` at most (whole blocks)."""
    block_elems, block_bytes = quants.BLOCK_TABLE[slot.qtype]
    n_blocks = slot.n_bytes // block_bytes
    step = max(1, chunk_bytes // block_bytes)
    sigma = weight_std(slot.shape)
    for start in range(0, n_blocks, step):
        count = min(step, n_blocks - start)
        if slot.qtype in _RECIPES:
            yield _random_quant_blocks(slot.qtype, count, sigma, rng).reshape(-1)
        else:  # one element per block
            yield _float_bytes(slot.qtype, _random_floats(slot, count, rng))


def random_tensor_bytes(slot: TensorSlot, seed: int = 0) -> np.ndarray:
    """The whole random data of one tensor (for tests and small tensors)."""
    rng = np.random.default_rng(seed)
    return np.concatenate(list(random_tensor_chunks(slot, rng)) or [np.zeros(0, np.uint8)])


# ---------------------------------------------------------------------------------------------
# Random files


def write_random_gguf(
    header_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> HeaderLayout:
    """Write a GGUF with the header in `header_path` and random valid tensor data.

    Each tensor's data depends only on (seed, its index in the header). The result is opened with
    `GGUFModelFile.open` before returning, so a file this returns loads.
    """
    header_path = pathlib.Path(header_path)
    layout = parse_header(read_header_file(header_path), str(header_path))
    out_path = pathlib.Path(out_path)
    started = time.perf_counter()
    total = sum(t.n_bytes for t in layout.tensors)
    done = 0
    with open(out_path, "wb") as f:
        f.write(layout.header)
        f.truncate(layout.file_size)  # alignment padding stays zero (and sparse)
        for index, slot in sorted(enumerate(layout.tensors), key=lambda it: it[1].offset):
            rng = np.random.default_rng([seed, index])
            f.seek(layout.data_offset + slot.offset)
            for chunk in random_tensor_chunks(slot, rng):
                f.write(chunk.data)
                done += chunk.nbytes
                if progress:
                    progress(done, total)
    GGUFModelFile.open(out_path)  # the same checks any model file gets
    logger.info(
        "wrote %s: %d tensors, %.1f MiB in %.1f s",
        out_path,
        len(layout.tensors),
        layout.file_size / 2**20,
        time.perf_counter() - started,
    )
    return layout
