"""InternVL = InternViT -> pixel shuffle -> mlp1 -> image features spliced into the decoder's embeddings."""
import math
import random

import torch
import torch.nn as nn

from nanovl import chat as chat_api, generation
from nanovl.config import InternVLConfig
from nanovl.errors import NanovlError
from nanovl.llm import LanguageModel
from nanovl.vision import VisionModel


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5, ps_version: str = "v2") -> torch.Tensor:
    """(N, h, w, C) -> (N, h*s, w*s, C/s^2): each output token holds a 2x2 block of patches.
    Channels are [(2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1)]; v1 (InternVL 1.1/1.2) leaves the token grid transposed."""
    N, h, w, C = x.shape
    x = x.reshape(N, h, int(w * scale), int(C / scale))  # merge column pairs: (N, h, w/2, 2C)
    x = x.permute(0, 2, 1, 3).reshape(N, int(w * scale), int(h * scale), int(C / scale ** 2))  # merge row pairs: (N, w/2, h/2, 4C)
    return x if ps_version == "v1" else x.permute(0, 2, 1, 3).contiguous()  # v2: back to (N, h/2, w/2, 4C)


def v2pe_positions(input_ids: torch.Tensor, img_context_id: int, stride: int, num_image_token: int) -> torch.Tensor:
    """V2PE (OpenGVLab PR #1000): text advances the position by 1, each <IMG_CONTEXT> by stride/num_image_token;
    after an image the position resumes at ceil(last image position) + 1. (T,) ids -> (T,) float32 positions."""
    is_img, out, p, t = (input_ids == img_context_id).tolist(), [], -1.0, 0
    while t < len(is_img):
        if not is_img[t]:
            p, t = p + 1, t + 1
            out.append(p)
            continue
        n = next((i for i in range(t, len(is_img)) if not is_img[i]), len(is_img)) - t  # tokens of this image
        delta = (stride if stride is not None else random.choice([2 ** i for i in range(9)])) / num_image_token
        out += torch.linspace(p, p + delta * n, n + 1)[1:].tolist()
        p, t = math.ceil(p + delta * n), t + n
    return torch.tensor(out, dtype=torch.float32)


class InternVL(nn.Module):
    def __init__(self, config: InternVLConfig):
        super().__init__()
        self.config = config
        v, llm = config.vision_config, config.llm_config
        width = v.hidden_size * int(1 / config.downsample_ratio) ** 2  # 4C after pixel shuffle
        self.vision_model = VisionModel(v, config.select_layer)
        self.mlp1 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, llm.hidden_size), nn.GELU(),
                                  nn.Linear(llm.hidden_size, llm.hidden_size))
        self.language_model = LanguageModel(llm)
        self.tokenizer = None  # set by nanovl.load()
        self.img_context_token_id = config.image_token_id  # the tokenizer's <IMG_CONTEXT> once loaded
        self.rope_pos_id_version, self.rope_pos_id_stride = config.rope_pos_id_version, config.rope_pos_id_stride
        self._features = (None, None, None)  # (pixel_values, its version, vit_embeds): reused across chat turns

    @property
    def device(self) -> torch.device:
        return self.mlp1[1].weight.device

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, 448, 448) tiles -> (N, 256, D) image tokens for the decoder."""
        x = self.vision_model(pixel_values.to(self.mlp1[1].weight))[:, 1:]  # drop the class token: (N, 1024, C)
        N, P, C = x.shape
        side = int(P ** 0.5)
        x = pixel_shuffle(x.reshape(N, side, side, C), self.config.downsample_ratio, self.config.ps_version)
        return self.mlp1(x.reshape(N, -1, x.shape[-1]))  # (N, 256, 4C) -> (N, 256, D)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """extract_feature, remembered for the last pixel_values tensor so later chat turns do not re-encode it."""
        pv, version, vit = self._features
        if pv is not pixel_values or version != pixel_values._version:
            vit = self.extract_feature(pixel_values)
            self._features = (pixel_values, pixel_values._version, vit)
        return vit

    def embed(self, input_ids, pixel_values=None, vit_embeds=None) -> torch.Tensor:
        """Token embeddings (B, T, D) with the <IMG_CONTEXT> slots filled by image tokens, in order."""
        x = self.language_model.model.embed_tokens(input_ids)
        if pixel_values is None and vit_embeds is None:
            return x
        if self.img_context_token_id is None:
            raise NanovlError("img_context_token_id is not set: load a checkpoint with tokenizer files or set it")
        vit = self.extract_feature(pixel_values) if vit_embeds is None else vit_embeds  # (tiles, 256, D)
        slots = input_ids == self.img_context_token_id  # (B, T)
        if int(slots.sum()) != vit.shape[0] * vit.shape[1]:
            raise NanovlError(f"the prompt has {int(slots.sum())} <IMG_CONTEXT> tokens but the images give "
                              f"{vit.shape[0]} tiles x {vit.shape[1]} = {vit.shape[0] * vit.shape[1]} image tokens")
        return x.masked_scatter(slots[..., None], vit.to(x.dtype))  # batch-major, image by image

    def positions(self, input_ids, attention_mask=None) -> torch.Tensor:
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
                                             self.config.num_image_token).to(pos.device)
        return pos

    def forward(self, input_ids, pixel_values=None, attention_mask=None, vit_embeds=None) -> torch.Tensor:
        """-> logits (B, T, vocab) for the whole sequence (no cache)."""
        x = self.embed(input_ids, pixel_values, vit_embeds)
        key_mask = None if attention_mask is None or attention_mask.all() else attention_mask.bool()
        return self.language_model(inputs_embeds=x, positions=self.positions(input_ids, attention_mask),
                                   key_mask=key_mask)

    @torch.inference_mode()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=32, eos_token_id=None,
                 **sampling) -> torch.Tensor:
        """-> (B, new) token ids; rows that stopped are padded with their stop token. eos_token_id=None never stops early."""
        tokens = list(generation.generate(self, input_ids, pixel_values, attention_mask, max_new_tokens,
                                          eos_token_id, **sampling))
        return torch.stack(tokens, dim=1) if tokens else input_ids.new_zeros(input_ids.shape[0], 0)

    chat = chat_api.chat  # the conversation API lives in chat.py
    stream = chat_api.stream
    batch_chat = chat_api.batch_chat
