"""Compile the engine's CUDA kernels for sm_90 (Hopper) on a machine without a GPU.

    python -m tests.tools.compile_sm90          # table: kernel, registers, local memory, shared memory

GPU time is scarce and a kernel that only fails to compile for CUDA (inline PTX, a launch option such
as launch_pdl, a layout the interpreter never builds) would waste a whole call on the GPU machine. This
tool runs each kernel's real launcher on CPU tensors with the Triton kernel replaced by a recorder, so
the exact arguments and launch options the launcher builds are captured, then compiles that launch for
sm_90 with Triton's own ptxas (no driver needed): the constexprs the launcher only sets on CUDA (the
inline-PTX dequantization, PDL, the L2 prefetch) are switched on as they are there.

It needs Triton's interpreter off (TRITON_INTERPRET unset: an interpreted kernel cannot be compiled),
so the test (tests/kernels/test_compile_sm90.py) runs it in a subprocess. Exit status 1 if any kernel
fails to compile or the GEMV spills registers to local memory.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGET_ARCH = 90
_PTR_TYPES = {
    torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.uint8: "*u8",
    torch.int8: "*i8", torch.int32: "*i32", torch.int64: "*i64",
}
_OPTIONS = ("num_warps", "num_stages", "launch_pdl", "enable_fp_fusion", "maxnreg")


class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@contextlib.contextmanager
def recording(module, name: str):
    """Replace module.name (a kernel) by a Recorder for the duration."""
    kernel = getattr(module, name)
    rec = Recorder(kernel)
    setattr(module, name, rec)
    try:
        yield rec
    finally:
        setattr(module, name, kernel)


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return _PTR_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type a kernel argument {value!r}")


def compile_call(kernel, args: tuple, kwargs: dict, overrides: dict | None = None):
    """Compile one recorded launch for sm_90 -> Triton's CompiledKernel. overrides: constexprs and
    options to set as on CUDA. Integers divisible by 16 and 16-byte-aligned tensors get Triton's
    divisibility hint, as its launcher gives them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = {**kwargs, **(overrides or {})}
    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
    values = dict(zip(kernel.arg_names, args, strict=False)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        signature[param.name] = _arg_type(value)
        aligned = (value.data_ptr() % 16 == 0 if isinstance(value, torch.Tensor)
                   else isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0)
        if aligned and param.name not in kernel.do_not_specialize:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", TARGET_ARCH, 32), options=options)


def cubin_tool(compiled, tool: str, *args: str) -> str:
    """stdout of one of the CUDA binary tools shipped with Triton (cuobjdump, nvdisasm) run on the compiled
    kernel's cubin with args before it."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([str(path), *args, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(compiled) -> dict[str, int]:
    """REG / STACK / LOCAL of the cubin (cuobjdump -res-usage, shipped with Triton) and DYNAMIC_SMEM, the
    shared memory Triton launches the kernel with."""
    out = cubin_tool(compiled, "cuobjdump", "-res-usage")
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", out)}
    return usage | {"DYNAMIC_SMEM": int(compiled.metadata.shared)}


# ---- the launches -------------------------------------------------------------------------------------


def _gemv_launches():
    """The decode GEMV as the engine launches it on an H200-sized GPU, per weight type, prefetch + PDL on."""
    from gguf import GGMLQuantizationType as QT

    import kernels.qmatmul as qm
    from tests.engine.gguf_builders import random_blocks

    rng = __import__("numpy").random.default_rng(0)
    # (type, shape, layout): the default (vector-metadata) layout, and the plain one kept for A/B runs
    for qtype, shape, vector_meta in ((QT.Q4_K, (1536, 1536), None), (QT.Q6_K, (1536, 8960), None),
                                      (QT.Q4_0, (8960, 1536), None), (QT.Q8_0, (256, 1536), None),
                                      (QT.Q5_K, (256, 1536), None), (QT.Q4_K, (1536, 1536), False),
                                      (QT.Q6_K, (1536, 8960), False)):
        w = qm.QuantizedWeight.from_bytes(random_blocks(qtype, shape, rng, max_abs=0.01), qtype, shape, "cpu",
                                          vector_meta=vector_meta)
        x = torch.zeros(1, shape[1], dtype=torch.float16)
        with recording(qm, "_qmatmul_kernel") as rec:
            qm.qmatmul(x, w)
        args, kwargs = rec.calls[0]
        layout = " plain layout" if vector_meta is False else ""
        yield (f"qmatmul GEMV {qtype.name} {shape[0]}x{shape[1]}{layout}", rec.kernel, args, kwargs,
               {"FAST": qtype in qm.FAST_TYPES, "PF_LINES": 4, "PF_META_LINES": 2, "PF_META_COLS": 2,
                "USE_GDC": True, "launch_pdl": True})


def _kv_launches():
    """K/V writes, decode (split + merge) and prefill attention, RoPE (alone and fused with the K/V writes),
    norm, activation, K scales, with the q4_0 cache recipe the engine uses (rotation, smoothing, equalization,
    sinks) and PDL on."""
    import kernels.decode_attention as da
    import kernels.k_scales as ks
    import kernels.k_write as kw
    import kernels.layer_ops as lo
    import kernels.prefill_attention as pa
    import kernels.rope_kv_write as rkw
    import kernels.v_write as vw
    import kernels.verify_attention as va
    from engine import hadamard, kv_quant

    pdl = {"PDL": True, "launch_pdl": True}
    h, hq, dim, cap, t = 2, 12, 128, 256, 16
    k_store = kv_quant.allocate("q4_0", (1, h, cap), dim, "cpu")
    v_store = kv_quant.allocate("q4_0", (1, h, cap), dim, "cpu")
    sinks = [torch.zeros(1, h, 4, dim, dtype=torch.float16) for _ in range(2)]
    rot = hadamard.make_rotation(dim)
    rows = torch.zeros(1, h, 1, dim)
    positions = torch.zeros(1, dtype=torch.int64)
    with recording(kw, "_k_write_kernel") as rec:
        kw.k_write(rows, k_store, mean=torch.zeros(h, dim), scale=torch.ones(h, dim), rotation=rot,
                   positions=positions, sink=sinks[0])
    yield "k_write q4_0 (smooth, equalize, rotate, sink)", rec.kernel, *rec.calls[0], pdl
    with recording(vw, "_v_write_kernel") as rec:
        vw.v_write(rows, v_store, positions=positions, sink=sinks[1])
    yield "v_write q4_0 (sink)", rec.kernel, *rec.calls[0], pdl
    q = torch.zeros(1, hq, dim)
    lengths = torch.full((1,), 100, dtype=torch.int32)
    with recording(da, "_decode_split_kernel") as split, recording(da, "_decode_reduce_kernel") as merge:
        da.decode_attention(q, k_store, v_store, lengths, max_length=cap, split_size=64, block_n=64,
                            k_sink=sinks[0], v_sink=sinks[1])
    on_cuda = {"FAST": True, "PREFETCH": True, **pdl}  # the inline-PTX dequantization and the L2 prefetch
    yield "decode split q4_0/q4_0 (sinks)", split.kernel, *split.calls[0], on_cuda
    yield "decode merge (sinks)", merge.kernel, *merge.calls[0], pdl
    rows = 16  # a verify step: 16 rows over one cache, 32 (row, head) pairs a program, or packed (long ones)
    for form, kernel in (("tile", "_tile_split_kernel"), ("packed", "_packed_split_kernel")):
        with recording(va, kernel) as rec, recording(da, "_decode_reduce_kernel"):
            va.verify_attention(torch.zeros(rows, hq, dim), k_store.shared_by(rows), v_store.shared_by(rows),
                                torch.full((rows,), 100, dtype=torch.int32), max_length=cap, split_size=64,
                                block_n=64, k_sink=sinks[0].expand(rows, -1, -1, -1),
                                v_sink=sinks[1].expand(rows, -1, -1, -1), form=form)
        yield f"verify split q4_0 (16 rows, sinks, {form})", rec.kernel, *rec.calls[0], on_cuda
    with recording(pa, "_prefill_attention_kernel") as rec:
        pa.prefill_attention(torch.zeros(1, hq, t, dim), k_store, v_store, 0, k_sink=sinks[0],
                             v_sink=sinks[1])
    yield "prefill attention q4_0/q4_0 (sinks)", rec.kernel, *rec.calls[0], pdl
    half = dim // 2
    cos, sin = torch.ones(cap, half), torch.zeros(cap, half)
    with recording(lo, "_rope_heads_kernel") as rec:
        f16 = torch.float16
        lo.rope_heads(torch.zeros(1, hq, dim, dtype=f16), torch.zeros(1, h, dim, dtype=f16),
                      positions, cos, sin, neox=True, rotation=rot, q_scale=torch.ones(h, dim))
    yield "rope_heads (Q scale + rotation)", rec.kernel, *rec.calls[0], pdl
    with recording(rkw, "_rope_kv_write_kernel") as rec:
        f16 = torch.float16
        qkv = torch.zeros(1, (hq + 2 * h) * dim, dtype=f16)  # the fused QKV output, sliced as the engine does
        q_in, k_in = qkv[:, : hq * dim].view(1, hq, dim), qkv[:, hq * dim : (hq + h) * dim].view(1, h, dim)
        v_in = qkv[:, (hq + h) * dim :].view(1, h, dim)
        rkw.rope_kv_write(q_in, k_in, v_in, positions, cos, sin, k_store, v_store, neox=True, rotation=rot,
                          k_scale=torch.ones(h, dim), mean=torch.zeros(h, dim), k_sink=sinks[0],
                          v_sink=sinks[1])
    yield "rope_kv_write q4_0/q4_0 (all K options, sinks)", rec.kernel, *rec.calls[0], pdl
    with recording(lo, "_add_rms_norm_kernel") as rec:
        lo.add_rms_norm(torch.zeros(1, 1536), torch.ones(1536), 1e-6, delta=torch.zeros(1, 1536))
    yield "add_rms_norm", rec.kernel, *rec.calls[0], pdl
    with recording(lo, "_gated_activation_kernel") as rec:
        gate = torch.zeros(1, 8960, dtype=torch.float16)
        lo.gated_activation(gate, gate.clone(), "silu")
    yield "gated_activation", rec.kernel, *rec.calls[0], pdl
    with recording(ks, "_k_scales_partial_kernel") as part, recording(ks, "_k_scales_finalize_kernel") as fin:
        ks.k_scales(torch.ones(t, h, dim), torch.ones(t, hq, dim), torch.zeros(h, dim))
    yield "k_scales partial", part.kernel, *part.calls[0], {}
    yield "k_scales finalize", fin.kernel, *fin.calls[0], {}
    yield from _split_output_launches(pdl)


def _split_output_launches(pdl: dict):
    """The decode step's readers of GEMV split partials (kernels/split_output.py) and the GEMV that leaves
    them, shaped as Qwen2.5-1.5B's (K-splits as the H200 launch has them)."""
    import numpy as np
    from gguf import GGMLQuantizationType as QT

    import kernels.layer_ops as lo
    import kernels.qmatmul as qm
    import kernels.rope_kv_write as rkw
    from engine import hadamard, kv_quant
    from kernels.split_output import SplitOutput
    from tests.engine.gguf_builders import random_blocks

    def partials(splits, n, bias=False):
        return SplitOutput(torch.zeros(splits, 16, n), torch.zeros(n) if bias else None, 1, torch.float16)

    rng = np.random.default_rng(0)
    w = qm.QuantizedWeight.from_bytes(random_blocks(QT.Q4_K, (1792, 1536), rng, max_abs=0.01), QT.Q4_K,
                                      (1792, 1536), "cpu")
    with recording(qm, "_qmatmul_kernel") as rec:
        qm.qmatmul(torch.zeros(1, 1536, dtype=torch.float16), w, torch.zeros(1792), split_output=True)
    yield ("qmatmul GEMV Q4_K 1792x1536 split_output", rec.kernel, *rec.calls[0],
           {"FAST": True, "PF_LINES": 4, "PF_META_LINES": 2, "USE_GDC": True, "launch_pdl": True})
    with recording(lo, "_add_rms_norm_kernel") as rec:
        lo.add_rms_norm(torch.zeros(1, 1536), torch.ones(1536), 1e-6, delta=partials(35, 1536))
    yield "add_rms_norm (delta: 35 splits)", rec.kernel, *rec.calls[0], pdl
    with recording(lo, "_gated_activation_kernel") as rec:
        gate, up = partials(3, 17920).split([8960, 8960])
        lo.gated_activation(gate, up, "silu")
    yield "gated_activation (3 splits)", rec.kernel, *rec.calls[0], pdl
    h, hq, dim, cap = 2, 12, 128, 256
    k_store, v_store = (kv_quant.allocate("q4_0", (1, h, cap), dim, "cpu") for _ in range(2))
    q_in, k_in = partials(12, (hq + h) * dim, bias=True).split([hq * dim, h * dim])
    half = dim // 2
    with recording(rkw, "_rope_kv_write_kernel") as rec:
        rkw.rope_kv_write(q_in, k_in, partials(12, h * dim, bias=True), torch.zeros(1, dtype=torch.int64),
                          torch.ones(cap, half), torch.zeros(cap, half), k_store, v_store, neox=True,
                          rotation=hadamard.make_rotation(dim), k_scale=torch.ones(h, dim),
                          mean=torch.zeros(h, dim))
    yield "rope_kv_write q4_0/q4_0 (Q/K/V: 12 splits, bias)", rec.kernel, *rec.calls[0], pdl


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_sm90: unset TRITON_INTERPRET (interpreted kernels cannot compile)", file=sys.stderr)
        return 2
    failures = 0
    print(f"{'kernel (sm_90)':48} {'regs':>5} {'local':>6} {'stack':>6} {'smem':>7} {'s':>5}")
    for name, kernel, args, kwargs, overrides in [*_gemv_launches(), *_kv_launches()]:
        started = time.perf_counter()
        try:
            use = resource_usage(compile_call(kernel, args, kwargs, overrides))
        except Exception as exc:  # report every kernel, then fail
            failures += 1
            print(f"{name:48} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        spilled = name.startswith("qmatmul") and use.get("LOCAL", 0) > 0
        failures += spilled
        print(f"{name:48} {use.get('REG', 0):5d} {use.get('LOCAL', 0):6d} {use.get('STACK', 0):6d} "
              f"{use['DYNAMIC_SMEM']:7d} {time.perf_counter() - started:5.1f}{'  SPILLS' if spilled else ''}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
