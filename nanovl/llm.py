"""The one decoder: Qwen2/2.5, Qwen3, LLaMA/Yi, InternLM2/2.5 and Phi-3 differ only by config and weight names."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovl.config import LLMConfig
from nanovl.errors import NanovlError


class Linear(nn.Linear):
    """nn.Linear; a single row (B = T = 1, the decode step) on CPU goes through torch.mv, whose kernel streams a
    bf16 weight much faster than the GEMM path F.linear takes (the limits in benchmarks/results.md)."""

    def forward(self, x):
        if x.device.type != "cpu" or x.shape[:-1].numel() != 1:
            return F.linear(x, self.weight, self.bias)
        y = torch.mv(self.weight, x.reshape(-1))  # (out,)
        return (y if self.bias is None else y + self.bias).view(*x.shape[:-1], -1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in fp32, cast back, then scale (the reference order)
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class RoPE:
    """Rotary position embedding (rotate-half), with the rope_scaling variants InternVL checkpoints use."""

    def __init__(self, cfg: LLMConfig):
        self.dim, self.theta, self.max_pos = cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings
        self.scaling = dict(cfg.rope_scaling or {})
        self.kind = self.scaling.get("rope_type", self.scaling.get("type", "default"))
        if self.kind not in ("default", "dynamic", "su", "longrope"):
            raise NanovlError(f"unsupported rope_scaling {cfg.rope_scaling}")
        self.orig_max = self.scaling.get("original_max_position_embeddings", cfg.original_max_position_embeddings)

    def inv_freq(self, seq_len: int, device) -> tuple[torch.Tensor, float]:
        exponent = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        theta, scale, attn_factor = self.theta, 1.0, 1.0
        if self.kind == "dynamic" and seq_len > self.max_pos:  # dynamic NTK: a larger base past the trained length
            f = self.scaling["factor"]
            theta = theta * ((f * seq_len / self.max_pos) - (f - 1)) ** (self.dim / (self.dim - 2))
        if self.kind in ("su", "longrope"):  # Phi-3 LongRoPE: per-frequency factors, long ones past orig_max
            key = "long_factor" if seq_len > self.orig_max else "short_factor"
            scale = torch.tensor(self.scaling[key], dtype=torch.float32, device=device)
            if self.max_pos > self.orig_max:
                attn_factor = math.sqrt(1 + math.log(self.max_pos / self.orig_max) / math.log(self.orig_max))
        return 1.0 / (scale * theta ** exponent), attn_factor

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T), integer or fractional (V2PE) -> cos, sin (B, T, head_dim) in fp32."""
        fractional = positions.is_floating_point()  # V2PE positions never use dynamic scaling
        seq_len = 0 if fractional and self.kind == "dynamic" else int(positions.max()) + 1
        inv_freq, attn_factor = self.inv_freq(seq_len, positions.device)
        angle = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
        emb = torch.cat([angle, angle], dim=-1)  # (B, T, hd)
        return emb.cos() * attn_factor, emb.sin() * attn_factor


def apply_rope(x, cos, sin):
    """x (B, nh, T, hd); cos/sin (B, 1, T, hd) in the dtype the rotation runs in."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class KVCache:
    """Static, preallocated keys and values for every layer: (layers, B, n_kv, max_len, hd)."""

    def __init__(self, cfg: LLMConfig, batch: int, max_len: int, dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, layer: int, start, k, v):
        """Write k/v (B, n_kv, T, hd) at positions start..start+T-1; return the cache up to there.
        start as a (T,) tensor of slots (the compiled decode step): return the whole cache, the mask hides the rest."""
        if isinstance(start, torch.Tensor):
            self.k[layer].index_copy_(2, start, k)
            self.v[layer].index_copy_(2, start, v)
            return self.k[layer], self.v[layer]
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv, self.hd = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # q, k and v stacked in one matrix (the checkpoint's q_proj/k_proj/v_proj, concatenated at load): one GEMV
        self.qkv_sizes = cfg.qkv_sizes
        self.qkv_proj = Linear(cfg.hidden_size, sum(self.qkv_sizes), bias=cfg.qkv_bias)
        self.o_proj = Linear(self.n_head * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's hd features, before RoPE
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, start):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q, k, v = q.view(B, T, self.n_head, self.hd), k.view(B, T, self.n_kv, self.hd), v.view(B, T, self.n_kv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)  # (B, n_kv, start+T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv != self.n_head)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # [gate; up], one GEMV
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(start: int, T: int, key_mask, device=None):
    """Boolean (B, 1, T, start+T) mask, or None where SDPA's plain causal (or no) mask is exact.
    key_mask (B, >=start+T) marks real tokens (False = left padding)."""
    if key_mask is None and (start == 0 or T == 1):
        return None
    S = start + T
    key = torch.arange(S, device=device)[None, :]  # (1, S)
    query = torch.arange(start, S, device=device)[:, None]  # (T, 1)
    mask = key <= query  # causal: query t sees keys <= start+t
    if key_mask is not None:  # left padding: nobody sees a pad, but a pad query sees itself (no all-False row, no NaN)
        mask = (mask & key_mask[:, None, None, :S]) | (key == query)
    return mask


class LanguageModel(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg, self.rope = cfg, RoPE(cfg)
        self.model = nn.ModuleDict(dict(
            # _weight skips the random init (on the meta device it imports torch._dynamo: a second of load time)
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                      _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        w = self.model.embed_tokens.weight  # never quantized: the activations' dtype
        return KVCache(self.cfg, batch, max_len, w.dtype, w.device)

    def forward(self, input_ids=None, inputs_embeds=None, positions=None, cache=None, start=0, key_mask=None,
                last_only=False):
        """-> logits (B, T, vocab), or (B, 1, vocab) with last_only. With a cache, the tokens sit at start..start+T-1."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        if positions is None:
            positions = torch.arange(start, start + T, device=x.device).expand(B, T)
        cos, sin = self.rope_cos_sin(positions, x.dtype)
        return self.run(x, cos, sin, attention_mask(start, T, key_mask, x.device), cache, start, last_only)

    def rope_cos_sin(self, positions, dtype):
        """(B, T) positions -> cos, sin (B, 1, T, hd) in the dtype the rotation runs in (V2PE rotates in fp32)."""
        cos, sin = self.rope(positions)  # (B, T, hd) fp32
        rope_dtype = torch.float32 if positions.is_floating_point() else dtype
        return cos[:, None].to(rope_dtype), sin[:, None].to(rope_dtype)

    def run(self, x, cos, sin, mask, cache, start, last_only=False):
        """The blocks, the final norm and the head: x (B, T, D) -> logits. With fixed shapes (step()) it is what
        generate(compile=True) compiles."""
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache, start)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    def step(self, input_ids, positions, cache, slot: int, key_mask=None, run=None):
        """One decode step against the whole static cache, so every shape is fixed: input_ids, positions (B, 1),
        the token goes to cache slot `slot` -> logits (B, 1, vocab). run: self.run or a compiled copy of it."""
        x = self.model.embed_tokens(input_ids)  # (B, 1, D)
        cos, sin = self.rope_cos_sin(positions, x.dtype)
        mask = (torch.arange(cache.max_len, device=x.device) <= slot)[None, None, None, :]  # (1, 1, 1, max_len)
        if key_mask is not None:  # left padding stays masked
            mask = mask & key_mask[:, None, None, :cache.max_len]
        return (run or self.run)(x, cos, sin, mask, cache, torch.tensor([slot], device=x.device))
