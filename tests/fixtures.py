"""Tiny random InternVL checkpoints in the ORIGINAL OpenGVLab on-disk layout, plus
independent conversions to the transformers (HF) layouts used as parity references.

Nothing here imports nanovl: the layouts are written from the specification
(shared/reference/vision-and-chat.md sections 1, 8, 9 and language-models.md section 2),
so a bug in nanovl's loader cannot be mirrored by a bug in the fixtures.

    sd = write_checkpoint(tmp_path, llm="qwen2", vit="300m")   # config.json + model.safetensors
    cfg = read_config(tmp_path)
    hf_cfg, hf_sd = to_hf_internvl(sd, cfg)                    # InternVLForConditionalGeneration
    lm_cfg, lm_sd = to_hf_lm(sd, cfg)                          # <Family>ForCausalLM
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
TOKENIZERS = ASSETS / "tokenizers"

FAMILY_ARCH = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
ARCH_FAMILY = {v: k for k, v in FAMILY_ARCH.items()}

DEFAULT_TEMPLATE = {
    "qwen2": "internvl2_5",
    "qwen3": "internvl2_5",
    "llama": "Hermes-2",
    "internlm2": "internlm2-chat",
    "phi3": "phi3-chat",
}

# token ids used by the parity tests when no tokenizer is copied in (vocab 512)
IMG_START_ID, IMG_END_ID, IMG_CONTEXT_ID = 5, 6, 7

# tiny sizes
VIT_HIDDEN, VIT_LAYERS, VIT_HEADS, VIT_INTER, IMAGE_SIZE, PATCH = 64, 2, 4, 128, 56, 14
LLM_HIDDEN, LLM_LAYERS, LLM_HEADS, LLM_KV_HEADS, LLM_INTER, VOCAB = 64, 2, 4, 2, 128, 512

# Phi-3 "su" factors for head_dim 16 (8 frequencies); deliberately far from 1 so that the
# short/long choice changes the logits a lot.
PHI3_SHORT_FACTOR = [1.05, 1.1, 1.25, 1.4, 1.55, 1.9, 2.0, 2.35]
PHI3_LONG_FACTOR = [1.03, 1.3, 1.9, 3.7, 9.1, 21.99, 39.95, 64.81]


# ----------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------


def vision_config(vit: str = "300m") -> dict:
    """An InternVisionConfig dict like the ones in released config.json files, tiny sizes."""
    if vit not in ("300m", "6b"):
        raise ValueError(f"vit must be '300m' or '6b', got {vit!r}")
    big = vit == "6b"
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",  # sic: also for the 300M ViT
        "hidden_size": VIT_HIDDEN,
        "num_hidden_layers": VIT_LAYERS,
        "num_attention_heads": VIT_HEADS,
        "intermediate_size": VIT_INTER,
        "qkv_bias": not big,
        "qk_normalization": big,
        "norm_type": "rms_norm" if big else "layer_norm",
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "num_channels": 3,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "initializer_factor": 0.1,
        "initializer_range": 1e-10,
        "use_flash_attn": False,
        "torch_dtype": "bfloat16",
    }


def llm_config(llm: str = "qwen2", vocab_size: int = VOCAB) -> dict:
    """An llm_config dict with the family's real field names, tiny sizes."""
    if llm not in FAMILY_ARCH:
        raise ValueError(f"llm must be one of {sorted(FAMILY_ARCH)}, got {llm!r}")
    c = {
        "architectures": [FAMILY_ARCH[llm]],
        "model_type": llm,
        "hidden_size": LLM_HIDDEN,
        "num_hidden_layers": LLM_LAYERS,
        "num_attention_heads": LLM_HEADS,
        "num_key_value_heads": LLM_KV_HEADS,
        "intermediate_size": LLM_INTER,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
    }
    if llm == "qwen2":  # Qwen2 / Qwen2.5 (InternVL2 / 2.5 / 3)
        c.update(rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None, max_position_embeddings=32768,
                 sliding_window=32768, use_sliding_window=False, max_window_layers=LLM_LAYERS,
                 attention_dropout=0.0)
    elif llm == "qwen3":  # InternVL3.5: explicit head_dim != hidden/heads
        c.update(head_dim=32, attention_bias=False, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None,
                 max_position_embeddings=40960, sliding_window=None, use_sliding_window=False,
                 max_window_layers=LLM_LAYERS, attention_dropout=0.0)
    elif llm == "llama":  # Yi-34B / Hermes-2 style
        c.update(rms_norm_eps=1e-5, rope_theta=5000000.0, rope_scaling=None, max_position_embeddings=4096,
                 attention_bias=False, mlp_bias=False, pretraining_tp=1, attention_dropout=0.0)
    elif llm == "internlm2":
        c.update(bias=False, rms_norm_eps=1e-5, rope_theta=1000000.0,
                 rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=32768,
                 attn_implementation="eager", pad_token_id=2,
                 auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config",
                           "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                           "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"})
    elif llm == "phi3":  # Phi-3-mini-128k (April 2024): "su" rope
        c.update(num_key_value_heads=LLM_HEADS, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=128, original_max_position_embeddings=16,
                 rope_scaling={"type": "su", "short_factor": list(PHI3_SHORT_FACTOR),
                               "long_factor": list(PHI3_LONG_FACTOR)},
                 embd_pdrop=0.0, resid_pdrop=0.0, attention_dropout=0.0, sliding_window=None,
                 eos_token_id=32000 if vocab_size > 32000 else 2)
    return c


def chat_config(llm="qwen2", vit="300m", *, ps_version="v2", template=None, vocab_size=VOCAB) -> dict:
    v, l = vision_config(vit), llm_config(llm, vocab_size)
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "vision_config": v,
        "llm_config": l,
        "template": template or DEFAULT_TEMPLATE[llm],
        "select_layer": -1,
        "downsample_ratio": 0.5,
        "ps_version": ps_version,
        "force_image_size": IMAGE_SIZE,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "hidden_size": l["hidden_size"],
        "tie_word_embeddings": False,
        "system_message": None,
        "torch_dtype": "bfloat16",
    }


def _merge(base: dict, over: dict) -> dict:
    """Recursive dict update; a value of None under a nested config deletes nothing, it sets None."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k in ("vision_config", "llm_config"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def num_image_token(cfg: dict) -> int:
    size = cfg.get("force_image_size") or cfg["vision_config"]["image_size"]
    return int((size // cfg["vision_config"]["patch_size"]) ** 2 * cfg["downsample_ratio"] ** 2)


def llm_head_dim(lc: dict) -> int:
    return lc.get("head_dim") or lc["hidden_size"] // lc["num_attention_heads"]


def read_config(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


# ----------------------------------------------------------------------------------------
# random weights
# ----------------------------------------------------------------------------------------


class _Rand:
    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def normal(self, *shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=self.g, dtype=torch.float32) * std + mean

    def linear(self, out_f, in_f):  # keeps activations O(1)
        return self.normal(out_f, in_f, std=1.0 / math.sqrt(in_f))

    def bias(self, n):
        return self.normal(n, std=0.1)

    def norm(self, n):  # non-trivial norm / layer-scale weights
        return self.normal(n, std=0.1, mean=1.0)


def vision_weights(vc: dict, rnd: _Rand) -> dict:
    C, I, P = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"]
    n_pos = 1 + (vc["image_size"] // P) ** 2
    layer_norm = vc.get("norm_type", "rms_norm") == "layer_norm"
    sd = {
        "vision_model.embeddings.class_embedding": rnd.normal(1, 1, C, std=0.5),
        "vision_model.embeddings.patch_embedding.weight": rnd.normal(C, 3, P, P, std=1.0 / math.sqrt(3 * P * P)),
        "vision_model.embeddings.patch_embedding.bias": rnd.bias(C),
        "vision_model.embeddings.position_embedding": rnd.normal(1, n_pos, C, std=0.5),
    }
    for i in range(vc["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        sd[p + "attn.qkv.weight"] = rnd.linear(3 * C, C)
        if vc["qkv_bias"]:
            sd[p + "attn.qkv.bias"] = rnd.bias(3 * C)
        if vc["qk_normalization"]:
            sd[p + "attn.q_norm.weight"] = rnd.norm(C)
            sd[p + "attn.k_norm.weight"] = rnd.norm(C)
        sd[p + "attn.proj.weight"] = rnd.linear(C, C)
        sd[p + "attn.proj.bias"] = rnd.bias(C)
        sd[p + "mlp.fc1.weight"] = rnd.linear(I, C)
        sd[p + "mlp.fc1.bias"] = rnd.bias(I)
        sd[p + "mlp.fc2.weight"] = rnd.linear(C, I)
        sd[p + "mlp.fc2.bias"] = rnd.bias(C)
        sd[p + "norm1.weight"] = rnd.norm(C)
        sd[p + "norm2.weight"] = rnd.norm(C)
        if layer_norm:
            sd[p + "norm1.bias"] = rnd.bias(C)
            sd[p + "norm2.bias"] = rnd.bias(C)
        sd[p + "ls1"] = rnd.norm(C)
        sd[p + "ls2"] = rnd.norm(C)
    return sd


def projector_weights(vc: dict, lc: dict, downsample_ratio: float, rnd: _Rand) -> dict:
    c4 = int(vc["hidden_size"] / downsample_ratio**2)
    D = lc["hidden_size"]
    return {
        "mlp1.0.weight": rnd.norm(c4),
        "mlp1.0.bias": rnd.bias(c4),
        "mlp1.1.weight": rnd.linear(D, c4),
        "mlp1.1.bias": rnd.bias(D),
        "mlp1.3.weight": rnd.linear(D, D),
        "mlp1.3.bias": rnd.bias(D),
    }


def canonical_lm_weights(lc: dict, rnd: _Rand, *, qkv_bias=False, qk_norm=False) -> dict:
    """Llama-named decoder weights WITHOUT the 'language_model.' prefix (model.*, lm_head.*)."""
    H, I, V = lc["hidden_size"], lc["intermediate_size"], lc["vocab_size"]
    nH, nKV, hd = lc["num_attention_heads"], lc["num_key_value_heads"], llm_head_dim(lc)
    sd = {"model.embed_tokens.weight": rnd.normal(V, H)}
    for i in range(lc["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = rnd.norm(H)
        sd[p + "self_attn.q_proj.weight"] = rnd.linear(nH * hd, H)
        sd[p + "self_attn.k_proj.weight"] = rnd.linear(nKV * hd, H)
        sd[p + "self_attn.v_proj.weight"] = rnd.linear(nKV * hd, H)
        if qkv_bias:
            sd[p + "self_attn.q_proj.bias"] = rnd.bias(nH * hd)
            sd[p + "self_attn.k_proj.bias"] = rnd.bias(nKV * hd)
            sd[p + "self_attn.v_proj.bias"] = rnd.bias(nKV * hd)
        if qk_norm:
            sd[p + "self_attn.q_norm.weight"] = rnd.norm(hd)
            sd[p + "self_attn.k_norm.weight"] = rnd.norm(hd)
        sd[p + "self_attn.o_proj.weight"] = rnd.linear(H, nH * hd)
        sd[p + "post_attention_layernorm.weight"] = rnd.norm(H)
        sd[p + "mlp.gate_proj.weight"] = rnd.linear(I, H)
        sd[p + "mlp.up_proj.weight"] = rnd.linear(I, H)
        sd[p + "mlp.down_proj.weight"] = rnd.linear(H, I)
    sd["model.norm.weight"] = rnd.norm(H)
    sd["lm_head.weight"] = rnd.linear(V, H)
    return sd


# ---- InternLM2 wqkv, written from language-models.md section 2.4 --------------------------


def fuse_wqkv(wq, wk, wv, num_heads, num_kv_heads, head_dim):
    """[nH*hd,H],[nKV*hd,H],[nKV*hd,H] -> wqkv [(nH+2nKV)*hd, H], grouped per KV head:
    rows for group kv = [q heads kv*g .. kv*g+g-1 | k head kv | v head kv], each hd rows."""
    g = num_heads // num_kv_heads
    H = wq.shape[-1]
    q = wq.reshape(num_kv_heads, g, head_dim, H)
    k = wk.reshape(num_kv_heads, 1, head_dim, H)
    v = wv.reshape(num_kv_heads, 1, head_dim, H)
    return torch.cat([q, k, v], dim=1).reshape((num_heads + 2 * num_kv_heads) * head_dim, H)


def naive_split_wqkv(wqkv, num_heads, num_kv_heads, head_dim):
    """Per-group loop reference for the inverse of fuse_wqkv (no reshapes of the whole tensor)."""
    g = num_heads // num_kv_heads
    S = g + 2
    q_rows, k_rows, v_rows = [], [], []
    for kv in range(num_kv_heads):
        base = kv * S * head_dim
        for s in range(g):
            q_rows.append(wqkv[base + s * head_dim: base + (s + 1) * head_dim])
        k_rows.append(wqkv[base + g * head_dim: base + (g + 1) * head_dim])
        v_rows.append(wqkv[base + (g + 1) * head_dim: base + (g + 2) * head_dim])
    return torch.cat(q_rows), torch.cat(k_rows), torch.cat(v_rows)


def llama_lm_to_internlm2(sd: dict, lc: dict) -> dict:
    """Llama-named decoder weights (no prefix) -> InternLM2 names with fused wqkv."""
    nH, nKV, hd = lc["num_attention_heads"], lc["num_key_value_heads"], llm_head_dim(lc)
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
           "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(lc["num_hidden_layers"]):
        s, d = f"model.layers.{i}.", f"model.layers.{i}."
        out[d + "attention_norm.weight"] = sd[s + "input_layernorm.weight"]
        out[d + "attention.wqkv.weight"] = fuse_wqkv(sd[s + "self_attn.q_proj.weight"],
                                                     sd[s + "self_attn.k_proj.weight"],
                                                     sd[s + "self_attn.v_proj.weight"], nH, nKV, hd)
        out[d + "attention.wo.weight"] = sd[s + "self_attn.o_proj.weight"]
        out[d + "ffn_norm.weight"] = sd[s + "post_attention_layernorm.weight"]
        out[d + "feed_forward.w1.weight"] = sd[s + "mlp.gate_proj.weight"]
        out[d + "feed_forward.w3.weight"] = sd[s + "mlp.up_proj.weight"]
        out[d + "feed_forward.w2.weight"] = sd[s + "mlp.down_proj.weight"]
    return out


def internlm2_lm_to_llama(sd: dict, lc: dict) -> dict:
    """Inverse of llama_lm_to_internlm2, using the naive per-group loop for wqkv."""
    nH, nKV, hd = lc["num_attention_heads"], lc["num_key_value_heads"], llm_head_dim(lc)
    out = {"model.embed_tokens.weight": sd["model.tok_embeddings.weight"],
           "model.norm.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    for i in range(lc["num_hidden_layers"]):
        p = f"model.layers.{i}."
        wq, wk, wv = naive_split_wqkv(sd[p + "attention.wqkv.weight"], nH, nKV, hd)
        out[p + "input_layernorm.weight"] = sd[p + "attention_norm.weight"]
        out[p + "self_attn.q_proj.weight"] = wq
        out[p + "self_attn.k_proj.weight"] = wk
        out[p + "self_attn.v_proj.weight"] = wv
        out[p + "self_attn.o_proj.weight"] = sd[p + "attention.wo.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
        out[p + "mlp.gate_proj.weight"] = sd[p + "feed_forward.w1.weight"]
        out[p + "mlp.up_proj.weight"] = sd[p + "feed_forward.w3.weight"]
        out[p + "mlp.down_proj.weight"] = sd[p + "feed_forward.w2.weight"]
    return out


def llama_lm_to_phi3(sd: dict, lc: dict) -> dict:
    """Phi-3 layout: qkv_proj = [q; k; v] (plain concat), gate_up_proj = [gate; up]."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"(model\.layers\.\d+\.)(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.weight$", k)
        if m is None:
            out[k] = v
            continue
        p = m.group(1)
        if k.endswith("self_attn.q_proj.weight"):
            out[p + "self_attn.qkv_proj.weight"] = torch.cat(
                [v, sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.v_proj.weight"]])
        elif k.endswith("mlp.gate_proj.weight"):
            out[p + "mlp.gate_up_proj.weight"] = torch.cat([v, sd[p + "mlp.up_proj.weight"]])
    return out


def lm_weights(lc: dict, rnd: _Rand) -> dict:
    """Decoder weights in the family's ORIGINAL layout, without the 'language_model.' prefix."""
    family = ARCH_FAMILY[lc["architectures"][0]]
    sd = canonical_lm_weights(lc, rnd, qkv_bias=family == "qwen2", qk_norm=family == "qwen3")
    if family == "internlm2":
        sd = llama_lm_to_internlm2(sd, lc)
    elif family == "phi3":
        sd = llama_lm_to_phi3(sd, lc)
    return sd


def flash_weights(vc: dict, lc: dict, rnd: _Rand) -> dict:
    """InternVL3.5-Flash's router and 64-token projector, with the key names and shapes of the Flash checkpoints'
    remote code (shared/reference/internvl3_5.md section 2.3 g): mlp2.{0,1,4,7}, pooling_before_gating.{query_token,attn1-4,norm1-4},
    gating.block1-4.{0,3,5}, gating.gate.{0,1}."""
    C, D = vc["hidden_size"], lc["hidden_size"]
    sd = {"mlp2.0.weight": rnd.norm(16 * C), "mlp2.0.bias": rnd.bias(16 * C),
          "mlp2.1.weight": rnd.linear(2 * D, 16 * C), "mlp2.1.bias": rnd.bias(2 * D),
          "mlp2.4.weight": rnd.linear(2 * D, 2 * D), "mlp2.4.bias": rnd.bias(2 * D),
          "mlp2.7.weight": rnd.linear(D, 2 * D), "mlp2.7.bias": rnd.bias(D),
          "pooling_before_gating.query_token": rnd.normal(1, C)}
    for i in range(1, 5):
        p = f"pooling_before_gating.attn{i}."
        sd.update({p + "in_proj_weight": rnd.linear(3 * C, C), p + "in_proj_bias": rnd.bias(3 * C),
                   p + "out_proj.weight": rnd.linear(C, C), p + "out_proj.bias": rnd.bias(C),
                   f"pooling_before_gating.norm{i}.weight": rnd.norm(C),
                   f"pooling_before_gating.norm{i}.bias": rnd.bias(C)})
        b = f"gating.block{i}."
        sd.update({b + "0.weight": rnd.linear(4 * C, C), b + "0.bias": rnd.bias(4 * C),
                   b + "3.weight": rnd.linear(C, 4 * C), b + "3.bias": rnd.bias(C),
                   b + "5.weight": rnd.norm(C), b + "5.bias": rnd.bias(C)})
    sd.update({"gating.gate.0.weight": rnd.norm(C), "gating.gate.0.bias": rnd.bias(C),
               "gating.gate.1.weight": rnd.linear(2, C), "gating.gate.1.bias": torch.tensor([1.2, 0.0])})
    return sd  # the gate bias favours "compress" a little, so that random weights give mixed decisions


# ----------------------------------------------------------------------------------------
# writing checkpoints
# ----------------------------------------------------------------------------------------


def tokenizer_vocab_size(tokenizer_dir) -> int:
    """len(tokenizer) = 1 + the largest id among the base vocab and the added tokens."""
    d = Path(tokenizer_dir)
    ids = []
    for f in d.glob("added_tokens*.json"):
        ids += list(json.loads(f.read_text()).values())
    for name in ("tokenizer.json", "tokenizer.derived.json"):
        if (d / name).exists():
            tj = json.loads((d / name).read_text())
            vocab = tj["model"]["vocab"]
            ids += list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
            ids += [t["id"] for t in tj.get("added_tokens", [])]
    if (d / "vocab.json").exists():
        ids += list(json.loads((d / "vocab.json").read_text()).values())
    if not ids:
        raise ValueError(f"cannot tell the vocabulary size of {d}")
    return max(ids) + 1


def copy_tokenizer(tokenizer_dir, dest) -> None:
    """Copy tokenizer files; names like 'tokenizer.derived.json' or 'added_tokens.internvl-derived.json'
    are stored under their canonical HF names ('tokenizer.json', 'added_tokens.json')."""
    src = Path(tokenizer_dir)
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        parts = f.name.split(".")
        name = parts[0] + "." + parts[-1] if len(parts) > 2 else f.name
        shutil.copyfile(f, Path(dest) / name)


def save_weights(sd: dict, path, shards: int = 1) -> None:
    path = Path(path)
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()
    sd = {k: v.contiguous() for k, v in sd.items()}
    if shards <= 1:
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = list(sd)
    per = math.ceil(len(keys) / shards)
    weight_map, total = {}, 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[s * per:(s + 1) * per]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def load_weights(path) -> dict:
    path = Path(path)
    if (path / "model.safetensors").exists():
        return load_file(str(path / "model.safetensors"))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(path / f)))
    return out


def write_config(cfg: dict, path) -> None:
    (Path(path) / "config.json").write_text(json.dumps(cfg, indent=2))


def write_checkpoint(path, llm="qwen2", vit="300m", *, ps_version="v2", template=None, shards=1, seed=0,
                     vocab_size=None, tokenizer_dir=None, **overrides) -> dict:
    """Write a tiny random InternVL checkpoint in the original OpenGVLab layout into `path`.

    overrides: top-level config.json fields; `vision_config={...}` / `llm_config={...}` are merged
    into the sub-configs; `flash_mode=...` makes it an InternVL3.5-Flash checkpoint (router weights written too).
    Returns the state dict that was written (original key names, fp32).

    The weights depend only on (seed, shapes): the vision tower and projector are drawn first from
    one generator, the decoder from a second one (seed + 1), so two checkpoints with the same seed and
    the same decoder shapes hold the same decoder numbers whatever their family's layout.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        if not tokenizer_dir.is_absolute() and not tokenizer_dir.exists():
            tokenizer_dir = TOKENIZERS / tokenizer_dir
        if vocab_size is None:
            vocab_size = tokenizer_vocab_size(tokenizer_dir)
        copy_tokenizer(tokenizer_dir, path)
    cfg = chat_config(llm, vit, ps_version=ps_version, template=template, vocab_size=vocab_size or VOCAB)
    cfg = _merge(cfg, overrides)
    cfg["hidden_size"] = cfg["llm_config"]["hidden_size"]
    vc, lc = cfg["vision_config"], cfg["llm_config"]

    sd = vision_weights(vc, _Rand(seed))
    sd.update(projector_weights(vc, lc, cfg["downsample_ratio"], _Rand(seed + 1000)))
    sd.update({"language_model." + k: v for k, v in lm_weights(lc, _Rand(seed + 1)).items()})
    if "flash_mode" in cfg:  # an InternVL3.5-Flash checkpoint: the router and mlp2 too
        sd.update(flash_weights(vc, lc, _Rand(seed + 2000)))
    write_config(cfg, path)
    save_weights(sd, path, shards)
    return sd


# ----------------------------------------------------------------------------------------
# conversions to transformers (reference side only)
# ----------------------------------------------------------------------------------------


def hf_vision_config_kwargs(vc: dict) -> dict:
    return dict(
        hidden_size=vc["hidden_size"],
        num_hidden_layers=vc["num_hidden_layers"],
        num_attention_heads=vc["num_attention_heads"],
        intermediate_size=vc["intermediate_size"],
        attention_bias=vc["qkv_bias"],
        use_qk_norm=vc["qk_normalization"],
        norm_type=vc.get("norm_type", "rms_norm"),  # absent in 6B configs -> class default rms_norm
        layer_norm_eps=vc["layer_norm_eps"],
        hidden_act=vc["hidden_act"],
        image_size=vc["image_size"],
        patch_size=vc["patch_size"],
        num_channels=vc.get("num_channels", 3),
        layer_scale_init_value=0.1,
        use_mean_pooling=True,
        use_absolute_position_embeddings=True,
    )


def hf_vision_config(vc: dict):
    from transformers import InternVLVisionConfig

    return InternVLVisionConfig(**hf_vision_config_kwargs(vc))


_VISION_RENAMES = [  # vision-and-chat.md 8.2, applied in this order
    (r"^vision_model\.", "vision_tower."),
    (r"\.layers\.", ".layer."),
    (r"class_embedding", "cls_token"),
    (r"position_embedding", "position_embeddings"),
    (r"patch_embedding", "patch_embeddings.projection"),
    (r"\.ls(\d+)", r".lambda_\1"),
    (r"attn\.proj", "attention.projection_layer"),
    (r"\.attn\.", ".attention."),
    (r"norm1", "layernorm_before"),
    (r"norm2", "layernorm_after"),
]


def hf_vision_state_dict(sd: dict) -> dict:
    """Original vision_model.* keys -> InternVLVisionModel keys (no 'vision_tower.' prefix)."""
    out = {}
    for k, v in sd.items():
        if not k.startswith("vision_model."):
            continue
        new = k
        for pat, rep in _VISION_RENAMES:
            new = re.sub(pat, rep, new)
        if new.endswith("attention.qkv.weight") or new.endswith("attention.qkv.bias"):
            C = v.shape[0] // 3
            stem, kind = new.rsplit(".qkv.", 1)
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{stem}.{name}.{kind}"] = v[j * C:(j + 1) * C].clone()
            continue
        out[new] = v
    return {k[len("vision_tower."):]: v for k, v in out.items()}


def hf_text_config(lc: dict):
    """The transformers config for the decoder, converted as transformers would read it.
    InternLM2 -> LlamaConfig (the HF converter's choice); Phi-3 'su' -> 'longrope'."""
    from transformers import LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config

    family = ARCH_FAMILY[lc["architectures"][0]]
    common = dict(
        hidden_size=lc["hidden_size"], num_hidden_layers=lc["num_hidden_layers"],
        num_attention_heads=lc["num_attention_heads"], num_key_value_heads=lc["num_key_value_heads"],
        intermediate_size=lc["intermediate_size"], vocab_size=lc["vocab_size"], hidden_act=lc["hidden_act"],
        rms_norm_eps=lc["rms_norm_eps"], max_position_embeddings=lc["max_position_embeddings"],
        tie_word_embeddings=False, bos_token_id=lc.get("bos_token_id"), eos_token_id=lc.get("eos_token_id"),
        pad_token_id=None, attention_dropout=0.0,
    )
    rope = copy.deepcopy(lc.get("rope_scaling"))
    if rope is not None:
        rope.setdefault("rope_type", rope.get("type"))
        rope.pop("type", None)
        if family == "phi3" and rope["rope_type"] in ("su", "yarn"):
            rope["rope_type"] = "longrope"
    rope_params = {"rope_type": "default", **(rope or {}), "rope_theta": lc["rope_theta"]}
    if family == "phi3":
        rope_params = dict(rope_params)
        if rope_params["rope_type"] == "longrope":
            rope_params["original_max_position_embeddings"] = lc["original_max_position_embeddings"]
        return Phi3Config(**common, original_max_position_embeddings=lc["original_max_position_embeddings"],
                          rope_parameters=rope_params, embd_pdrop=0.0, resid_pdrop=0.0)
    if family == "qwen2":
        return Qwen2Config(**common, rope_parameters=rope_params, use_sliding_window=False,
                           sliding_window=None, max_window_layers=lc["num_hidden_layers"])
    if family == "qwen3":
        return Qwen3Config(**common, rope_parameters=rope_params, head_dim=llm_head_dim(lc), attention_bias=False,
                           use_sliding_window=False, sliding_window=None,
                           max_window_layers=lc["num_hidden_layers"])
    if family == "llama":
        return LlamaConfig(**common, rope_parameters=rope_params, attention_bias=False, mlp_bias=False)
    if family == "internlm2":
        return LlamaConfig(**common, rope_parameters=rope_params, attention_bias=lc.get("bias", False),
                           mlp_bias=False)
    raise ValueError(family)


def hf_lm_state_dict(sd: dict, lc: dict) -> dict:
    """Original 'language_model.*' keys -> <Family>ForCausalLM keys (model.*, lm_head.weight)."""
    lm = {k[len("language_model."):]: v for k, v in sd.items() if k.startswith("language_model.")}
    family = ARCH_FAMILY[lc["architectures"][0]]
    if family == "internlm2":
        lm = internlm2_lm_to_llama(lm, lc)
    return lm  # qwen2/qwen3/llama/phi3: same names (Phi3ForCausalLM keeps the fused tensors)


def to_hf_lm(sd: dict, cfg: dict):
    """(transformers text config, state dict for <Family>ForCausalLM; InternLM2 -> Llama)."""
    lc = cfg["llm_config"]
    return hf_text_config(lc), hf_lm_state_dict(sd, lc)


def to_hf_internvl(sd: dict, cfg: dict, *, image_token_id: int = IMG_CONTEXT_ID):
    """(InternVLConfig, state dict with InternVLForConditionalGeneration runtime keys).

    Only ps_version 'v2' is expressible: transformers always swaps the grid back."""
    from transformers import InternVLConfig

    if cfg.get("ps_version", "v1") != "v2":
        raise ValueError("transformers' InternVL always does the ps_version 'v2' pixel shuffle")
    vc, lc = cfg["vision_config"], cfg["llm_config"]
    hf_cfg = InternVLConfig(
        vision_config=hf_vision_config_kwargs(vc),
        text_config=hf_text_config(lc),
        image_token_id=image_token_id,
        image_seq_length=num_image_token(cfg),
        downsample_ratio=cfg["downsample_ratio"],
        projector_hidden_act="gelu",
        vision_feature_layer=cfg["select_layer"],
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    out = {"model.vision_tower." + k: v for k, v in hf_vision_state_dict(sd).items()}
    proj = {"mlp1.0": "layer_norm", "mlp1.1": "linear_1", "mlp1.3": "linear_2"}
    for k, v in sd.items():
        if k.startswith("mlp1."):
            idx, kind = k.rsplit(".", 1)
            out[f"model.multi_modal_projector.{proj[idx]}.{kind}"] = v
    for k, v in hf_lm_state_dict(sd, lc).items():
        if k.startswith("model."):
            out["model.language_model." + k[len("model."):]] = v
        elif k == "lm_head.weight":
            out["lm_head.weight"] = v
        else:
            raise KeyError(k)
    return hf_cfg, out


# ---- building the reference modules -----------------------------------------------------


def _strict_load(model, sd):
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise AssertionError(f"HF reference: missing keys {missing}, unexpected keys {unexpected}")
    return model


def hf_vision_model(sd: dict, cfg: dict):
    from transformers import InternVLVisionModel

    m = InternVLVisionModel._from_config(hf_vision_config(cfg["vision_config"]), attn_implementation="eager",
                                         dtype=torch.float32)
    return _strict_load(m, hf_vision_state_dict(sd)).eval()


def hf_causal_lm(sd: dict, cfg: dict):
    import transformers

    lc = cfg["llm_config"]
    family = ARCH_FAMILY[lc["architectures"][0]]
    cls = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
           "llama": transformers.LlamaForCausalLM, "internlm2": transformers.LlamaForCausalLM,
           "phi3": transformers.Phi3ForCausalLM}[family]
    text_cfg, lm_sd = to_hf_lm(sd, cfg)
    m = cls._from_config(text_cfg, attn_implementation="eager", dtype=torch.float32)
    return _strict_load(m, lm_sd).eval()


def hf_internvl(sd: dict, cfg: dict, *, image_token_id: int = IMG_CONTEXT_ID):
    from transformers import InternVLForConditionalGeneration

    hf_cfg, hf_sd = to_hf_internvl(sd, cfg, image_token_id=image_token_id)
    m = InternVLForConditionalGeneration._from_config(hf_cfg, attn_implementation="eager", dtype=torch.float32)
    return _strict_load(m, hf_sd).eval()


# ---- spec-derived helpers ---------------------------------------------------------------


def pixel_shuffle_reference(x: torch.Tensor, ps_version: str = "v2") -> torch.Tensor:
    """(N, h*w, C) patch tokens (row-major, CLS dropped) -> (N, h*w/4, 4C), by the index formula of
    vision-and-chat.md section 2: token (i, j) = concat of patches (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1);
    v2 orders tokens row-major t = i*(w/2) + j, v1 column-major t = j*(h/2) + i."""
    N, L, C = x.shape
    h = w = int(round(math.sqrt(L)))
    g = x.reshape(N, h, w, C)
    toks = {}
    for i in range(h // 2):
        for j in range(w // 2):
            toks[(i, j)] = torch.cat([g[:, 2 * i, 2 * j], g[:, 2 * i, 2 * j + 1],
                                      g[:, 2 * i + 1, 2 * j], g[:, 2 * i + 1, 2 * j + 1]], dim=-1)
    if ps_version == "v2":
        order = [(i, j) for i in range(h // 2) for j in range(w // 2)]
    else:
        order = [(i, j) for j in range(w // 2) for i in range(h // 2)]
    return torch.stack([toks[o] for o in order], dim=1)


def transpose_token_grid(feats: torch.Tensor) -> torch.Tensor:
    """(N, n*n, D) -> the same tokens with the n x n grid transposed."""
    N, T, D = feats.shape
    n = int(round(math.sqrt(T)))
    return feats.reshape(N, n, n, D).transpose(1, 2).reshape(N, T, D)


def random_pixel_values(n_tiles: int, seed: int = 0, size: int = IMAGE_SIZE) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(n_tiles, 3, size, size, generator=g)


def image_prompt(n_tiles: int, cfg: dict, *, seed: int = 0, prefix: int = 5, suffix: int = 4,
                 img_context_id: int = IMG_CONTEXT_ID, img_start_id: int = IMG_START_ID,
                 img_end_id: int = IMG_END_ID) -> torch.Tensor:
    """A (1, T) prompt: random text, <img>, <IMG_CONTEXT> x num_image_token*n_tiles, </img>, random text."""
    g = torch.Generator().manual_seed(20_000 + seed)
    V = cfg["llm_config"]["vocab_size"]
    lo = 10
    pre = torch.randint(lo, V, (prefix,), generator=g)
    suf = torch.randint(lo, V, (suffix,), generator=g)
    ctx = torch.full((num_image_token(cfg) * n_tiles,), img_context_id)
    ids = torch.cat([pre, torch.tensor([img_start_id]), ctx, torch.tensor([img_end_id]), suf])
    return ids[None]


def random_ids(batch: int, length: int, vocab: int, seed: int = 0, lo: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(30_000 + seed)
    return torch.randint(lo, vocab, (batch, length), generator=g)


# ---- comparisons ------------------------------------------------------------------------

DIFFS: dict[str, float] = {}  # test label -> max abs difference, printed at the end of the run


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def check_close(actual: torch.Tensor, expected: torch.Tensor, what: str, *, rtol=1e-5, atol=1e-5,
                exact: bool = False) -> float:
    """assert_close (or torch.equal with exact=True) with the max abs difference in the message and
    recorded in DIFFS under `what`."""
    actual, expected = actual.detach(), expected.detach()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    diff = max_abs_diff(actual.float(), expected.float())
    DIFFS[what] = diff
    if exact:
        assert torch.equal(actual, expected), f"{what}: not bit-identical, max abs diff {diff:.3e}"
    else:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}: max abs diff {diff:.3e}\n{m}")
    return diff


# ---- greedy decoding references ------------------------------------------------------------


def hf_greedy(model, ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """transformers' own generate(), greedy, never stopping early; returns only the new tokens."""
    gc = copy.deepcopy(model.generation_config)
    gc.do_sample, gc.num_beams = False, 1
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = None, 0, None
    gc.max_new_tokens, gc.min_new_tokens, gc.max_length = max_new_tokens, None, None
    gc.temperature = gc.top_p = gc.top_k = None
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc, **kwargs)
    return out[:, ids.shape[1]:]


def hf_greedy_with_cache(model, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding with a KV cache that is never recomputed: prefill, then one token per call.
    For Phi-3 'su' this is the original InternVL (remote-code) behaviour: cached keys keep the rotation
    they were computed with, a call whose max position+1 exceeds original_max_position_embeddings
    uses the long factors for its own tokens only. (transformers' generate() instead re-prefills the
    whole sequence when it first crosses that boundary.)"""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    new = []
    with torch.no_grad():
        T = ids.shape[1]
        out = model(input_ids=ids, past_key_values=cache, use_cache=True,
                    position_ids=torch.arange(T)[None].expand(ids.shape[0], -1))
        for step in range(max_new_tokens):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            new.append(tok)
            if step == max_new_tokens - 1:
                break
            pos = torch.full_like(tok, T + step)
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, position_ids=pos)
    return torch.cat(new, dim=1)
