"""Small fused kernels of a transformer layer on the GPU, each with its torch reference.

The CUDA engine path (engine/models/cuda_transformer.py) runs a decode step as a CUDA graph of a
few hundred launches; every elementwise op that torch would run as 3-10 separate kernels is one
launch here:

- `add_rms_norm`: residual += delta * delta_scale (optionally RMS-normed first: Gemma's post-norms),
  then h = RMSNorm(residual) in the activation dtype. The residual stream stays float32, updated in place.
- `rope_heads`: per head of Q and K: optional RMSNorm (qwen3/gemma3 Q/K norms), RoPE at per-row
  positions read from a device tensor (so a captured graph replays at any position), and for Q the
  K cache's equalization scales and Walsh–Hadamard rotation (the same butterfly as kernels.k_write).
  Outputs float32.
- `gated_activation`: act(gate) * up * scale (SiLU or tanh-GELU) in the activation dtype. With a
  power-of-two scale (exact) the engine keeps the FFN-down matmul's float16 output far from overflow and
  undoes the scale in float32 when adding it to the residual.

`add_rms_norm`'s delta, `gated_activation`'s gate and up (and kernels.rope_kv_write's Q/K/V) may be a
kernels.split_output.SplitOutput, a GEMV's K-split partial sums, which they add while loading (the
same bits as the tensor the GEMV would have stored).

Every kernel works row by row (no reduction across rows), so a row's result does not depend on how
many rows are in the launch: speculative verify blocks reproduce single-token decode bit for bit.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.hadamard import Rotation, rotate
from kernels.kv_blocks import _fwht_rows
from kernels.pdl import pdl_launch, wait_for_previous
from kernels.split_output import SplitOutput, dtype_constexpr, input_args, load_input, value_of

log = logging.getLogger(__name__)

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


# ---- references ----------------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., D) float32; the same expression as engine.models.transformer.rms_norm."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def add_rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None,
    delta_weight: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
    delta_scale: float = 1.0,
) -> torch.Tensor:
    """x: (T, D) float32, updated in place: x += delta * delta_scale (RMS-normed with delta_weight first
    if given). Returns RMSNorm(x) * weight as (T, D) out_dtype."""
    if delta is not None:
        d = value_of(delta).to(torch.float32) * delta_scale
        if delta_weight is not None:
            d = rms_norm_reference(d, delta_weight, eps)
        x += d
    return rms_norm_reference(x, weight, eps).to(out_dtype)


def rope_heads_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
    neox: bool, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
    rotation: Rotation | None = None, q_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (T, Hq, D), k: (T, Hkv, D) any float; positions (T,) (negative = padding, treated as 0);
    cos, sin: (P, rope_dim / 2) tables. Returns float32 (q, k); q multiplied by the K-equalization
    scales q_scale (Hkv, D) (query head h by row h // (Hq / Hkv)) and then rotated, when given."""
    from engine.models.transformer import apply_rope

    pos = positions.to(torch.long).clamp_min(0)
    c, s = cos[pos], sin[pos]  # (T, half)
    q, k = q.to(torch.float32), k.to(torch.float32)
    if q_norm is not None:
        q = rms_norm_reference(q, q_norm, eps)
        k = rms_norm_reference(k, k_norm, eps)
    q, k = apply_rope(q, c, s, neox), apply_rope(k, c, s, neox)
    if q_scale is not None:
        q = q * q_scale.repeat_interleave(q.shape[1] // q_scale.shape[0], dim=0)  # (T, Hq, D), exact
    if rotation is not None:
        q = rotate(q, rotation)
    return q, k


def gated_activation_reference(
    gate: torch.Tensor, up: torch.Tensor, activation: str, scale: float = 1.0
) -> torch.Tensor:
    gate, up = value_of(gate), value_of(up)
    g = gate.to(torch.float32)
    g = F.gelu(g, approximate="tanh") if activation == "gelu_tanh" else F.silu(g)
    return (g * up.to(torch.float32) * scale).to(gate.dtype)


# ---- add + RMSNorm -------------------------------------------------------------------------------


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, stride_x, delta_ptr, stride_d, split_stride_d, delta_bias_ptr, dw_ptr, w_ptr, out_ptr, stride_o,
    N, eps, delta_scale,
    BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr, DELTA_NORM: tl.constexpr, DELTA_SPLITS: tl.constexpr,
    DELTA_BIAS: tl.constexpr, DELTA_DTYPE: tl.constexpr, PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    # The norm weights first: no kernel writes them, so their loads need not wait; used after the row's
    # reduction, they otherwise came in a round of loads of their own at the end of the chain (SASS:
    # after the barrier). H200, `profile_decode_gpu --pdl --ab` with a switch since removed: decode step
    # f16 at depth 16 1130 -> 1126 us, q4_0 at 4096 1307 -> 1297, 16-row verify 1450 -> 1451.
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # [BLOCK]
    if DELTA_NORM:
        dw = tl.load(dw_ptr + cols, mask=mask, other=0.0)  # [BLOCK]
    wait_for_previous(PDL)  # PDL launch: wait for the kernel before; the GEMV after may start its prefetch
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = load_input(delta_ptr, row * stride_d + cols, mask, split_stride_d, delta_bias_ptr, cols,
                       DELTA_SPLITS, DELTA_BIAS, DELTA_DTYPE).to(tl.float32) * delta_scale
        if DELTA_NORM:
            dr = tl.math.rsqrt(tl.sum(d * d, axis=0) / N + eps)
            d = d * dr * dw
        x = x + d
        tl.store(x_ptr + row * stride_x + cols, x, mask=mask)
    r = tl.math.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    h = x * r * w
    tl.store(out_ptr + row * stride_o + cols, h.to(out_ptr.dtype.element_ty), mask=mask)


def norm_warps(block: int) -> int:
    """Warps of an add_rms_norm program (one row, `block` = the row's columns rounded up to a power of two).

    Blocks of 2048 or more take 32 warps: with a split delta (the engine's decode step: 10-35 splits of
    1536 columns) a program then has four times the loads in flight. On an H200 (Qwen2.5-1.5B layout,
    depth 4096, `python3 -m tests.tools.tune_decode_gpu --set readers`) the decode step went 1524 -> 1478
    us (f16) and 1621 -> 1579 (q4_0) against 8 warps, the 16-row verify 1913 -> 1916; 4 warps cost +5 %.
    Prefill pp2048 (plain input) lost under 1 %: 72408 -> 71765 tok/s (f16), 59991 -> 59452 (q4_0),
    medians of 4. Split or not, a row takes the same warps, so its RMS sum runs in the same order either
    way (the TANDEM_SPLIT_OUTPUT A/B changes no bit). Blocks of 4096 and more (d_model > 2048) take 32
    too, not measured."""
    return 32 if block >= 2048 else max(1, block // 256)


def add_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | SplitOutput | None = None,
    delta_weight: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
    delta_scale: float = 1.0, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kernel of `add_rms_norm_reference`: x (T, D) float32 updated in place, returns (T, D) out_dtype.
    delta: (T, D) with contiguous rows, or a SplitOutput of that shape. weight and delta_weight are read
    before the PDL wait: no kernel still running may write them (the model's norm weights)."""
    rows, n = x.shape
    if x.dtype != torch.float32 or x.stride(-1) != 1:
        raise ValueError("the residual stream must be a float32 (T, D) tensor with contiguous rows")
    if delta is not None and tuple(delta.shape) != tuple(x.shape):
        raise ValueError(f"delta {tuple(delta.shape)} does not match x {tuple(x.shape)}")
    d_ptr, d_stride, d_split_stride, d_splits, d_bias = input_args(x if delta is None else delta)
    out = torch.empty(rows, n, dtype=out_dtype, device=x.device) if out is None else out
    if rows == 0:
        return out
    block = triton.next_power_of_2(n)
    _add_rms_norm_kernel[(rows,)](
        x, x.stride(0), d_ptr, 0 if delta is None else d_stride, d_split_stride,
        weight if d_bias is None else d_bias,
        weight if delta_weight is None else delta_weight, weight, out, out.stride(0), n, eps, delta_scale,
        BLOCK=block, HAS_DELTA=delta is not None, DELTA_NORM=delta_weight is not None,
        DELTA_SPLITS=d_splits, DELTA_BIAS=d_bias is not None,
        DELTA_DTYPE=dtype_constexpr(x if delta is None else delta),
        num_warps=norm_warps(block), **pdl_launch(x.device),
    )
    return out


# ---- per-head norm + RoPE (+ Q rotation) ---------------------------------------------------------


@triton.jit
def _rope_head(
    src_ptr, norm_ptr, cos_ptr, sin_ptr, scale_ptr, s1_ptr, s2_ptr, rot_scale, eps,
    D: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr, HEAD_NORM: tl.constexpr,
    SCALE: tl.constexpr, ROTATE: tl.constexpr, G: tl.constexpr, LOG2_G: tl.constexpr,
    split_stride, bias_ptr, SPLITS: tl.constexpr, BIAS: tl.constexpr, DTYPE: tl.constexpr,
):
    """One head (D,) at src_ptr -> [D] fp32: optional RMSNorm, RoPE (cos_ptr / sin_ptr: the position's
    table rows), optional scales (SCALE) and WHT rotation (ROTATE). SPLITS > 0: src_ptr is the head in a
    SplitOutput's partials and bias_ptr its bias (kernels/split_output.py)."""
    cols = tl.arange(0, D)
    rotated = cols < 2 * HALF
    if NEOX:  # pairs (i, i + HALF)
        upper = cols >= HALF
        partner = tl.where(upper, cols - HALF, cols + HALF)
        j = tl.where(upper, cols - HALF, cols)
    else:  # pairs (2i, 2i + 1)
        upper = (cols % 2) == 1
        partner = tl.where(upper, cols - 1, cols + 1)
        j = cols // 2
    partner = tl.where(rotated, partner, cols)
    j = tl.where(rotated, j, 0)
    whole = cols < D  # all true
    x = load_input(src_ptr, cols, whole, split_stride, bias_ptr, cols, SPLITS, BIAS,
                   DTYPE).to(tl.float32)  # [D]
    xp = load_input(src_ptr, partner, whole, split_stride, bias_ptr, partner, SPLITS, BIAS,
                    DTYPE).to(tl.float32)  # [D] the pair partner of each channel
    if HEAD_NORM:
        r = tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        x = x * r * tl.load(norm_ptr + cols)
        xp = xp * r * tl.load(norm_ptr + partner)
    c = tl.load(cos_ptr + j)
    s = tl.load(sin_ptr + j)
    # lower element of a pair: a*cos - b*sin; upper: a*sin + b*cos (a = lower, b = upper), as apply_rope
    y = tl.where(upper, xp * s + x * c, x * c - xp * s)
    y = tl.where(rotated, y, x)
    if SCALE:  # K equalization: Q times the (power-of-two) scales K was divided by, exact
        y = y * tl.load(scale_ptr + cols)
    if ROTATE:
        gl = tl.arange(0, G)
        yg = tl.reshape(y, (D // G, G)) * tl.load(s1_ptr + gl)[None, :]
        yg = _fwht_rows(yg, D // G, G, LOG2_G)
        yg = yg * tl.load(s2_ptr + gl)[None, :]
        y = tl.reshape(yg * rot_scale, (D,))
    return y


@triton.jit
def _rope_one_head(
    src_ptr, dst_ptr, norm_ptr, cos_ptr, sin_ptr, scale_ptr, s1_ptr, s2_ptr, rot_scale, eps,
    D: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr, HEAD_NORM: tl.constexpr,
    SCALE: tl.constexpr, ROTATE: tl.constexpr, G: tl.constexpr, LOG2_G: tl.constexpr,
    split_stride, bias_ptr, SPLITS: tl.constexpr, BIAS: tl.constexpr, DTYPE: tl.constexpr,
):
    y = _rope_head(src_ptr, norm_ptr, cos_ptr, sin_ptr, scale_ptr, s1_ptr, s2_ptr, rot_scale, eps,
                   D, HALF, NEOX, HEAD_NORM, SCALE, ROTATE, G, LOG2_G, split_stride, bias_ptr, SPLITS, BIAS,
                   DTYPE)  # [D] fp32
    tl.store(dst_ptr + tl.arange(0, D), y)


@triton.jit
def _rope_heads_kernel(
    q_ptr, stride_qt, k_ptr, stride_kt, qo_ptr, ko_ptr, pos_ptr, cos_ptr, sin_ptr, stride_cs,
    qn_ptr, kn_ptr, qs_ptr, s1_ptr, s2_ptr, rot_scale, eps, HQ, HKV,
    D: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr, HEAD_NORM: tl.constexpr,
    SCALE_Q: tl.constexpr, ROTATE_Q: tl.constexpr, G: tl.constexpr, LOG2_G: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous(PDL)  # PDL launch: wait for the kernel before (kernels/pdl.py)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.maximum(tl.load(pos_ptr + t), 0).to(tl.int64)  # padding rows (-1) read position 0
    cos_row = cos_ptr + pos * stride_cs
    sin_row = sin_ptr + pos * stride_cs
    if h < HQ:
        _rope_one_head(q_ptr + t * stride_qt + h * D, qo_ptr + (t * HQ + h) * D, qn_ptr, cos_row, sin_row,
                       qs_ptr + (h // (HQ // HKV)) * D, s1_ptr, s2_ptr, rot_scale, eps, D, HALF, NEOX,
                       HEAD_NORM, SCALE_Q, ROTATE_Q, G, LOG2_G, 0, q_ptr, 0, False, tl.float16)
    else:
        hk = h - HQ
        _rope_one_head(k_ptr + t * stride_kt + hk * D, ko_ptr + (t * HKV + hk) * D, kn_ptr, cos_row, sin_row,
                       qs_ptr, s1_ptr, s2_ptr, rot_scale, eps, D, HALF, NEOX, HEAD_NORM, False, False, G,
                       LOG2_G, 0, k_ptr, 0, False, tl.float16)


def rope_num_warps(head_dim: int) -> int:
    """Warps of a one-head-per-program RoPE launch (rope_heads, kernels.rope_kv_write): the head norm's
    sum runs in this layout, so both launch it alike."""
    return 1 if head_dim <= 128 else 2


def rope_heads(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
    neox: bool, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
    rotation: Rotation | None = None, q_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel of `rope_heads_reference`. q: (T, Hq, D) and k: (T, Hkv, D) with contiguous heads (row
    strides free: they may be column slices of one fused QKV output). q_scale: (Hkv, D) contiguous
    float32 K-equalization scales (a fixed buffer in a captured graph) or None.
    Returns float32 (T, Hq, D), (T, Hkv, D)."""
    t, hq, dim = q.shape
    hkv = k.shape[1]
    if k.shape[0] != t or k.shape[2] != dim or q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)}: need (T, H, D) with contiguous heads")
    if q.stride(1) != dim or k.stride(1) != dim:
        raise ValueError("the heads of a row must be contiguous")
    if dim & (dim - 1):
        raise ValueError(f"rope_heads needs a power-of-two head_dim, got {dim}")
    half = cos.shape[1]
    if cos.stride(1) != 1 or sin.stride() != cos.stride() or 2 * half > dim:
        raise ValueError("cos/sin tables must be contiguous (P, rope_dim / 2) with rope_dim <= head_dim")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("pass both Q and K head norms, or neither")
    if q_scale is not None and (q_scale.shape != (hkv, dim) or q_scale.dtype != torch.float32
                                or not q_scale.is_contiguous() or hq % hkv):
        raise ValueError(f"q_scale must be a contiguous ({hkv}, {dim}) float32 tensor")
    q_out = torch.empty(t, hq, dim, dtype=torch.float32, device=q.device)
    k_out = torch.empty(t, hkv, dim, dtype=torch.float32, device=q.device)
    if t == 0:
        return q_out, k_out
    rot = rotation
    if rot is not None and rot.s1.device != q.device:
        rot = rot.to(q.device)
    group = rot.group if rot is not None else 32
    dummy = cos
    _rope_heads_kernel[(t, hq + hkv)](
        q, q.stride(0), k, k.stride(0), q_out, k_out, positions, cos, sin, cos.stride(0),
        dummy if q_norm is None else q_norm, dummy if k_norm is None else k_norm,
        dummy if q_scale is None else q_scale,
        dummy if rot is None else rot.s1, dummy if rot is None else rot.s2,
        1.0 if rot is None else rot.scale, eps, hq, hkv,
        D=dim, HALF=half, NEOX=neox, HEAD_NORM=q_norm is not None, SCALE_Q=q_scale is not None,
        ROTATE_Q=rot is not None,
        G=group, LOG2_G=group.bit_length() - 1, num_warps=rope_num_warps(dim),
        enable_fp_fusion=False, **pdl_launch(q.device),
    )  # no FMA contraction: kernels.rope_kv_write computes the same values in a launch that needs none
    return q_out, k_out


# ---- act(gate) * up ------------------------------------------------------------------------------


@triton.jit
def _gated_activation_kernel(
    g_ptr, stride_g, split_stride_g, g_bias_ptr, u_ptr, stride_u, split_stride_u, u_bias_ptr, o_ptr, stride_o,
    N, scale, BLOCK: tl.constexpr, ACT: tl.constexpr, G_SPLITS: tl.constexpr, G_BIAS: tl.constexpr,
    U_SPLITS: tl.constexpr, U_BIAS: tl.constexpr, IN_DTYPE: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)  # PDL launch: wait for the kernel before; the FFN-down GEMV may start
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = load_input(g_ptr, row * stride_g + cols, mask, split_stride_g, g_bias_ptr, cols, G_SPLITS, G_BIAS,
                   IN_DTYPE).to(tl.float32)
    u = load_input(u_ptr, row * stride_u + cols, mask, split_stride_u, u_bias_ptr, cols, U_SPLITS, U_BIAS,
                   IN_DTYPE).to(tl.float32)
    if ACT == 0:  # SiLU
        a = g / (1.0 + tl.exp(-g))
    else:  # GELU, tanh approximation; tanh(z) = 1 - 2 / (exp(2z) + 1), 2z capped where tanh is 1 in fp32
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (2.0 - 2.0 / (tl.exp(tl.minimum(2.0 * z, 80.0)) + 1.0))
    tl.store(o_ptr + row * stride_o + cols, (a * u * scale).to(o_ptr.dtype.element_ty), mask=mask)


def activation_block(n: int, splits: int) -> int:
    """Columns per gated_activation program (`splits`: the inputs' K-splits, 0 for tensors).

    Split inputs (the decode step) take 256-column programs: 35 programs for 8960 columns instead of 5,
    each with 2 x splits loads of 2 columns a thread. H200, as in `norm_warps` (`--set readers`): decode
    1524 -> 1479 us (f16), 1621 -> 1577 (q4_0), 16-row verify 1913 -> 1836; 512 columns was as fast for
    one row but slower for 16 (2099)."""
    if splits:
        return min(256, triton.next_power_of_2(n))
    return min(2048, triton.next_power_of_2(n))


def gated_activation(
    gate: torch.Tensor | SplitOutput, up: torch.Tensor | SplitOutput, activation: str, scale: float = 1.0
) -> torch.Tensor:
    """Kernel of `gated_activation_reference`: gate, up (T, F) (row strides free; or SplitOutputs of that
    shape) -> (T, F) gate.dtype."""
    rows, n = gate.shape
    if tuple(up.shape) != tuple(gate.shape) or up.dtype != gate.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} / up {tuple(up.shape)}: need two (T, F) of one dtype")
    g_ptr, g_stride, g_split_stride, g_splits, g_bias = input_args(gate)
    u_ptr, u_stride, u_split_stride, u_splits, u_bias = input_args(up)
    out = torch.empty(rows, n, dtype=gate.dtype, device=gate.device)
    if rows == 0:
        return out
    block = activation_block(n, max(g_splits, u_splits))
    _gated_activation_kernel[(rows, triton.cdiv(n, block))](
        g_ptr, g_stride, g_split_stride, out if g_bias is None else g_bias,
        u_ptr, u_stride, u_split_stride, out if u_bias is None else u_bias, out, out.stride(0), n, scale,
        BLOCK=block, ACT=ACTIVATIONS[activation], G_SPLITS=g_splits, G_BIAS=g_bias is not None,
        U_SPLITS=u_splits, U_BIAS=u_bias is not None, IN_DTYPE=dtype_constexpr(gate), num_warps=4,
        **pdl_launch(gate.device),
    )
    return out
