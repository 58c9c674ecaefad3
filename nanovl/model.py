"""InternVL = InternViT -> pixel shuffle -> mlp1 -> image features spliced into the decoder's embeddings.

Where things are: the forward pass is here; chat()/stream()/batch_chat() are in chat.py (bound below as methods),
the decode loop in generation.py, the decoder in llm.py, the ViT in vision.py, loading and saving in weights.py.
"""
import math

import torch
import torch.nn as nn

from nanovl import chat as chat_api, generation, limits, preprocess, router, weights
from nanovl.config import InternVLConfig
from nanovl.errors import NanovlError
from nanovl.llm import LanguageModel, token_losses
from nanovl.vision import VisionModel


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5, ps_version: str = "v2") -> torch.Tensor:
    """(N, h, w, C) -> (N, h*s, w*s, C/s^2): each output token holds a 2x2 block of patches.
    Channels are [(2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1)]; v1 (InternVL 1.1/1.2) leaves the token grid transposed."""
    N, h, w, C = x.shape
    x = x.reshape(N, h, int(w * scale), int(C / scale))  # merge column pairs: (N, h, w/2, 2C)
    x = x.permute(0, 2, 1, 3).reshape(N, int(w * scale), int(h * scale), int(C / scale ** 2))  # merge row pairs: (N, w/2, h/2, 4C)
    return x if ps_version == "v1" else x.permute(0, 2, 1, 3).contiguous()  # v2: back to (N, h/2, w/2, 4C)


def v2pe_positions(input_ids: torch.Tensor, img_context_id: int, stride: int | None, num_image_token: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """V2PE (OpenGVLab PR #1000): text advances the position by 1, each <IMG_CONTEXT> by stride/num_image_token;
    after an image the position resumes at ceil(last image position) + 1. stride None (v2pe_rnd): drawn per image
    from {1, 2, ..., 256} with `generator`. (T,) ids -> (T,) float32 positions."""
    is_img, out, p, t = (input_ids == img_context_id).tolist(), [], -1.0, 0
    while t < len(is_img):
        if not is_img[t]:
            p, t = p + 1, t + 1
            out.append(p)
            continue
        n = next((i for i in range(t, len(is_img)) if not is_img[i]), len(is_img)) - t  # tokens of this image
        s = stride if stride is not None else 2 ** int(torch.randint(9, (), generator=generator))
        delta = s / num_image_token
        out += torch.linspace(p, p + delta * n, n + 1)[1:].tolist()
        p, t = math.ceil(p + delta * n), t + n
    return torch.tensor(out, dtype=torch.float32)


class InternVL(nn.Module):
    # the conversation API of the reference, in chat.py: chat/stream/batch_chat -> generation.generate -> forward
    chat = chat_api.chat
    stream = chat_api.stream
    batch_chat = chat_api.batch_chat

    def __init__(self, config: InternVLConfig):
        super().__init__()
        self.config = config
        v, llm = config.vision_config, config.llm_config
        width = v.hidden_size * int(1 / config.downsample_ratio) ** 2  # 4C after pixel shuffle
        self.vision_model = VisionModel(v, config.select_layer)
        # a Sequential only so that the weights are named mlp1.0 / mlp1.1 / mlp1.3, as in the checkpoints
        self.mlp1 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, llm.hidden_size), nn.GELU(),
                                  nn.Linear(llm.hidden_size, llm.hidden_size))  # PyTorch's default init, as the original
        self.language_model = LanguageModel(llm)
        if config.flash_mode is not None:  # InternVL3.5-Flash: the router and the 64-token projector (router.py)
            self.mlp2 = router.mlp2(v.hidden_size, llm.hidden_size)
            self.pooling_before_gating = router.CrossAttentionPooling(v.hidden_size)
            self.gating = router.Gating(v.hidden_size)
        self.flash_force = None  # Flash only: None lets the router decide; 256 or 64 gives every tile that many tokens
        self.tokenizer = None  # set by nanovl.load()
        self.img_context_token_id = config.image_token_id  # the tokenizer's <IMG_CONTEXT> once loaded
        self.rope_pos_id_version, self.rope_pos_id_stride = config.rope_pos_id_version, config.rope_pos_id_stride
        self.source = None  # (checkpoint dir, format) once loaded: saving carries what nanovl does not build

    @property
    def device(self) -> torch.device:
        return self.mlp1[1].weight.device

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, 448, 448) tiles -> (N, 256, D) image tokens for the decoder."""
        proj = self.mlp1[1].weight  # the projector's device and dtype
        x = self.vision_model(pixel_values.to(device=proj.device))[:, 1:]  # drop the class token: (N, 1024, C)
        N, P, C = x.shape
        side = int(P ** 0.5)  # the patch grid is square (32 x 32 at 448 px)
        x = pixel_shuffle(x.reshape(N, side, side, C), self.config.downsample_ratio, self.config.ps_version)
        return self.mlp1(x.reshape(N, -1, x.shape[-1]).to(proj.dtype))  # (N, 256, 4C) -> (N, 256, D)

    @property
    def routes(self) -> bool:
        """Whether chat and generate send the tiles through the Flash router (flash_mode on in config.json)."""
        return bool(self.config.flash_mode)

    def extract_feature_flash(self, pixel_values: torch.Tensor):
        """Flash: the ViT once, the router's scores, then each tile through mlp1 (256 tokens) or, if compressed, pixel
        shuffle 0.25 + mlp2 (64 tokens). (N, 3, 448, 448) -> ([N tensors (256 or 64, D)], scores (N,), compressed (N,))."""
        proj = self.mlp1[1].weight
        x = self.vision_model(pixel_values.to(device=proj.device))[:, 1:].to(proj.dtype)  # (N, 1024, C)
        scores, compressed = self.decide(x)
        N, P, C = x.shape
        grid = x.reshape(N, 32, 32, C)
        out = [None] * N
        for keep, mlp, scale in ((~compressed, self.mlp1, 0.5), (compressed, self.mlp2, 0.25)):
            if keep.any():  # (n, 32s, 32s, C/s^2) -> (n, 1024 s^2, D): 256 tokens at s = 0.5, 64 at s = 0.25
                y = pixel_shuffle(grid[keep], scale, self.config.ps_version)
                for i, t in zip(keep.nonzero()[:, 0].tolist(), mlp(y.reshape(len(y), -1, y.shape[-1]))):
                    out[i] = t
        return out, scores, compressed

    def decide(self, x: torch.Tensor):
        """(N, 1024, C) ViT tokens -> the router's probability of compressing each tile (N,) and its decisions (N,),
        relative to all N tiles; flash_force (256 or 64) overrides the decisions, not the scores."""
        scores = self.gating(self.pooling_before_gating(x))[:, 0]  # (N,)
        if self.flash_force is None:
            c = self.config
            return scores, router.decide(scores, c.flash_relative_threshold, c.flash_absolute_threshold)
        if self.flash_force not in (256, 64):
            raise NanovlError(f"flash_force must be None, 256 or 64, got {self.flash_force!r}")
        return scores, torch.full_like(scores, self.flash_force == 64, dtype=torch.bool)

    @torch.inference_mode()
    def route(self, pixel_values: torch.Tensor):
        """Flash: what the router decides for the tiles of one call (all images together, as chat does):
        (N, 3, 448, 448) -> (scores (N,) fp32, the probability of "compress"; compressed (N,) bool)."""
        if not hasattr(self, "gating"):
            raise NanovlError("this checkpoint has no Flash router (config.json has no flash_mode)")
        limits.pixel_values(pixel_values, self.config.image_size, self.config.vision_config.num_channels)
        proj = self.mlp1[1].weight
        scores, compressed = self.decide(self.vision_model(pixel_values.to(proj.device))[:, 1:].to(proj.dtype))
        return scores.float(), compressed

    def embed(self, input_ids, vit_embeds=None) -> torch.Tensor:
        """Token embeddings (B, T, D) with the <IMG_CONTEXT> slots filled by the image tokens, in order: a (tiles, 256,
        D) tensor, or a list of per-tile (n, D) tensors (Flash: 256 or 64 each)."""
        x = self.language_model.model.embed_tokens(input_ids)
        if vit_embeds is None:
            return x
        if self.img_context_token_id is None:
            raise NanovlError("img_context_token_id is not set: load a checkpoint with tokenizer files or set it")
        if isinstance(vit_embeds, (list, tuple)):
            given = f"{len(vit_embeds)} tiles of {' + '.join(str(len(t)) for t in vit_embeds)}"
            vit_embeds = torch.cat(list(vit_embeds))  # (sum of the tiles' tokens, D)
        else:
            given = f"{len(vit_embeds)} tiles x {vit_embeds.shape[1]}"
        slots = input_ids == self.img_context_token_id  # (B, T)
        tokens = vit_embeds.numel() // vit_embeds.shape[-1]
        if int(slots.sum()) != tokens:
            raise NanovlError(f"the prompt has {int(slots.sum())} <IMG_CONTEXT> tokens but the images give "
                              f"{given} = {tokens}")
        return x.masked_scatter(slots[..., None], vit_embeds.to(x.dtype))  # batch-major, image by image

    def positions(self, input_ids, attention_mask=None, generator=None) -> torch.Tensor:
        """(B, T) positions: integers (cumsum of the mask under left padding), or V2PE's fractional ones."""
        B, T = input_ids.shape
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pos = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)
        if not self.rope_pos_id_version.startswith("v2pe"):
            return pos
        if self.img_context_token_id is None:
            raise NanovlError("V2PE needs img_context_token_id")
        stride = self.rope_pos_id_stride if self.rope_pos_id_version == "v2pe_fix" else None
        pos = pos.float()
        for b in range(B):
            pos[b, mask[b]] = v2pe_positions(input_ids[b, mask[b]], self.img_context_token_id, stride,
                                             self.config.num_image_token, generator).to(pos.device)
        return pos

    def forward(self, input_ids, pixel_values=None, attention_mask=None, vit_embeds=None, image_flags=None,
                position_ids=None, labels=None, segment_ids=None) -> torch.Tensor:
        """-> logits (B, T, vocab) for the whole sequence (no cache).
        Training: image_flags (tiles,) drops the tiles marked 0 after the ViT (pure-text samples carry one dummy
        tile); position_ids (B, T) as the data gives them; segment_ids (B, T) keep packed samples apart; labels (B, T)
        -> instead of logits, the (B, T) fp32 next-token losses of llm.token_losses (no logits for unlabelled
        positions, such as image tokens)."""
        if pixel_values is not None and vit_embeds is None:
            vit_embeds = self.extract_feature(pixel_values)
        if vit_embeds is not None and image_flags is not None:
            vit_embeds = vit_embeds[image_flags.to(vit_embeds.device) == 1]
        x = self.embed(input_ids, vit_embeds)
        positions = position_ids if position_ids is not None else self.positions(input_ids, attention_mask)
        key_mask = None if attention_mask is None or attention_mask.all() else attention_mask.bool()
        if labels is None:
            return self.language_model(inputs_embeds=x, positions=positions, key_mask=key_mask,
                                       segment_ids=segment_ids)
        hidden = self.language_model(inputs_embeds=x, positions=positions, key_mask=key_mask,
                                     segment_ids=segment_ids, return_hidden=True)
        return token_losses(hidden, self.language_model.lm_head, labels)

    @torch.inference_mode()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=32, eos_token_id=None,
                 **sampling) -> torch.Tensor:
        """-> (B, new) token ids; rows that stopped are padded with their stop token. eos_token_id=None never stops early."""
        limits.token_ids(input_ids, self.config.llm_config.vocab_size)
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                           or attention_mask.shape != input_ids.shape):
            raise NanovlError(f"attention_mask must be a tensor of the shape of input_ids {tuple(input_ids.shape)}")
        if pixel_values is not None:
            limits.pixel_values(pixel_values, self.config.image_size, self.config.vision_config.num_channels)
        for i in [] if eos_token_id is None else [eos_token_id] if not isinstance(eos_token_id, (list, tuple)) \
                else eos_token_id:
            limits.whole(i, "eos_token_id", 0)
        limits.generation(max_new_tokens, **sampling)
        if pixel_values is not None and self.routes:  # Flash: each row's tiles routed together, its prompt compressed
            input_ids, attention_mask, vit_embeds = self.route_rows(input_ids, attention_mask, pixel_values)
        else:
            vit_embeds = None if pixel_values is None else generation.encode_images(self, pixel_values)
        tokens = list(generation.generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id,
                                          vit_embeds=vit_embeds, **sampling))
        return torch.stack(tokens, dim=1) if tokens else input_ids.new_zeros(input_ids.shape[0], 0)

    def route_rows(self, input_ids, attention_mask, pixel_values):
        """Flash generate(): prompts built with 256 <IMG_CONTEXT> a tile -> the prompts with each compressed tile's
        192 extra tokens dropped, left-padded again. The original takes one prompt; here each row's tiles (in order)
        are routed among themselves, as that row alone would be."""
        rows, tiles, start = [], [], 0
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        for ids, m in zip(input_ids.tolist(), mask.tolist()):
            ids = [i for i, keep in zip(ids, m) if keep]  # the row without its left padding
            n = sum(i == self.img_context_token_id for i in ids) // self.config.num_image_token
            own = generation.encode_images(self, pixel_values[start:start + n]) if n else []
            rows.append(router.compress_prompt(ids, [len(t) for t in own], self.img_context_token_id))
            tiles, start = tiles + own, start + n
        if start != len(pixel_values):
            raise NanovlError(f"the prompts have {start} tiles' <IMG_CONTEXT> blocks but pixel_values has "
                              f"{len(pixel_values)} tiles")
        T = max(map(len, rows))
        ids = torch.tensor([[0] * (T - len(r)) + r for r in rows], device=input_ids.device)  # 0: masked padding
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=input_ids.device)
        return ids, (None if bool(mask.all()) else mask), tiles

    def load_image(self, image, max_num: int | None = None, use_thumbnail: bool | None = None) -> torch.Tensor:
        """An image file (or PIL image) -> (tiles, 3, 448, 448) tiled as this checkpoint's config says
        (dynamic_image_size, min/max_dynamic_patch, use_thumbnail, image size); max_num overrides max_dynamic_patch."""
        c = self.config
        if max_num is None and c.dynamic_image_size:  # the config's value: say where it comes from if it is too large
            limits.within("MAX_TILES", c.max_dynamic_patch, "config.json's max_dynamic_patch", "pass max_num")
        max_num = max_num if max_num is not None else c.max_dynamic_patch if c.dynamic_image_size else 1
        return preprocess.load_image(image, max_num=max_num, input_size=c.image_size, min_num=min(c.min_dynamic_patch,
                                     max_num), use_thumbnail=c.use_thumbnail if use_thumbnail is None else use_thumbnail)

    def original_state_dict(self, grads: bool = False) -> dict:
        """Every tensor (or with grads=True every .grad, None where there is none) under the ORIGINAL checkpoint's
        key names: q/k/v and gate/up un-stacked, InternLM2's wqkv re-grouped. For comparing with the original code."""
        return weights.original_state_dict(self, grads)

    def save_pretrained(self, out_dir, dtype: torch.dtype = torch.bfloat16, max_shard_size: int = 5 * 10 ** 9,
                        state_dict: dict | None = None):
        """Write a checkpoint in the original OpenGVLab layout that nanovl and the original code load (weights.py)."""
        return weights.save_pretrained(self, out_dir, dtype, max_shard_size, state_dict)
