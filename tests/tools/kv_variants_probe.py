"""Exploration harness for KV-cache quality recipes (the probe behind docs/kv-quality-run.md).

Not the shipped code: `VariantCache` re-implements KVCache.write/attention with extra switches
(per-channel K scales of several kinds, V smoothing/rotation/scaling, statistics from only the first
N tokens) so recipes can be compared before one is built into engine/. The shipped recipe is
engine/k_equalize.py, measured by tests/tools/bench_kv.py.

    .venv/bin/python -m tests.tools.kv_variants_probe --models qwen2.5-coder-0.5b --variants '[["eq", "q4_0",
        "q4_0", {"rot": true, "smooth": true, "kscale": "rms", "alpha": 0.5, "pow2": true}]]'

A variant is [name, K type, V type, switches]: rot, smooth (K mean); kscale "rms" | "max" | "absmean"
(+ "q" in the name: divided by the query channel RMS, floored at 1/16 of the head's) with alpha (the
exponent), floor (fraction of the head RMS), pow2 (round the scales to powers of two), tie ("auto":
one scale per RoPE pair); vsmooth, vrot, vscale (exponent) on V; stats_tokens (statistics from the
first N tokens only; the text still runs as one chunk); sink (the first N positions of K and V kept
in f16, as the engine's attention sinks: 0 unless given), seed (the rotation's seed), layers (a list:
only these layers' K/V are quantized, the rest f16, to see one layer's share of the damage). Prints
perplexity, its change against the
f16 cache, the mean KL divergence from the f16 cache's next-token distribution and top-1 agreement.
Statistics come from the first chunk (pos == 0), which is the whole 512-token text here.
"""

import argparse
import json
import math
import time

import torch

from engine.api import EngineConfig
from engine.cli import resolve_model
from engine.hadamard import make_rotation, rotate, unrotate
from engine.kv_cache import KVCache, _sdpa
from engine.session import Engine
from tests.tools.bench_kv import TEXTS


class VariantCache(KVCache):
    def __init__(
        self,
        *a,
        kscale=None,
        alpha=1.0,
        vrot=False,
        vsmooth=False,
        vscale=None,
        tie=None,
        stats_tokens=None,
        floor=0.0,
        pow2=False,
        sink=0,
        seed=None,
        layers=None,
        **kw,
    ):
        super().__init__(*a, sink_tokens=0, **kw)
        if seed is not None and self.rotation is not None:
            self.rotation = make_rotation(self.head_dim, seed)
        self.sink, self.layers = sink, None if layers is None else set(layers)
        self.tie, self.stats_tokens, self.floor, self.pow2 = tie, stats_tokens, floor, pow2
        self.kscale, self.alpha, self.vrot, self.vsmooth, self.vscale = kscale, alpha, vrot, vsmooth, vscale
        n = len(self.k)
        self.s = [None] * n
        self.vm = [None] * n
        self.vs = [None] * n
        self.pending = [None] * n
        self.vrotation = make_rotation(self.head_dim) if vrot else None
        # dequantized K/V (or their f16 values where a variant keeps them): (n_kv, max_len, D) float32
        shape = (self.n_kv_heads, self.max_len, self.head_dim)
        self.kv_f32 = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(n)]

    def write(self, layer, pos, k, v):
        if self.kscale and "q" in self.kscale and pos == 0:
            self.pending[layer] = (k, v)
            return  # wait for q
        self._write(layer, pos, k, v)

    def _write(self, layer, pos, k, v, q=None):
        n_new = k.shape[0]
        k = k.transpose(0, 1).to(torch.float32)
        v = v.transpose(0, 1).to(torch.float32)
        if pos == 0:
            ks = k if self.stats_tokens is None else k[:, : self.stats_tokens]
            self.k_mean[layer] = ks.mean(1) if self.k_smooth else torch.zeros_like(k[:, 0])
            kc = ks - self.k_mean[layer][:, None]
            if self.kscale:
                if self.kscale.startswith("rms"):
                    s = kc.pow(2).mean(1).sqrt()
                elif self.kscale.startswith("max"):
                    s = kc.abs().amax(1)
                elif self.kscale.startswith("absmean"):
                    s = kc.abs().mean(1)
                if "q" in self.kscale:  # q: (H, T, D) -> per kv head
                    g = q.shape[0] // k.shape[0]
                    qr = q.reshape(k.shape[0], g, -1, q.shape[-1]).pow(2).mean((1, 2)).sqrt()
                    if self.stats_tokens is not None:
                        qr = (
                            q.reshape(k.shape[0], g, -1, q.shape[-1])[:, :, : self.stats_tokens]
                            .pow(2)
                            .mean((1, 2))
                            .sqrt()
                        )
                    qh = qr.pow(2).mean(-1, keepdim=True).sqrt()
                    qr = torch.maximum(qr, qh / 16)
                    kh = s.pow(2).mean(-1, keepdim=True).sqrt()
                    s = torch.maximum(s, kh / 16)
                    s = s / qr
                if self.floor:
                    s = torch.maximum(s, self.floor * s.pow(2).mean(-1, keepdim=True).sqrt())
                if self.tie is not None:  # equal scale within each RoPE pair
                    D = s.shape[-1]
                    if self.tie == "neox":
                        p = (s[:, : D // 2].pow(2) + s[:, D // 2 :].pow(2)).div(2).sqrt()
                        s = torch.cat([p, p], -1)
                    else:
                        p = (s[:, 0::2].pow(2) + s[:, 1::2].pow(2)).div(2).sqrt()
                        s = torch.stack([p, p], -1).reshape(s.shape)
                s = s.clamp_min(1e-6).pow(self.alpha)
                s = s / s.pow(2).mean(-1, keepdim=True).sqrt()  # normalise (irrelevant in exact math)
                if self.pow2:
                    s = torch.exp2(torch.round(torch.log2(s)))
                self.s[layer] = s
            self.vm[layer] = v.mean(1) if self.vsmooth else torch.zeros_like(v[:, 0])
            if self.vscale:
                vc = v - self.vm[layer][:, None]
                s = vc.pow(2).mean(1).sqrt().clamp_min(1e-6).pow(self.vscale)
                self.vs[layer] = s / s.pow(2).mean(-1, keepdim=True).sqrt()
        k = k - self.k_mean[layer][:, None]
        if self.s[layer] is not None:
            k = k / self.s[layer][:, None]
        if self.rotation is not None:
            k = rotate(k, self.rotation)
        v = v - self.vm[layer][:, None]
        if self.vs[layer] is not None:
            v = v / self.vs[layer][:, None]
        if self.vrotation is not None:
            v = rotate(v, self.vrotation)
        if self.layers is None or layer in self.layers:
            kq = self._decode(self._encode(k, self.k_type))  # (n_kv, T, D) float32
            vq = self._decode(self._encode(v, self.v_type))
        else:
            kq, vq = k.half().float(), v.half().float()
        n_sink = min(self.sink - pos, n_new)
        if n_sink > 0:
            kq[:, :n_sink], vq[:, :n_sink] = k[:, :n_sink].half().float(), v[:, :n_sink].half().float()
        self.kv_f32[layer][0][:, pos : pos + n_new] = kq
        self.kv_f32[layer][1][:, pos : pos + n_new] = vq

    def attention(self, layer, q, pos, scale, window):
        n_new = q.shape[0]
        qh = q.transpose(0, 1).to(torch.float32)  # (H, T, D)
        if self.pending[layer] is not None:
            k, v = self.pending[layer]
            self.pending[layer] = None
            self._write(layer, pos, k, v, q=qh)
        first = 0 if window is None else max(0, pos - window + 1)
        k = self.kv_f32[layer][0][:, first : pos + n_new]  # (n_kv, L, D) dequantized
        v = self.kv_f32[layer][1][:, first : pos + n_new]
        g = qh.shape[0] // k.shape[0]
        if self.s[layer] is not None:
            qh = qh * self.s[layer].repeat_interleave(g, 0)[:, None]
        if self.rotation is not None:
            qh = rotate(qh, self.rotation)
        out = _sdpa(qh, k, v, first, pos, scale, window)  # (H, T, D)
        if self.vrotation is not None:
            out = unrotate(out, self.vrotation)
        if self.vs[layer] is not None:
            out = out * self.vs[layer].repeat_interleave(g, 0)[:, None]
        out = out + self.vm[layer].repeat_interleave(g, 0)[:, None]
        return out.transpose(0, 1)


def logits_all(session, ids):
    session.cached_ids = []
    return session.prefill(ids, 0, logits_for="all").float()  # (n, vocab)


def ppl_kl(logits, ref_logp, ids):
    logp = torch.log_softmax(logits[:-1], -1)
    nll = -logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # KL(f16 || quant) per position
    top1 = (logp.argmax(-1) == ref_logp.argmax(-1)).float().mean()
    return math.exp(float(nll.mean())), float(kl.mean()), float(top1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+")
    p.add_argument("--texts", nargs="+", default=["code", "prose"])
    p.add_argument(
        "--variants", required=True, help="JSON list of [name, kv_k, kv_v, switches], or a .json file"
    )
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    variants = json.loads(open(a.variants).read()) if a.variants.endswith(".json") else json.loads(a.variants)
    for key in a.models:
        sess = Engine.load(EngineConfig(model=resolve_model(key), context_length=520, threads=a.threads))
        c = sess.model.config
        for tn in a.texts:
            text = (TEXTS / ("code.py.txt" if tn == "code" else "prose.txt")).read_text(encoding="utf-8")
            ids = sess.tokenizer.encode(text, add_bos=sess.tokenizer.add_bos, parse_special=False)[:512]
            sess.cache = KVCache(c.n_layers, c.n_kv_heads, c.head_dim, sess.max_len, "f16", "f16")
            ref = logits_all(sess, ids)
            ref_logp = torch.log_softmax(ref[:-1], -1)
            base, _, _ = ppl_kl(ref, ref_logp, ids)
            print(f"{key} {tn} f16 {base:.4f}", flush=True)
            for name, kk, vv, kw in variants:
                t = time.time()
                kw = dict(kw)
                rot = kw.pop("rot", False)
                sm = kw.pop("smooth", False)
                if kw.get("tie") == "auto":
                    kw["tie"] = "neox" if c.rope_neox else "normal"
                sess.cache = VariantCache(
                    c.n_layers,
                    c.n_kv_heads,
                    c.head_dim,
                    sess.max_len,
                    kk,
                    vv,
                    rotate_k=rot,
                    k_smooth=sm,
                    **kw,
                )
                ppl, kl, top1 = ppl_kl(logits_all(sess, ids), ref_logp, ids)
                change = 100 * (ppl / base - 1)
                print(
                    f"{key} {tn} {name} ppl {ppl:.4f} {change:+.2f}% KL {kl:.4f} top1 {top1:.3f} "
                    f"({time.time() - t:.0f}s)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
