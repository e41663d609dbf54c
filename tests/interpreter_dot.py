"""A tensor-core-like tl.dot for the Triton interpreter, so bit-for-bit contracts between kernels can be
tested on the CPU.

Under TRITON_INTERPRET=1 the interpreter runs `tl.dot(a, b, acc)` as `numpy.matmul(a, b) + acc`, and
OpenBLAS's sgemm may sum a tile row's products in an order that depends on where the row sits in the tile:
on this CI VM (AMD EPYC, family 25, OpenBLAS 0.3.31 under numpy 2.4.6) moving one row of a 16 x 64 fp16
operand to another tile row changed 14 of 16 rows' results in the last bit. The GPU's mma instructions do
not: a tile row's result depends on that row alone, which is what `verify_attention`'s forms rest on (a
verify row's heads sit in other tile rows than in the decode's tile). This dot keeps that property: each
output element's K products (exact in float32 for fp16 operands) are summed along their own contiguous axis
by numpy's float32 reduction, whose order depends only on K, then the accumulator is added, as the
interpreter does.
"""

from __future__ import annotations

import numpy as np


def row_independent_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    """InterpreterBuilder.create_dot with each output element's K products (a [..., M, K], b [..., K, N])
    summed by one numpy reduction along a contiguous K axis of its own, in float32, then the accumulator
    d [..., M, N] added."""
    from triton.runtime.interpreter import TensorHandle

    if a.data.dtype not in (np.float16, np.float32) or d.data.dtype != np.float32:
        return ORIGINAL(self, a, b, d, input_precision, max_num_imprecise_acc)
    a32 = a.data.astype(np.float32)[..., :, None, :]  # [..., M, 1, K]
    b32 = np.swapaxes(b.data.astype(np.float32), -1, -2)[..., None, :, :]  # [..., 1, N, K]
    products = np.ascontiguousarray(a32 * b32)  # [..., M, N, K]
    return TensorHandle(products.sum(axis=-1, dtype=np.float32) + d.data, d.dtype.scalar)


ORIGINAL = None


def install() -> None:
    """Replace the interpreter's dot (once); call after triton was imported with TRITON_INTERPRET=1."""
    global ORIGINAL
    from triton.runtime import interpreter

    if ORIGINAL is None:
        ORIGINAL = interpreter.InterpreterBuilder.create_dot
        interpreter.InterpreterBuilder.create_dot = row_independent_dot
