"""The one decoder: Qwen2/2.5, Qwen3, LLaMA/Yi, InternLM2/2.5 and Phi-3 differ only by config and weight names."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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
    """Rotary position embedding (rotate-half), with the rope_scaling variants InternVL checkpoints use:
    default (Qwen2/2.5, Qwen3, LLaMA/Yi), dynamic NTK (InternLM2, InternVL3's Qwen2.5) and su/LongRoPE (Phi-3).
    Only the scaled kinds need the sequence length (a host sync on GPU); the default one never reads it."""

    def __init__(self, cfg: LLMConfig):
        self.dim, self.theta, self.max_pos = cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings
        self.scaling = dict(cfg.rope_scaling or {})
        self.kind = self.scaling.get("rope_type", self.scaling.get("type", "default"))
        if self.kind not in ("default", "dynamic", "su", "longrope"):
            raise NanovlError(f"unsupported rope_scaling {cfg.rope_scaling}")
        self.orig_max = self.scaling.get("original_max_position_embeddings", cfg.original_max_position_embeddings)

    def frequencies(self, seq_len: int, device) -> tuple[torch.Tensor, float]:
        """-> (inv_freq (hd/2,), attn_factor): the rotation speed of each frequency and LongRoPE's cos/sin scale."""
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
        needs_len = self.kind != "default" and not (fractional and self.kind == "dynamic")
        seq_len = int(positions.max()) + 1 if needs_len else 0
        inv_freq, attn_factor = self.frequencies(seq_len, positions.device)
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

    def update(self, layer: int, start: int, k, v):
        """Write k/v (B, n_kv, T, hd) at positions start..start+T-1; return the keys and values up to there."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def update_static(self, layer: int, slots: torch.Tensor, k, v):
        """The compiled decode step's version: write at the (T,) tensor `slots`, return the WHOLE cache (fixed
        shapes; the attention mask hides the slots not yet written)."""
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]


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
        if cache is not None and isinstance(start, torch.Tensor):  # decode_step_static: the whole cache
            k, v = cache.update_static(self.layer, start, k, v)
        elif cache is not None:
            k, v = cache.update(self.layer, start, k, v)  # (B, n_kv, start+T, hd)
        gqa = self.n_kv != self.n_head
        if isinstance(mask, list):  # packed samples, one row: causal attention inside each (flash_attn_varlen_func)
            y = torch.cat([F.scaled_dot_product_attention(*qkv, is_causal=True, enable_gqa=gqa)
                           for qkv in zip(q.split(mask, 2), k.split(mask, 2), v.split(mask, 2))], dim=2)
        elif T == 1 and gqa:  # decode: the query heads that share a kv head become the rows of one plain SDPA
            g = self.n_head // self.n_kv  # (on CPU, SDPA's GQA path for one query is many times slower)
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, g, self.hd), k, v, attn_mask=mask)  # (B, n_kv, g, hd)
            y = y.reshape(B, self.n_head, 1, self.hd)  # query head h = kv head h // g, as enable_gqa pairs them
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=gqa)  # (B, nh, T, hd)
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


def attention_mask(start: int, T: int, key_mask=None, segment_ids=None, device=None, S=None):
    """Boolean (B, 1, T, S) mask (S = start+T by default), or None where SDPA's plain causal (or no) mask is exact.
    key_mask (B, >=S) marks real tokens (False = left padding); segment_ids (B, T) number the samples packed into
    one row (training): a token sees only earlier tokens of its own sample (block-diagonal causal). One packed row
    gives the list of its samples' lengths instead: attention then runs sample by sample, no T x T mask."""
    if key_mask is None and segment_ids is None and (start == 0 or T == 1) and S is None:
        return None
    if segment_ids is not None and segment_ids.shape[0] == 1 and key_mask is None and start == 0 and S is None:
        return torch.unique_consecutive(segment_ids[0], return_counts=True)[1].tolist()  # lengths, in order
    S = start + T if S is None else S
    key = torch.arange(S, device=device)[None, :]  # (1, S)
    query = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
    mask = (key <= query)[None, None]  # causal: query t sees keys <= start+t
    if segment_ids is not None:  # packed samples: (B, 1, T, T), no start offset in training
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if key_mask is not None:  # left padding: nobody sees a pad, but a pad query sees itself (no all-False row, no NaN)
        mask = (mask & key_mask[:, None, None, :S]) | (key == query)
    return mask


class LanguageModel(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg, self.rope = cfg, RoPE(cfg)
        self.model = nn.ModuleDict(dict(
            # _weight skips nn.Embedding's own init (on the meta device it imports torch._dynamo: a second of load
            # time); padding_idx: that row gets no gradient, as in the reference decoders
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id,
                                      _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False  # training: recompute each block in the backward pass
        self.compiled_decode = None  # generate(compile=True): torch.compile of layers_norm_head, made once
        if not self.lm_head.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """The reference decoders' init: normal(0, initializer_range) for linears and the embedding, zero biases and
        padding row, norms at one."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, self.cfg.initializer_range)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        w = self.model.embed_tokens.weight  # never quantized: the activations' dtype
        return KVCache(self.cfg, batch, max_len, w.dtype, w.device)

    def forward(self, input_ids=None, inputs_embeds=None, positions=None, cache=None, start=0, key_mask=None,
                last_only=False, segment_ids=None, return_hidden=False):
        """-> logits (B, T, vocab), or (B, 1, vocab) with last_only, or with return_hidden the final-norm hidden
        states (B, T, D) that the head would read. With a cache, the tokens sit at start..start+T-1."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        if positions is None:
            positions = torch.arange(start, start + T, device=x.device).expand(B, T)
        cos, sin = self.rope_cos_sin(positions, x.dtype)
        mask = attention_mask(start, T, key_mask, segment_ids, x.device)
        return self.layers_norm_head(x, cos, sin, mask, cache, start, last_only, head=not return_hidden)

    def rope_cos_sin(self, positions, dtype):
        """(B, T) positions -> cos, sin (B, 1, T, hd) in the dtype the rotation runs in (V2PE rotates in fp32)."""
        cos, sin = self.rope(positions)  # (B, T, hd) fp32
        rope_dtype = torch.float32 if positions.is_floating_point() else dtype
        return cos[:, None].to(rope_dtype), sin[:, None].to(rope_dtype)

    def layers_norm_head(self, x, cos, sin, mask, cache, start, last_only=False, head=True):
        """The blocks, the final norm and the head: x (B, T, D) -> logits. With fixed shapes (decode_step_static)
        it is what generate(compile=True) compiles."""
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, start, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, start)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        return self.lm_head(x) if head else x

    def decode_step_static(self, input_ids, positions, cache, slot: int, key_mask=None, run=None):
        """One decode step against the whole static cache, so every shape is fixed: input_ids, positions (B, 1),
        the token goes to cache slot `slot` -> logits (B, 1, vocab). run: layers_norm_head or a compiled copy."""
        x = self.model.embed_tokens(input_ids)  # (B, 1, D)
        cos, sin = self.rope_cos_sin(positions, x.dtype)
        mask = attention_mask(slot, 1, key_mask, None, x.device, S=cache.max_len)  # (B|1, 1, 1, max_len)
        return (run or self.layers_norm_head)(x, cos, sin, mask, cache, torch.tensor([slot], device=x.device))


def token_losses(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Next-token cross-entropy without the (T, vocab) logits of every position: hidden (B, T, D) final-norm states,
    labels (B, T) with -100 where nothing is learned -> (B, T) fp32 losses, [b, t] = CE(head(hidden[b, t-1]),
    labels[b, t]) (0 at t = 0 and where the label is -100). Only the labelled positions go through the head, as fp32
    logits (the reference casts them with .float()), `chunk` rows at a time; with more than one chunk each chunk's
    logits are recomputed in the backward pass instead of kept."""
    target = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    rows = (target != -100).nonzero(as_tuple=True)
    h, y = hidden[:, :-1][rows], target[rows]  # (M, D), (M,)

    def ce(h, y):
        return F.cross_entropy(head(h).float(), y, reduction="none")

    pieces = [checkpoint(ce, h[i:i + chunk], y[i:i + chunk], use_reentrant=False) if len(h) > chunk and
              torch.is_grad_enabled() else ce(h[i:i + chunk], y[i:i + chunk]) for i in range(0, len(h), chunk)]
    out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    if not pieces:  # nothing to learn: still part of the graph (every process of a sharded model runs backward)
        return out + 0 * hidden.sum()
    out[:, 1:][rows] = torch.cat(pieces)
    return out
