"""InternVL3.5-Flash's Visual Resolution Router (ViR), as the Flash checkpoints' remote code runs it
(modeling_internvl_chat.py: CrossAttentionPooling, Gating, generate_flash): for every 448 tile, a pooled gating score
decides whether the tile keeps 256 image tokens (pixel shuffle 0.5 + mlp1) or is compressed to 64 (pixel shuffle
0.25 + mlp2).

    p = softmax(gating(pooling(vit tokens of the tile)))[0]            the probability of "compress"
    compress the tile  iff  p > quantile(p of every tile of the call, flash_relative_threshold)
                       and  p >= flash_absolute_threshold

so a call with a single tile is never compressed, and the least likely tiles never are. The prompt is built with
256 <IMG_CONTEXT> a tile, and a compressed tile's block keeps its first 64 (compress_prompt); positions stay
contiguous. Sources: the Flash checkpoints' modeling_internvl_chat.py (extract_feature_flash, generate_flash,
compress_visual_tokens_in_sentence); shared/reference/internvl3_5.md section 2.
"""
import torch
import torch.nn as nn

from nanovl.errors import NanovlError


class CrossAttentionPooling(nn.Module):
    """One learned query attends to a tile's 1024 ViT tokens: attn1/norm1, then attn2/norm2 three times. attn3/norm3
    and attn4/norm4 exist in the checkpoints but the original never runs them (transformers' port does: it gets
    other scores). (T, 1024, C) -> (T, C)."""

    def __init__(self, dim: int, num_heads: int = 16):
        super().__init__()
        self.query_token = nn.Parameter(torch.randn(1, dim))
        for i in range(1, 5):
            setattr(self, f"attn{i}", nn.MultiheadAttention(dim, num_heads, batch_first=True))
            setattr(self, f"norm{i}", nn.LayerNorm(dim))

    def forward(self, x):
        q = self.query_token[None].expand(x.shape[0], 1, -1).to(x.dtype)  # (T, 1, C)
        q = self.norm1(self.attn1(q, x, x)[0])
        for _ in range(3):  # sic: attn2 three times
            q = self.norm2(self.attn2(q, x, x)[0])
        return q[:, 0]  # (T, C)


class Gating(nn.Module):
    """Four residual blocks x + [Linear, GELU, Dropout, Linear, Dropout, LayerNorm](x), then LayerNorm, Linear(C, 2),
    softmax: (T, C) -> (T, 2), column 0 the probability of compressing the tile to 64 tokens."""

    def __init__(self, dim: int, expansion: int = 4, dropout: float = 0.1):
        super().__init__()
        for i in range(1, 5):  # Sequential, so the weights keep the original's indices .0 / .3 / .5
            setattr(self, f"block{i}", nn.Sequential(nn.Linear(dim, dim * expansion), nn.GELU(), nn.Dropout(dropout),
                                                     nn.Linear(dim * expansion, dim), nn.Dropout(dropout),
                                                     nn.LayerNorm(dim)))
        self.gate = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2))

    def forward(self, x):
        for i in range(1, 5):
            x = x + getattr(self, f"block{i}")(x)
        return self.gate(x).softmax(-1)


def mlp2(vit_hidden: int, llm_hidden: int) -> nn.Sequential:
    """The 64-token projector: LayerNorm(16C), Linear(16C, 2D), GELU, Dropout, Linear(2D, 2D), GELU, Dropout,
    Linear(2D, D) (weights mlp2.0 / .1 / .4 / .7)."""
    C16, D = 16 * vit_hidden, llm_hidden
    return nn.Sequential(nn.LayerNorm(C16), nn.Linear(C16, 2 * D), nn.GELU(), nn.Dropout(0.1),
                         nn.Linear(2 * D, 2 * D), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * D, D))


def decide(p: torch.Tensor, relative: float, absolute: float) -> torch.Tensor:
    """(T,) compress probabilities -> (T,) bool. The quantile (linear) is taken in fp32 over the tiles of the call;
    both comparisons run in p's dtype, as the original's type promotion does (bf16 checkpoints round the
    thresholds to bf16, which can change a decision)."""
    r = torch.quantile(p.float(), relative)
    return (p > r.to(p.dtype)) & (p >= torch.tensor(absolute, dtype=p.dtype))


def compress_prompt(ids: list, tile_tokens: list, img_context_id: int, block: int = 256) -> list:
    """The original's compress_visual_tokens_in_sentence for one prompt: every run of <IMG_CONTEXT> is cut into
    blocks of 256, one per tile in order, and tile k's block keeps its first tile_tokens[k] (256, or 64 when the
    router compressed it). (T,) ids -> (T - dropped,) ids."""
    out, k, t = [], 0, 0
    while t < len(ids):
        if ids[t] != img_context_id:
            out.append(ids[t])
            t += 1
            continue
        n = next((i for i in range(t, len(ids)) if ids[i] != img_context_id), len(ids)) - t  # this run's length
        if n % block:
            raise NanovlError(f"a run of {n} <IMG_CONTEXT> tokens is not a whole number of {block}-token tiles: "
                              "the Flash router needs the prompt built with 256 a tile")
        for _ in range(n // block):
            if k == len(tile_tokens):
                raise NanovlError(f"the prompt has more {block}-token image blocks than the {len(tile_tokens)} tiles")
            out += [img_context_id] * tile_tokens[k]
            k += 1
        t += n
    if k != len(tile_tokens):
        raise NanovlError(f"the prompt has {k} {block}-token image blocks but there are {len(tile_tokens)} tiles")
    return out


def tile_map(tiles: list, cols: int, rows: int, compressed, size: int = 224):
    """A picture of an image's tiles (row-major, the thumbnail last) with each compressed tile tinted orange and
    each kept one blue, and the tokens each keeps: what `--show-routing FILE` writes."""
    from PIL import Image, ImageDraw

    n = len(tiles)
    canvas = Image.new("RGB", (cols * size + (size if n > cols * rows else 0) + 8 * cols, rows * size + 8 * rows),
                       "white")
    for k, (tile, c) in enumerate(zip(tiles, compressed)):
        x, y = ((k % cols) * (size + 8), (k // cols) * (size + 8)) if k < cols * rows else (cols * (size + 8), 0)
        t = tile.convert("RGB").resize((size, size))
        tint = Image.new("RGB", (size, size), (255, 140, 0) if c else (40, 110, 255))
        canvas.paste(Image.blend(t, tint, 0.35), (x, y))
        ImageDraw.Draw(canvas).text((x + 6, y + 6), f"{64 if c else 256} tokens" + (" (thumbnail)" if k >= cols * rows
                                                                                     else ""), fill="white")
    return canvas
