"""Device layouts of GGUF weights for `kernels.qmatmul`: each block field as its own row-major array.

A GGUF row of a (N, K) weight is K / block_elems blocks of `block_bytes`, each block an
array-of-structs (Q4_0: an fp16 scale, then 16 bytes of nibbles; 18 bytes, so nothing is
16-byte aligned). At load the fields are split into one (N, fields per row) array each
(struct-of-arrays): the bytes are the GGUF bytes, only moved, so memory is exactly the GGUF size
and `to_gguf_bytes` puts them back byte for byte. Rows of quants then start 16-byte aligned and
a K-tile of one row is contiguous, so the kernels load 16 bytes per thread.

Roles (the kernel arguments they feed):
    q  the low 4 bits (Q4_*/Q5_*/Q4_K/Q5_K nibbles, Q6_K `ql`) or the int8 values (Q8_0)
    h  the high bits (Q5_0/Q5_1 one u32 per block, Q5_K / Q6_K `qh` bytes)
    s  the K-quant sub-block scales (12 packed 6-bit bytes for Q4_K/Q5_K, 16 int8 for Q6_K)
    d  the fp16 block / super-block scale (Q4_K in the vector layout: its precomputed fp16 sub-block
       scales, `q4_k_scales`, not part of the GGUF bytes)
    m  the fp16 block minimum (Q4_1/Q5_1) or super-block min scale (Q4_K/Q5_K)

Vector metadata (`vector_meta=True`, the default of `kernels.qmatmul`): the kernel reads the K-quant
block metadata (Q4_K / Q5_K d, dmin and scales, Q6_K d and scales) as whole 32- or 128-bit words, which
Triton's pipeliner turns into cp.async copies issued ahead like the quants' (1- and 2-byte loads are too
narrow for cp.async: each K-tile waited for them). For that the layout changes in two ways, still the
GGUF bytes, moved (the other types keep the plain layout: Triton already pipelines their metadata):
- Q4_K / Q5_K: the first 16 bytes of each block (d, dmin, the 12 packed scale bytes) stay together as
  one `s` field of 4 int32 words per super-block (`VECTOR_FIELDS`): one 16-byte load per row and group.
- Q6_K (even N only, `vector_layout_fits`): its fp16 `d` field is stored column-major (still an (N,
  super-blocks) tensor, strides (1, N)), so the d of rows 2i and 2i + 1 of a super-block share one
  aligned 32-bit word; its int8 scales are already 16 contiguous bytes per super-block.
One addition beyond the GGUF bytes: a vector-layout Q4_K weight built by `kernels.qmatmul` also keeps its
sub-block scales precomputed in fp16 (`q4_k_scales`, 32 bytes a super-block) for the fast dequantizer;
`split_fields` and `to_gguf_bytes` neither make nor need it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as QT

from engine.quants import BLOCK_TABLE


@dataclass(frozen=True)
class Field:
    role: str  # q, h, s, d or m
    start: int  # byte range inside one block
    stop: int
    dtype: torch.dtype  # element type of the split array


# Field table per directly-read type: byte ranges inside one GGUF block (gguf-py / ggml-common.h).
FIELDS: dict[QT, tuple[Field, ...]] = {
    QT.Q4_0: (Field("d", 0, 2, torch.float16), Field("q", 2, 18, torch.uint8)),
    QT.Q4_1: (
        Field("d", 0, 2, torch.float16), Field("m", 2, 4, torch.float16), Field("q", 4, 20, torch.uint8),
    ),
    QT.Q5_0: (Field("d", 0, 2, torch.float16), Field("h", 2, 6, torch.int32), Field("q", 6, 22, torch.uint8)),
    QT.Q5_1: (
        Field("d", 0, 2, torch.float16), Field("m", 2, 4, torch.float16),
        Field("h", 4, 8, torch.int32), Field("q", 8, 24, torch.uint8),
    ),
    QT.Q8_0: (Field("d", 0, 2, torch.float16), Field("q", 2, 34, torch.int8)),
    QT.Q4_K: (
        Field("d", 0, 2, torch.float16), Field("m", 2, 4, torch.float16),
        Field("s", 4, 16, torch.uint8), Field("q", 16, 144, torch.uint8),
    ),
    QT.Q5_K: (
        Field("d", 0, 2, torch.float16), Field("m", 2, 4, torch.float16), Field("s", 4, 16, torch.uint8),
        Field("h", 16, 48, torch.uint8), Field("q", 48, 176, torch.uint8),
    ),
    QT.Q6_K: (
        Field("q", 0, 128, torch.uint8), Field("h", 128, 192, torch.uint8),
        Field("s", 192, 208, torch.int8), Field("d", 208, 210, torch.float16),
    ),
}

# Elements of one "group": the kernels split a group's values in a low half and a high half
# (the two nibbles of the same bytes, or for Q8_0 the two halves of a block), see qmatmul.py.
GROUP_ELEMS: dict[QT, int] = {
    QT.Q4_0: 32, QT.Q4_1: 32, QT.Q5_0: 32, QT.Q5_1: 32, QT.Q8_0: 32,
    QT.Q4_K: 64, QT.Q5_K: 64, QT.Q6_K: 128,
}
assert FIELDS.keys() == GROUP_ELEMS.keys()


# Vector-metadata layout: these types' tables differ from FIELDS (the others are the same).
VECTOR_FIELDS: dict[QT, tuple[Field, ...]] = {
    QT.Q4_K: (Field("s", 0, 16, torch.int32), Field("q", 16, 144, torch.uint8)),
    QT.Q5_K: (
        Field("s", 0, 16, torch.int32), Field("h", 16, 48, torch.uint8), Field("q", 48, 176, torch.uint8),
    ),
}


def _check_block_tables() -> None:
    for qtype, fields in list(FIELDS.items()) + list(VECTOR_FIELDS.items()):
        _, block_bytes = BLOCK_TABLE[qtype]
        spans = sorted((f.start, f.stop) for f in fields)
        assert spans[0][0] == 0 and spans[-1][1] == block_bytes, qtype
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False)), qtype


_check_block_tables()
_COLUMN_MAJOR = {QT.Q6_K: ("d",)}  # fields stored column-major in the vector layout


def field_table(qtype: QT, vector_meta: bool) -> tuple[Field, ...]:
    """The fields of a type in one of the two layouts."""
    if vector_meta and qtype in VECTOR_FIELDS:
        return VECTOR_FIELDS[qtype]
    return FIELDS[qtype]


def vector_layout_fits(qtype: QT, shape: tuple[int, int]) -> bool:
    """Whether a (N, K) weight takes the vector-metadata layout: Q4_K and Q5_K, and Q6_K with N even (its d
    words pair rows). The other types' metadata loads are pipelined as they are: they keep the plain one."""
    return qtype in VECTOR_FIELDS or (qtype == QT.Q6_K and shape[0] % 2 == 0)


def split_fields(raw: torch.Tensor, qtype: QT, shape: tuple[int, int], *,
                 vector_meta: bool = False) -> dict[str, torch.Tensor]:
    """GGUF bytes (n_bytes,) uint8 -> {role: (N, per-row elements) tensor}, on raw's device, in the
    plain layout (`FIELDS`) or the vector-metadata one (where `vector_layout_fits`)."""
    if vector_meta and qtype == QT.Q6_K and not vector_layout_fits(qtype, shape):
        raise ValueError(f"{qtype.name} {shape} does not fit the vector-metadata layout")
    n_rows, n_cols = shape
    block_elems, block_bytes = BLOCK_TABLE[qtype]
    blocks = raw.reshape(n_rows, n_cols // block_elems, block_bytes)  # (N, blocks per row, block bytes)
    out = {}
    for field in field_table(qtype, vector_meta):
        part = blocks[:, :, field.start : field.stop].contiguous()  # (N, nb, field bytes)
        per_row = part.view(field.dtype).reshape(n_rows, -1)  # (N, nb * field elems)
        if vector_meta and field.role in _COLUMN_MAJOR.get(qtype, ()):
            per_row = per_row.t().contiguous().t()  # the same (N, per-row) tensor, memory (per-row, N)
        out[field.role] = per_row
    return out


def q4_k_scales(raw: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Q4_K's sub-block scales and offsets as the fp16 the fast GEMV dequantizer multiplies by (vector
    layout, the `d` role; the GGUF bytes stay in `s` and `q`): (N, 16 per super-block) fp16, for group c
    (sub-blocks 2c, 2c + 1) the four values fp16(d * sc[2c]), -fp16(dmin * m[2c]), fp16(d * sc[2c + 1]),
    -fp16(dmin * m[2c + 1]). d * sc and dmin * m are exact in float32 (11 x 6 bits); the one rounding to
    fp16 is the kernel's own (kernels/qmatmul_tiles.py, `_tile_q4_k_q5_k`), so the values are the same
    bits as when the kernel computed them from the 12 scale bytes in every K-tile.

    Why: those per-tile products reached the tensor-core operand layout through shared memory (four
    conversions, eight CTA barriers a K-tile in the sm_90 SASS); loaded as one 8-byte word per row and
    group they arrive in that layout. Costs 32 bytes of memory a super-block (+22 % over its 144); the fast
    GEMV reads 160 bytes a super-block instead of 144 (+11 %), `s` then left unread."""
    n_rows, n_cols = shape
    blocks = raw.reshape(n_rows, n_cols // 256, 144)  # (N, nb, 144) uint8
    d = blocks[:, :, 0:2].contiguous().view(torch.float16).to(torch.float32)  # (N, nb, 1)
    dmin = blocks[:, :, 2:4].contiguous().view(torch.float16).to(torch.float32)
    sc_bytes = blocks[:, :, 4:16].to(torch.int32)  # (N, nb, 12)
    lo_d, lo_m, md = sc_bytes[:, :, 0:4], sc_bytes[:, :, 4:8], sc_bytes[:, :, 8:12]
    sc = torch.cat([lo_d & 63, (md & 15) | ((lo_d >> 6) << 4)], dim=2)  # (N, nb, 8) sub-blocks 0..7
    mn = torch.cat([lo_m & 63, (md >> 4) | ((lo_m >> 6) << 4)], dim=2)
    dl = (d * sc.to(torch.float32)).to(torch.float16)  # (N, nb, 8)
    ml = (-(dmin * mn.to(torch.float32))).to(torch.float16)
    per_group = torch.stack([dl[:, :, 0::2], ml[:, :, 0::2], dl[:, :, 1::2], ml[:, :, 1::2]], dim=3)
    return per_group.reshape(n_rows, -1).contiguous()  # (N, nb * 4 groups * 4)


def to_gguf_bytes(fields: dict[str, torch.Tensor], qtype: QT, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of `split_fields` (either layout, told apart by its roles): (n_bytes,) uint8 GGUF
    bytes, on the fields' device."""
    n_rows, n_cols = shape
    block_elems, _ = BLOCK_TABLE[qtype]
    n_blocks = n_cols // block_elems
    table = field_table(qtype, vector_meta=set(fields) != {f.role for f in FIELDS[qtype]})
    parts = []
    for field in sorted(table, key=lambda f: f.start):
        arr = fields[field.role].contiguous().view(torch.uint8)  # (N, nb * field bytes)
        parts.append(arr.reshape(n_rows, n_blocks, field.stop - field.start))
    return torch.cat(parts, dim=2).reshape(-1)  # (n_bytes,)
