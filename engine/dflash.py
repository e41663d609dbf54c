"""DFlash block-diffusion draft (z-lab format: `config.json` + `model.safetensors`), DESIGN.md.

The draft has Qwen3-style decoder layers but no embedding and no LM head: it borrows the target's.
Its context is the target's own hidden states after layers `dflash_config.target_layer_ids`
(HF indexing: hidden_states[i + 1] = output of layer i, i.e. our layer i), concatenated, projected
by `fc` (no bias) and normalised by `hidden_norm`. Every draft layer attends non-causally over
[K/V of the context ; K/V of the block], queries from the block only. The block is [last verified
token, mask x (B - 1)] at absolute positions; its rows 1..B-1, through the draft's `norm` and the
target's LM head, are the B - 1 drafted tokens, all from one forward pass.
Only the context K/V are cached (position-indexed, like the target cache); the block's K/V are
recomputed every step.

Tensor names (z-lab checkpoints): fc.weight, hidden_norm.weight, norm.weight, and per layer
layers.{i}.input_layernorm / post_attention_layernorm .weight, self_attn.{q,k,v,o}_proj.weight
(+ .bias when attention_bias), self_attn.{q,k}_norm.weight, mlp.{gate,up,down}_proj.weight.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine.errors import ModelFileError, TandemError
from engine.models.transformer import apply_rope, rms_norm, rope_tables
from engine.sampling import Sampler
from engine.speculative import Draft, Drafter

if TYPE_CHECKING:
    from engine.session import Session

log = logging.getLogger(__name__)


@dataclass
class DFlashConfig:
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    norm_eps: float
    rope_base: float
    block_size: int
    mask_token_id: int
    target_layer_ids: list[int]
    attention_bias: bool

    @classmethod
    def from_json(cls, path: Path) -> DFlashConfig:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"Cannot read the DFlash config {path}: {exc}. Point --draft at the folder "
                                 "of a z-lab DFlash checkpoint (config.json + model.safetensors).") from exc
        flash = raw.get("dflash_config") or {}
        try:
            hidden = int(raw["hidden_size"])
            n_heads = int(raw["num_attention_heads"])
            rope = raw.get("rope_parameters") or {}
            return cls(
                hidden_size=hidden,
                n_layers=int(raw["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(raw.get("num_key_value_heads", n_heads)),
                head_dim=int(raw.get("head_dim") or hidden // n_heads),
                d_ff=int(raw["intermediate_size"]),
                norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_base=float(raw.get("rope_theta", rope.get("rope_theta", 1_000_000.0))),
                block_size=int(flash.get("block_size", raw.get("block_size", 16))),
                mask_token_id=int(flash["mask_token_id"]),
                target_layer_ids=[int(i) for i in flash["target_layer_ids"]],
                attention_bias=bool(raw.get("attention_bias", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"The DFlash config {path} lacks or garbles {exc}; it is not a z-lab DFlash "
                                 "draft config.") from exc


class DFlashLayer(torch.nn.Module):
    def __init__(self, config: DFlashConfig, weights: dict[str, torch.Tensor], index: int) -> None:
        super().__init__()
        self.config = config
        p = f"layers.{index}."
        self.input_norm = weights[p + "input_layernorm.weight"]
        self.post_attn_norm = weights[p + "post_attention_layernorm.weight"]
        self.wq, self.wk, self.wv, self.wo = (weights[p + f"self_attn.{n}_proj.weight"] for n in "qkvo")
        self.bq, self.bk, self.bv = (weights.get(p + f"self_attn.{n}_proj.bias") for n in "qkv")
        self.q_norm = weights[p + "self_attn.q_norm.weight"]
        self.k_norm = weights[p + "self_attn.k_norm.weight"]
        self.w_gate, self.w_up, self.w_down = (weights[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up",
                                                                                              "down"))

    def kv(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T, hidden) -> K (T, Hkv, Dh) after k_norm and RoPE, V (T, Hkv, Dh)."""
        c = self.config
        k = F.linear(x, self.wk, self.bk).view(x.shape[0], c.n_kv_heads, c.head_dim)  # (T, Hkv, Dh)
        v = F.linear(x, self.wv, self.bv).view(x.shape[0], c.n_kv_heads, c.head_dim)  # (T, Hkv, Dh)
        k = apply_rope(rms_norm(k, self.k_norm, c.norm_eps), *rope, neox=True)
        return k, v

    def forward(self, x: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: (B, hidden) block rows; ctx_k, ctx_v: (Hkv, L, Dh) cached context. Non-causal."""
        c = self.config
        n = x.shape[0]
        h = rms_norm(x, self.input_norm, c.norm_eps)  # (B, hidden)
        q = F.linear(h, self.wq, self.bq).view(n, c.n_heads, c.head_dim)  # (B, H, Dh)
        q = apply_rope(rms_norm(q, self.q_norm, c.norm_eps), *rope, neox=True)
        k, v = self.kv(h, rope)  # (B, Hkv, Dh)
        keys = torch.cat((ctx_k, k.transpose(0, 1)), dim=1)  # (Hkv, L + B, Dh)
        values = torch.cat((ctx_v, v.transpose(0, 1)), dim=1)
        attn = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0),
                                              values.unsqueeze(0), scale=c.head_dim**-0.5,
                                              enable_gqa=True)  # (1, H, B, Dh); no mask: non-causal
        x = x + F.linear(attn[0].transpose(0, 1).reshape(n, c.n_heads * c.head_dim), self.wo)  # (B, hidden)
        h = rms_norm(x, self.post_attn_norm, c.norm_eps)
        return x + F.linear(F.silu(F.linear(h, self.w_gate)) * F.linear(h, self.w_up), self.w_down)


class DFlashModel(torch.nn.Module):
    """The draft network plus its context K/V cache (positions 0..n_ctx-1)."""

    def __init__(self, config: DFlashConfig, weights: dict[str, torch.Tensor], max_len: int,
                 device: str) -> None:
        super().__init__()
        self.config, self.device = config, device
        self.fc = weights["fc.weight"]  # (hidden, n_target_layers * hidden)
        self.hidden_norm = weights["hidden_norm.weight"]
        self.norm = weights["norm.weight"]
        self.layers = torch.nn.ModuleList(DFlashLayer(config, weights, i) for i in range(config.n_layers))
        shape = (config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device) for _ in range(config.n_layers)]  # (Hkv, max_len, Dh)
        self.v = [torch.zeros(shape, device=device) for _ in range(config.n_layers)]

    @classmethod
    def load(cls, folder: str | Path, max_len: int, device: str) -> DFlashModel:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise ModelFileError(f"{folder} is not a DFlash draft folder: it needs config.json and "
                                 "model.safetensors (z-lab format).")
        config = DFlashConfig.from_json(folder / "config.json")
        try:
            raw = load_file(str(folder / "model.safetensors"))
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ModelFileError(f"Cannot read {folder / 'model.safetensors'}: {exc}. "
                                 "The file is damaged.") from exc
        weights = {name: t.to(device=device, dtype=torch.float32) for name, t in raw.items()}
        try:
            return cls(config, weights, max_len, device)
        except KeyError as exc:
            raise ModelFileError(f"The DFlash weights in {folder} lack tensor {exc}; the checkpoint is "
                                 "incomplete or not in the z-lab format.") from exc

    def write_context(self, pos: int, hidden: torch.Tensor) -> None:
        """hidden: (T, n_target_layers * hidden) target states of positions [pos, pos + T)."""
        c = self.config
        ctx = rms_norm(F.linear(hidden, self.fc), self.hidden_norm, c.norm_eps)  # (T, hidden)
        positions = torch.arange(pos, pos + ctx.shape[0], device=self.device)  # (T,)
        rope = rope_tables(positions, c.head_dim, c.rope_base, 1.0, None)
        for i, layer in enumerate(self.layers):
            k, v = layer.kv(ctx, rope)  # (T, Hkv, Dh)
            self.k[i][:, pos : pos + ctx.shape[0]] = k.transpose(0, 1)
            self.v[i][:, pos : pos + ctx.shape[0]] = v.transpose(0, 1)

    def forward(self, block_embeddings: torch.Tensor, pos: int) -> torch.Tensor:
        """block_embeddings: (B, hidden) at positions [pos, pos + B); context = cached positions < pos.
        Returns the normalised block states (B, hidden), ready for the target's LM head."""
        c = self.config
        rope = rope_tables(torch.arange(pos, pos + block_embeddings.shape[0], device=self.device), c.head_dim,
                           c.rope_base, 1.0, None)
        x = block_embeddings
        for i, layer in enumerate(self.layers):
            x = layer(x, self.k[i][:, :pos], self.v[i][:, :pos], rope)  # (B, hidden)
        return rms_norm(x, self.norm, c.norm_eps)


class DFlashDrafter(Drafter):
    def __init__(self, model: DFlashModel, target, block_size: int) -> None:
        self.model, self.target = model, target
        self.block_size = block_size
        ids = model.config.target_layer_ids
        self.capture_layers = tuple(sorted(set(ids)))
        self._order = [self.capture_layers.index(i) for i in ids]  # captured (layer order) -> config order
        self.ctx_ids: list[int] = []  # tokens whose context K/V sit in the draft cache

    @classmethod
    def load(cls, config, session: Session) -> DFlashDrafter:
        try:
            model = DFlashModel.load(config.draft.path, config.context_length, session.device)
        except (MemoryError, torch.OutOfMemoryError) as exc:
            raise TandemError(f"Not enough memory for the DFlash draft: {exc}. "
                              "Turn speculative decoding off.") from exc
        c, t = model.config, session.model.config
        if c.hidden_size != t.d_model:
            raise ModelFileError(f"The DFlash draft has hidden size {c.hidden_size} but the target has "
                                 f"{t.d_model}; pick the DFlash draft trained for this target.")
        if any(not 0 <= i < t.n_layers for i in c.target_layer_ids) or model.fc.shape[1] != \
                len(c.target_layer_ids) * t.d_model:
            raise ModelFileError(f"The DFlash draft reads target layers {c.target_layer_ids} but the target "
                                 f"has {t.n_layers}; pick the DFlash draft trained for this target.")
        if not 0 <= c.mask_token_id < t.vocab_size:
            raise ModelFileError(f"The DFlash mask token {c.mask_token_id} is outside the target's "
                                 f"vocabulary ({t.vocab_size}); pick the DFlash draft made for this target.")
        block = config.draft.block_size or c.block_size
        if block < 2:
            raise TandemError(f"DFlash block size {block} is too small; use at least 2 "
                              f"(the draft's own is {c.block_size}).")
        log.info("DFlash draft: %d layers, block %d, target layers %s", c.n_layers, block, c.target_layer_ids)
        return cls(model, session.model, block)

    def first_length(self, max_draft: int) -> int:
        return self.block_size - 1  # one forward drafts the whole block; --max-draft does not cut it

    def _features(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([hidden[j] for j in self._order], dim=-1)  # (T, n_target_layers * hidden)

    def reusable_prefix(self, ids: list[int]) -> int:
        n = 0
        for a, b in zip(self.ctx_ids, ids, strict=False):
            if a != b:
                break
            n += 1
        return n

    def begin(self, session: Session, context: list[int], start: int, hidden: list[torch.Tensor]) -> None:
        with torch.inference_mode():
            self.model.write_context(start, self._features(hidden))
        self.ctx_ids = list(context)

    def observe(self, context: list[int], start: int, hidden: list[torch.Tensor]) -> None:
        with torch.inference_mode():
            self.model.write_context(start, self._features(hidden))
        self.ctx_ids = context[:-1]

    def propose(self, context: list[int], k: int, sampler: Sampler) -> Draft:
        pos = len(context) - 1  # the block starts with the last committed token, not yet in any cache
        if len(self.ctx_ids) != pos:
            raise RuntimeError(f"DFlash context holds {len(self.ctx_ids)} tokens, expected {pos}")
        block = [context[-1]] + [self.model.config.mask_token_id] * (self.block_size - 1)
        with torch.inference_mode():
            emb = self.target.embed(torch.tensor(block, device=self.model.device))  # (B, hidden)
            states = self.model(emb, pos)  # (B, hidden)
            logits = self.target.lm_head(states[1 : 1 + k])  # (k, vocab)
        return Draft([int(t) for t in logits.argmax(-1)])

    def close(self) -> None:
        self.model = None
