"""Prefill once, then decode one token at a time against a static KV cache; greedy or sampled."""
import time
from dataclasses import dataclass

import torch


def sample(logits: torch.Tensor, temperature=0.0, top_k=0, top_p=1.0, generator=None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:  # keep the k largest
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@dataclass
class Stats:
    """Timings of one generate() call, for --verbose and benchmarks."""
    vision_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # after the vision encoder
    decode_s: float = 0.0  # first to last token
    prompt_tokens: int = 0
    new_tokens: int = 0
    compressed: list | None = None  # Flash: the router's decision for each tile (True: 64 tokens, False: 256)

    def decode_tps(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0


@torch.inference_mode()
def encode_images(model, pixel_values, stats: Stats | None = None):
    """The one place inference runs the vision encoder: (tiles, 3, 448, 448) -> (tiles, 256, D), timed.
    A Flash model with its router on gives a list of per-tile (256 or 64, D) tensors instead."""
    t0 = time.perf_counter()
    if model.routes:
        vit_embeds = model.extract_feature_flash(pixel_values)[0]
    else:
        vit_embeds = model.extract_feature(pixel_values)
    if stats is not None:
        stats.vision_s = time.perf_counter() - t0
    return vit_embeds


@torch.inference_mode()
def generate(model, input_ids, attention_mask=None, max_new_tokens=32, eos_token_id=None, temperature=0.0,
             top_k=0, top_p=1.0, seed=None, vit_embeds=None, stats: Stats | None = None, compile=False):
    """Yield one (B,) tensor of new token ids per step. Stops when every row has emitted a stop id
    (eos_token_id: an id, a list of ids, or None for never) or after max_new_tokens.
    vit_embeds: the image features (encode_images) for the prompt's <IMG_CONTEXT> tokens.
    compile: decode with torch.compile of the one-token step over the whole fixed-size cache (opt-in)."""
    stats = stats or Stats()
    B, T = input_ids.shape
    stop = torch.tensor([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int)
                        else list(eos_token_id), dtype=torch.long, device=input_ids.device)
    generator = None if seed is None else torch.Generator(input_ids.device).manual_seed(seed)
    lm = model.language_model

    t1 = time.perf_counter()
    x = model.embed(input_ids, vit_embeds)
    positions = model.positions(input_ids, attention_mask, generator)
    cache_len = T + max_new_tokens
    if compile:  # one compiled graph per cache length: round it up so that prompts share graphs
        cache_len = -(-cache_len // 256) * 256
        if getattr(lm, "compiled_decode", None) is None:  # compiled once per model, reused by every call
            lm.compiled_decode = torch.compile(lm.layers_norm_head, dynamic=False)
        run = lm.compiled_decode
    key_mask = None
    if attention_mask is not None and not attention_mask.all():  # left padding: the pads stay masked while decoding
        key_mask = torch.ones(B, cache_len, dtype=torch.bool, device=input_ids.device)
        key_mask[:, :T] = attention_mask.bool()
    cache = lm.new_cache(B, cache_len)
    logits = lm(inputs_embeds=x, positions=positions, cache=cache, start=0, key_mask=key_mask, last_only=True)
    next_pos = positions[:, -1:] + 1
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    t2 = time.perf_counter()
    stats.prefill_s, stats.prompt_tokens, stats.new_tokens = t2 - t1, B * T, 0

    for i in range(max_new_tokens):
        token = sample(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
        if len(stop):
            token = torch.where(done, stop[0], token)
            done |= torch.isin(token, stop)
        stats.new_tokens += 1
        if i == 0:
            stats.ttft_s, t_first = time.perf_counter() - t1, time.perf_counter()
        stats.decode_s = time.perf_counter() - t_first
        yield token
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        if compile:
            logits = lm.decode_step_static(token[:, None], next_pos, cache, T + i, key_mask, run)
        else:
            logits = lm(input_ids=token[:, None], positions=next_pos, cache=cache, start=T + i, key_mask=key_mask)
        next_pos = next_pos + 1
