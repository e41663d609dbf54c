"""Op by op: do our layers, with llama.cpp's numerics emulated, reproduce llama.cpp's own op outputs?

    .venv/bin/python tests/tools/llama_op_check.py --models smollm2-135m,gemma-3-270m --n 16

llama.cpp (llama-cpp-python, CPU, flash attention off, as tests/tools/bench_fidelity.py runs it)
evaluates the first --n tokens of the code text once; an eval callback (cb_eval) copies every named
float32 tensor of its graph (attn_norm-3, Vcur-3, kqv_out-3, ffn_out-3, result_output, ...). Each of
our ops is then fed llama.cpp's OWN input of that op and compared with llama.cpp's output of it:
relative error ||ours - llama.cpp|| / ||llama.cpp||, the worst layer shown, once with the emulation
(tests/tools/llama_numerics.py) and once plain (float32, the engine as it is). Teacher-forcing each op
separates "the emulation reproduces llama.cpp's arithmetic" from what happens over a whole forward
pass, where 8-bit quantization turns float32-rounding-sized differences into flipped quanta.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import engine.kv_cache as kv_cache_module  # noqa: E402
from engine.models.transformer import apply_rope, rope_tables  # noqa: E402
from engine.session import Engine  # noqa: E402
from tests.tools import bench_fidelity as bf  # noqa: E402
from tests.tools.llama_numerics import LlamaNumerics, emulated_sdpa, ggml_gelu_tanh, ggml_rope_tables  # noqa: E402

GGML_F32, GGML_F16 = 0, 1


class GgmlTensor(ctypes.Structure):
    """The head of ggml.h's struct ggml_tensor (vendored ggml of llama-cpp-python 0.3.36)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


def llama_intermediates(model_path: str, ids: list[int], threads: int) -> dict[str, list[np.ndarray]]:
    """{tensor name: [every float32/f16 tensor of that name, in graph order, as (ne3, ne2, ne1, ne0)]}."""
    llama_cpp = bf.llama_module()
    import llama_cpp.llama as llama_module

    store: dict[str, list[np.ndarray]] = {}

    def callback(tensor_ptr, ask, user_data):
        if ask:
            return True  # yes, hand every tensor over once computed
        t = ctypes.cast(tensor_ptr, ctypes.POINTER(GgmlTensor)).contents
        if t.type not in (GGML_F32, GGML_F16) or not t.data:
            return True
        dtype, size = (np.float32, 4) if t.type == GGML_F32 else (np.float16, 2)
        ne, nb = list(t.ne), list(t.nb)
        span = sum((ne[i] - 1) * nb[i] for i in range(4)) + size
        raw = (ctypes.c_char * span).from_address(t.data)
        view = np.ndarray(tuple(reversed(ne)), dtype=dtype, buffer=raw, strides=tuple(reversed(nb)))
        store.setdefault(t.name.decode(), []).append(np.array(view, dtype=np.float32))
        return True

    c_callback = llama_cpp.ggml_backend_sched_eval_callback(callback)
    default_params = llama_module.llama_cpp.llama_context_default_params

    def params_with_callback():
        params = default_params()
        params.cb_eval, params.cb_eval_user_data = c_callback, None
        return params

    llama_module.llama_cpp.llama_context_default_params = params_with_callback
    try:
        llm = llama_cpp.Llama(model_path, n_ctx=len(ids) + 16, n_batch=512, n_ubatch=512, n_threads=threads,
                              n_threads_batch=threads, logits_all=True, verbose=False)
        store.clear()  # drop anything a warm-up graph produced
        llm.eval(ids)
    finally:
        llama_module.llama_cpp.llama_context_default_params = default_params
    del llm
    gc.collect()
    return store


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_model(model: str, n: int, threads: int) -> dict[str, tuple[float, float]]:
    """{op: (worst-layer relative error emulated, plain)} for one model."""
    path = bf.resolve_model(model)
    ids, _ = bf.tokenize_with_llamacpp(path, bf.TEXTS["code"].read_text(encoding="utf-8"))
    ids = ids[:n]
    store = llama_intermediates(path, ids, threads)
    numerics = LlamaNumerics()
    with numerics.loading():
        session = Engine.load(bf.engine_config(path, max(n, 16), threads, "exact", prefill_chunk=n))
    m, c = session.model, session.model.config

    def get(name: str, index: int = -1) -> torch.Tensor:
        return torch.from_numpy(store[name][index])

    def rows(name: str, index: int = -1) -> torch.Tensor:
        return get(name, index).reshape(n, -1)  # (T, features)

    def projection(name: str, module: torch.nn.Module) -> torch.Tensor:
        """(T, out) output of a Q/V projection: llama.cpp names it once after the matmul and once more
        after adding the bias (Qwen2), then again reshaped (and for Q after RoPE)."""
        has_bias = getattr(getattr(module, "inner", module), "bias", None) is not None
        return rows(name, 1 if has_bias else 0)

    worst: dict[str, list[float]] = {}

    def record(op: str, reference: torch.Tensor, fn: Callable[..., torch.Tensor], *args) -> None:
        with numerics.emulating():
            emulated = rel(fn(*args), reference)
        plain = rel(fn(*args), reference)
        best = worst.setdefault(op, [0.0, 0.0])
        best[0], best[1] = max(best[0], emulated), max(best[1], plain)

    def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return (ggml_gelu_tanh(gate) if numerics.active else F.gelu(gate, approximate="tanh")) * up

    def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up

    def roped(q_pre: torch.Tensor, rope_base: float) -> torch.Tensor:
        tables = (ggml_rope_tables if numerics.active else rope_tables)(
            positions, c.rope_dim, rope_base, c.rope_scale, m.rope_freq_factors)
        return apply_rope(q_pre, *tables, c.rope_neox)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
        sdpa = emulated_sdpa if numerics.active else kv_cache_module._sdpa
        out = sdpa(q, k, v, 0, 0, c.attn_scale, window)  # (H, T, D)
        return out.transpose(0, 1).reshape(n, heads * head_dim)

    heads, kv_heads, head_dim = c.n_heads, c.n_kv_heads, c.head_dim
    positions = torch.arange(n)
    with torch.inference_mode():
        for i, layer in enumerate(m.layers):
            h = rows(f"attn_norm-{i}")
            record("attn V projection", projection(f"Vcur-{i}", layer.wv), layer.wv, h)
            record("attn Q projection", projection(f"Qcur-{i}", layer.wq), layer.wq, h)
            f = rows(f"ffn_norm-{i}")
            record("ffn gate projection", rows(f"ffn_gate-{i}"), layer.w_gate, f)
            record("ffn up projection", rows(f"ffn_up-{i}"), layer.w_up, f)
            gelu = f"ffn_geglu-{i}" in store
            act = rows(f"ffn_geglu-{i}" if gelu else f"ffn_swiglu-{i}")
            record("ffn down projection", rows(f"ffn_out-{i}"), layer.w_down, act)
            gate, up = rows(f"ffn_gate-{i}"), rows(f"ffn_up-{i}")
            if gelu:
                record("GELU(tanh) * up", act, geglu, gate, up)
            else:
                record("SiLU * up (not emulated)", act, swiglu, gate, up)

            # RoPE: llama.cpp's pre-rope Q (after the Q norm where the model has one) -> its post-rope Q
            q_post = get(f"Qcur-{i}").reshape(n, heads, head_dim)  # (T, H, D), named after RoPE
            if f"Qcur_normed-{i}" in store:
                q_pre = get(f"Qcur_normed-{i}").reshape(n, heads, head_dim)
            else:
                q_pre = get(f"Qcur-{i}", -2).reshape(n, heads, head_dim)
            record("RoPE", q_post, roped, q_pre, layer.rope_base)

            # attention: llama.cpp's roped Q, K and V (K, V through the f16 cache) -> its kqv_out
            k = get(f"Kcur-{i}").reshape(n, kv_heads, head_dim).transpose(0, 1).half().float()  # (Hkv, T, D)
            v = rows(f"Vcur-{i}").reshape(n, kv_heads, head_dim).transpose(0, 1).half().float()
            record("attention (Q.K, softmax, .V)", rows(f"kqv_out-{i}"), attend, q_post.transpose(0, 1), k, v,
                   layer.window)
            if f"attn_out-{i}" in store:
                record("attn output projection", rows(f"attn_out-{i}"), layer.wo, rows(f"kqv_out-{i}"))
        record("LM head", rows("result_output"), m.lm_head, rows("result_norm"))
    del session
    gc.collect()
    return {op: (e, p) for op, (e, p) in worst.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(bf.MODELS))
    p.add_argument("--n", type=int, default=16, help="tokens of the code text")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"Command: `.venv/bin/python tests/tools/llama_op_check.py {' '.join(argv or sys.argv[1:])}`\n")
    print("| model | op (our module fed llama.cpp's input) | rel. error emulated | rel. error plain |")
    print("|---|---|---|---|")
    for model in args.models.split(","):
        for op, (emulated, plain) in check_model(model, args.n, args.threads).items():
            print(f"| {model} | {op} | {emulated:.1e} | {plain:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
