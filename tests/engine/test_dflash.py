"""DFlash draft: our cached implementation against a from-scratch reference written from the spec
(DESIGN.md, "Speculative decoding"), and greedy speculative output against plain decoding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.api import DraftConfig, EngineConfig, SamplingParams
from engine.errors import ModelFileError
from engine.kv_cache import KVCache
from tests.engine.events import collect_ids
from tests.engine.tiny_models import D_MODEL, write_tiny_model

PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 10, 72, 101]
N_LAYERS, N_HEADS, N_KV, HEAD_DIM, D_FF = 2, 4, 2, 32, 384
TARGET_LAYERS = [1, 0]  # deliberately not sorted: the concatenation follows this order
MASK_ID = 300
BLOCK = 5
ROPE_BASE = 10_000.0
EPS = 1e-6


def write_dflash(folder, seed: int = 0, hidden: int = D_MODEL, scale: float = 1.0):
    """A random draft in the z-lab layout (config.json + model.safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    def mat(rows, cols):
        return (torch.randn(rows, cols, generator=gen) * scale / cols**0.5).contiguous()

    def norm(n):
        return (1.0 + 0.1 * torch.randn(n, generator=gen)).contiguous()

    w = {"fc.weight": mat(hidden, len(TARGET_LAYERS) * hidden), "hidden_norm.weight": norm(hidden),
         "norm.weight": norm(hidden)}
    for i in range(N_LAYERS):
        p = f"layers.{i}."
        w[p + "input_layernorm.weight"] = norm(hidden)
        w[p + "post_attention_layernorm.weight"] = norm(hidden)
        w[p + "self_attn.q_proj.weight"] = mat(N_HEADS * HEAD_DIM, hidden)
        w[p + "self_attn.k_proj.weight"] = mat(N_KV * HEAD_DIM, hidden)
        w[p + "self_attn.v_proj.weight"] = mat(N_KV * HEAD_DIM, hidden)
        w[p + "self_attn.o_proj.weight"] = mat(hidden, N_HEADS * HEAD_DIM)
        w[p + "self_attn.q_norm.weight"] = norm(HEAD_DIM)
        w[p + "self_attn.k_norm.weight"] = norm(HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = mat(D_FF, hidden)
        w[p + "mlp.up_proj.weight"] = mat(D_FF, hidden)
        w[p + "mlp.down_proj.weight"] = mat(hidden, D_FF)
    save_file(w, str(folder / "model.safetensors"))
    config = {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": hidden,
        "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS, "num_key_value_heads": N_KV,
        "head_dim": HEAD_DIM, "intermediate_size": D_FF, "rms_norm_eps": EPS, "rope_theta": ROPE_BASE,
        "attention_bias": False, "block_size": BLOCK, "num_target_layers": 2,
        "dflash_config": {"mask_token_id": MASK_ID, "target_layer_ids": TARGET_LAYERS},
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder, w


# -- reference: the spec, step by step, no cache -------------------------------------------------------

def ref_rms(x, w):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * w


def ref_rope(x, positions):
    """x: (T, H, D); HF's rotate_half convention (Qwen3)."""
    d = x.shape[-1]
    inv = 1.0 / ROPE_BASE ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * inv[None, :]  # (T, D/2)
    cos = torch.cat((ang.cos(), ang.cos()), -1)[:, None, :].float()  # (T, 1, D)
    sin = torch.cat((ang.sin(), ang.sin()), -1)[:, None, :].float()
    rotated = torch.cat((-x[..., d // 2 :], x[..., : d // 2]), -1)
    return x * cos + rotated * sin


def reference_drafts(target, w, ids: list[int], kv: str = "f16") -> torch.Tensor:
    """Draft logits (BLOCK - 1, vocab) after ids: context = ids[:-1], block = [ids[-1], mask...]."""
    c = target.config
    cache = KVCache(c.n_layers, c.n_kv_heads, c.head_dim, 256, kv, kv)  # f16: as the session's target
    n_ctx = len(ids) - 1
    with torch.inference_mode():
        _, hidden = target(torch.tensor(ids[:-1]), 0, cache, logits_for="none", capture_layers=(0, 1))
        by_layer = dict(zip((0, 1), hidden, strict=True))  # our layer i output = HF hidden_states[i + 1]
        feats = torch.cat([by_layer[i] for i in TARGET_LAYERS], -1)  # (n_ctx, 2 * hidden)
        ctx = ref_rms(feats @ w["fc.weight"].T, w["hidden_norm.weight"])  # (n_ctx, hidden)
        block = [ids[-1]] + [MASK_ID] * (BLOCK - 1)
        x = target.embed(torch.tensor(block))  # (BLOCK, hidden)
        ctx_pos, blk_pos = torch.arange(n_ctx), torch.arange(n_ctx, n_ctx + BLOCK)
        for i in range(N_LAYERS):
            p = f"layers.{i}."
            h = ref_rms(x, w[p + "input_layernorm.weight"])
            q = (h @ w[p + "self_attn.q_proj.weight"].T).view(BLOCK, N_HEADS, HEAD_DIM)
            kv_in = torch.cat((ctx, h))  # K/V = [proj(context); proj(block)]
            k = (kv_in @ w[p + "self_attn.k_proj.weight"].T).view(-1, N_KV, HEAD_DIM)
            v = (kv_in @ w[p + "self_attn.v_proj.weight"].T).view(-1, N_KV, HEAD_DIM)
            q = ref_rope(ref_rms(q, w[p + "self_attn.q_norm.weight"]), blk_pos)
            k = ref_rope(ref_rms(k, w[p + "self_attn.k_norm.weight"]), torch.cat((ctx_pos, blk_pos)))
            k = k.repeat_interleave(N_HEADS // N_KV, dim=1)  # (L, H, D)
            v = v.repeat_interleave(N_HEADS // N_KV, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / HEAD_DIM**0.5  # every query sees every key
            out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(BLOCK, N_HEADS * HEAD_DIM)
            x = x + out @ w[p + "self_attn.o_proj.weight"].T
            h = ref_rms(x, w[p + "post_attention_layernorm.weight"])
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            act = gate * torch.sigmoid(gate) * (h @ w[p + "mlp.up_proj.weight"].T)  # SiLU(gate) * up
            x = x + act @ w[p + "mlp.down_proj.weight"].T
        states = ref_rms(x, w["norm.weight"])
        return target.lm_head(states[1:])  # (BLOCK - 1, vocab): the target's LM head


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("dflash")
    target = write_tiny_model(d / "target.gguf", "qwen3", seed=7)
    folder, weights = write_dflash(d / "draft", seed=1)
    return target, folder, weights


def load(target, mode="none", draft=None, block=None):
    from engine.session import Engine

    spec = DraftConfig(mode=mode, path=str(draft) if draft else None, block_size=block)
    return Engine.load(EngineConfig(model=str(target), draft=spec, device="cpu", context_length=128,
                                    prefill_chunk=8))


def generate(session, prompt, params):
    return collect_ids(session.generate(prompt, params))


def test_draft_block_matches_reference_at_every_step(models):
    """Every proposal during a speculative run (context cached incrementally, rejected rows overwritten)
    equals the reference computed from scratch on the whole context."""
    target, folder, weights = models
    session = load(target, "dflash", folder)
    drafter = session.drafter
    seen = []
    original = drafter.propose

    def spy(context, k, sampler):
        draft = original(context, k, sampler)
        seen.append((list(context), k, draft.tokens))
        return draft

    drafter.propose = spy
    generate(session, PROMPT, SamplingParams(temperature=0.0, max_tokens=20))
    assert len(seen) >= 3
    for context, k, tokens in seen:
        ref = reference_drafts(session.model, weights, context)  # (BLOCK - 1, vocab)
        assert tokens == ref.argmax(-1)[:k].tolist()
    # the logits themselves, not just their argmax
    context = seen[-1][0]
    with torch.inference_mode():
        emb = session.model.embed(torch.tensor([context[-1]] + [MASK_ID] * (BLOCK - 1)))
        ours = session.model.lm_head(drafter.model(emb, len(context) - 1)[1:])
    ref = reference_drafts(session.model, weights, context)
    # f16 target cache: chunked and whole-sequence runs may round a K/V entry differently
    assert float((ours - ref).norm() / ref.norm()) < 2e-4


def test_draft_model_matches_reference_in_float32(models):
    """The draft network alone, context written in two pieces, against the reference to float32 rounding."""
    from engine.dflash import DFlashModel
    from engine.gguf_file import GGUFModelFile
    from engine.models.transformer import Transformer

    target_path, folder, weights = models
    target = Transformer.from_gguf(GGUFModelFile.open(target_path))
    ids = PROMPT + [33, 34, 35]
    c = target.config
    cache = KVCache(c.n_layers, c.n_kv_heads, c.head_dim, 64, "f32", "f32")
    draft = DFlashModel.load(folder, 64, "cpu")
    with torch.inference_mode():
        _, hidden = target(torch.tensor(ids[:-1]), 0, cache, logits_for="none", capture_layers=(0, 1))
        feats = torch.cat((hidden[1], hidden[0]), -1)  # target_layer_ids = [1, 0]
        draft.write_context(0, feats[:9])
        draft.write_context(9, feats[9:])
        emb = target.embed(torch.tensor([ids[-1]] + [MASK_ID] * (BLOCK - 1)))
        ours = target.lm_head(draft(emb, len(ids) - 1)[1:])  # (BLOCK - 1, vocab)
    ref = reference_drafts(target, weights, ids, kv="f32")
    assert float((ours - ref).norm() / ref.norm()) < 1e-5
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_dflash_greedy_equals_plain(models):
    target, folder, _ = models
    params = SamplingParams(temperature=0.0, max_tokens=40)
    plain_ids, _, plain = generate(load(target), PROMPT, params)
    ids, flags, final = generate(load(target, "dflash", folder), PROMPT, params)
    assert ids == plain_ids and final.text == plain.text
    assert final.stats.drafted > 0 and sum(flags) == final.stats.accepted
    assert final.stats.drafted <= final.stats.draft_steps * (BLOCK - 1)


def test_dflash_block_size_override(models):
    target, folder, _ = models
    session = load(target, "dflash", folder, block=3)
    _, _, final = generate(session, PROMPT, SamplingParams(temperature=0.0, max_tokens=12))
    assert final.stats.drafted <= final.stats.draft_steps * 2


def test_dflash_draft_for_another_target_is_refused(models, tmp_path):
    target, _, _ = models
    folder, _ = write_dflash(tmp_path / "wide", hidden=2 * D_MODEL)
    with pytest.raises(ModelFileError, match="hidden size"):
        load(target, "dflash", folder)
    with pytest.raises(ModelFileError, match="config.json and model.safetensors"):
        load(target, "dflash", tmp_path / "nowhere")
