"""Decoding: the static KV cache against full forwards, batched (left-padded) generation against one-by-one runs,
stopping, and sampling. Tiny random checkpoints (vocab 512, no tokenizer), fp32 on CPU.

Every check is an equivalence the reference guarantees (cache = recompute, batch = single, seeded sampling is
reproducible, temperature 0 = argmax) or a property written from the sampling definitions, not nanovl vs itself.
"""
import pytest
import torch

import fixtures as fx
from nanovl import generation
from nanovl.errors import NanovlError

FAMILIES = ["qwen2", "qwen3", "llama", "internlm2", "phi3"]
V2PE = dict(rope_pos_id_version="v2pe_fix", rope_pos_id_stride=2)  # fractional image positions (section 7)


@pytest.fixture(scope="module")
def get_model(make_ckpt):
    """get_model(llm, **config_overrides) -> (model, cfg); own instances (seed 40), not shared with other modules."""
    import nanovl

    cache = {}

    def get(llm="qwen2", **over):
        key = repr((llm, sorted(over.items())))
        if key not in cache:
            path, _, cfg = make_ckpt(llm, "300m", seed=40, **over)
            model = nanovl.load(path, dtype=torch.float32, device="cpu")
            model.img_context_token_id = fx.IMG_CONTEXT_ID
            cache[key] = model, cfg
        return cache[key]

    return get


def prompt(cfg, n_tiles, seed, prefix=5, suffix=4):
    """(1, T) ids with one image of n_tiles tiles (or none) and its pixel values."""
    if n_tiles == 0:
        return fx.random_ids(1, prefix + suffix, cfg["llm_config"]["vocab_size"], seed=seed), None
    return (fx.image_prompt(n_tiles, cfg, seed=seed, prefix=prefix, suffix=suffix),
            fx.random_pixel_values(n_tiles, seed=seed))


def left_pad(rows, pad=0):
    """[(1, T_i) ids] -> (B, T) left-padded ids and the (B, T) attention mask."""
    T = max(r.shape[1] for r in rows)
    ids = torch.cat([torch.cat([torch.full((1, T - r.shape[1]), pad), r], 1) for r in rows])
    mask = torch.cat([torch.cat([torch.zeros(1, T - r.shape[1]), torch.ones(1, r.shape[1])], 1) for r in rows]).long()
    return ids, mask


def greedy_by_recompute(model, ids, pv, n):
    """The cache-free definition of greedy decoding: a full forward over the whole sequence for every new token."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            tok = model(ids, pixel_values=pv)[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
            ids = torch.cat([ids, tok], 1)
    return torch.cat(out, 1)


# ---------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("llm", FAMILIES)
def test_prefill_chunk_and_steps_equal_full_forward(get_model, llm):
    """Prefill the prompt, then a 3-token chunk, then single tokens, all through one static cache:
    the logits at every position equal one full forward without a cache. (The prompt is longer than the tiny
    Phi-3's original_max_position_embeddings 16, so every call uses its long "su" factors, as the full forward does.)"""
    model, cfg = get_model(llm)
    ids, pv = prompt(cfg, 2, seed=1, prefix=8, suffix=10)
    T, P = ids.shape[1], ids.shape[1] - 9
    lm = model.language_model
    with torch.no_grad():
        full = model(ids, pixel_values=pv)  # (1, T, V)
        cache = lm.new_cache(1, T)
        x = model.embed(ids[:, :P], model.extract_feature(pv))
        parts = [lm(inputs_embeds=x, positions=model.positions(ids[:, :P]), cache=cache, start=0)]
        parts.append(lm(input_ids=ids[:, P:P + 3], positions=torch.arange(P, P + 3)[None], cache=cache, start=P))
        for t in range(P + 3, T):
            parts.append(lm(input_ids=ids[:, t:t + 1], positions=torch.tensor([[t]]), cache=cache, start=t))
    fx.check_close(torch.cat(parts, 1), full, f"{llm}: prefill + chunk + steps vs full forward", rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("llm,over", [(f, {}) for f in FAMILIES] + [("qwen2", V2PE)],
                         ids=FAMILIES + ["qwen2-v2pe"])
def test_generate_equals_greedy_recompute(get_model, llm, over):
    """generate() with its KV cache picks the same tokens as argmax over a full recompute at every step."""
    model, cfg = get_model(llm, **over)
    ids, pv = prompt(cfg, 3, seed=2)
    out = model.generate(ids, pixel_values=pv, max_new_tokens=8)
    assert out.shape == (1, 8)
    assert torch.equal(out, greedy_by_recompute(model, ids, pv, 8))


# ---------------------------------------------------------------------------------------------
# batches: left padding + attention mask + positions from the mask == one-by-one


@pytest.mark.parametrize("llm,over", [("qwen2", {}), ("internlm2", {}), ("phi3", {}), ("qwen2", V2PE)],
                         ids=["qwen2", "internlm2", "phi3", "qwen2-v2pe"])
def test_batch_equals_single(get_model, llm, over):
    """Three prompts of different lengths (images of 1 and 3 tiles, and none) in one left-padded batch:
    the logits at the real positions and the generated tokens equal three separate unpadded runs.
    Phi-3 "su" picks its short or long factors from the longest position in the whole batch (so does the
    reference's Phi-3 code), so there every row is made longer than original_max_position_embeddings (16)."""
    model, cfg = get_model(llm, **over)
    extra = 14 if llm == "phi3" else 0
    rows = [prompt(cfg, 1, seed=3, prefix=2 + extra), prompt(cfg, 3, seed=4, prefix=6 + extra),
            prompt(cfg, 0, seed=5, prefix=3 + extra)]
    ids, mask = left_pad([r for r, _ in rows])
    pv = torch.cat([p for _, p in rows if p is not None])  # sample by sample, in prompt order
    assert mask[:, 0].tolist() == [0, 1, 0]  # two rows really are padded
    with torch.no_grad():
        batch_logits = model(ids, pixel_values=pv, attention_mask=mask)
        for b, (r, p) in enumerate(rows):
            single = model(r, pixel_values=p)
            fx.check_close(batch_logits[b, -r.shape[1]:][None], single, f"{llm}{'-v2pe' if over else ''}: batch row {b} logits",
                           rtol=1e-4, atol=1e-4)
    n = 8
    batch = model.generate(ids, pixel_values=pv, attention_mask=mask, max_new_tokens=n)
    singles = [model.generate(r, pixel_values=p, max_new_tokens=n) for r, p in rows]
    assert batch.tolist() == [s[0].tolist() for s in singles]


def test_batch_positions_follow_the_mask(get_model):
    """Positions are cumsum(mask) - 1 (HF generate's rule): 0.. from each row's first real token, pads at 1."""
    model, _ = get_model("qwen2")
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert model.positions(torch.full((2, 5), 11), mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_batch_rows_stop_independently(get_model):
    """A row that emits the stop id is padded with it while the others go on; each row equals its single run."""
    model, cfg = get_model("qwen2")
    rows = [prompt(cfg, 2, seed=6, prefix=1), prompt(cfg, 1, seed=7, prefix=4)]
    ids, mask = left_pad([r for r, _ in rows])
    pv = torch.cat([p for _, p in rows])
    free = model.generate(ids, pixel_values=pv, attention_mask=mask, max_new_tokens=10)
    stop = int(free[0, 2])  # row 0 emits this at step 2 (or earlier): make it the stop id
    k0 = free[0].tolist().index(stop)
    assert stop not in free[1].tolist()[:9], "pick another seed: row 1 would stop too"
    out = model.generate(ids, pixel_values=pv, attention_mask=mask, max_new_tokens=10, eos_token_id=stop)
    assert out[0].tolist() == free[0, :k0 + 1].tolist() + [stop] * (out.shape[1] - k0 - 1)
    assert out[1].tolist() == free[1, :out.shape[1]].tolist()
    single0 = model.generate(rows[0][0], pixel_values=rows[0][1], max_new_tokens=10, eos_token_id=stop)
    assert single0[0].tolist() == free[0, :k0 + 1].tolist()


# ---------------------------------------------------------------------------------------------
# stopping and limits


def test_stops_on_stop_id_and_honours_max_new_tokens(get_model):
    model, cfg = get_model("qwen2")
    ids, pv = prompt(cfg, 2, seed=8)
    free = model.generate(ids, pixel_values=pv, max_new_tokens=12)
    assert free.shape == (1, 12)  # no stop id: exactly max_new_tokens
    stop = int(free[0, 4])
    k = free[0].tolist().index(stop)
    out = model.generate(ids, pixel_values=pv, max_new_tokens=12, eos_token_id=stop)
    assert out[0].tolist() == free[0, :k + 1].tolist()  # ends with the stop id, nothing after it
    both = model.generate(ids, pixel_values=pv, max_new_tokens=12, eos_token_id=[10_000, stop])  # a list of ids
    assert torch.equal(both, out)
    stats = generation.Stats()
    vit = generation.encode_images(model, pv, stats)
    steps = list(generation.generate(model, ids, None, 12, stop, vit_embeds=vit, stats=stats))
    assert len(steps) == stats.new_tokens == k + 1 and stats.prompt_tokens == ids.shape[1] and stats.vision_s > 0


def test_image_token_count_mismatch_is_an_error(get_model):
    model, cfg = get_model("qwen2")
    ids, _ = prompt(cfg, 2, seed=9)
    with pytest.raises(NanovlError, match=r"8 <IMG_CONTEXT> tokens but the images give 3 tiles x 4 = 12"):
        model.generate(ids, pixel_values=fx.random_pixel_values(3), max_new_tokens=2)


# ---------------------------------------------------------------------------------------------
# sampling


def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(generation.sample(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(generation.sample(logits, temperature=0.0, top_k=5, top_p=0.5), logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generation.sample(logits, temperature=1.0, top_k=1, generator=g), logits.argmax(-1))


def draws(logits, n=3000, **kw):
    g = torch.Generator().manual_seed(1)
    return set(generation.sample(logits.expand(n, -1), generator=g, **kw).tolist())


def test_top_k_keeps_the_k_largest():
    logits = torch.randn(1, 20, generator=torch.Generator().manual_seed(2))
    assert draws(logits, temperature=1.0, top_k=3) == set(logits[0].topk(3).indices.tolist())


@pytest.mark.parametrize("top_p,kept", [(0.45, {0}), (0.75, {0, 1}), (0.9, {0, 1, 2}), (0.97, {0, 1, 2, 3}),
                                        (1.0, {0, 1, 2, 3, 4})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    """probabilities 0.5, 0.3, 0.15, 0.04, 0.01: nucleus = the fewest most-likely tokens whose mass reaches top_p."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.04, 0.01]]).log()
    assert draws(logits, temperature=1.0, top_p=top_p) == kept


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(3)
    for t in (0.5, 1.0, 2.0):
        freq = torch.bincount(generation.sample(logits.expand(20000, -1), t, generator=g), minlength=3) / 20000
        expected = (logits[0] / t).softmax(-1)
        assert (freq - expected).abs().max() < 0.02, (t, freq, expected)


def test_seeded_sampling_is_reproducible(get_model):
    model, cfg = get_model("qwen2")
    ids, pv = prompt(cfg, 1, seed=10)
    kw = dict(pixel_values=pv, max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=100)
    a = model.generate(ids, seed=123, **kw)
    assert torch.equal(a, model.generate(ids, seed=123, **kw))
    assert not torch.equal(a, model.generate(ids, seed=124, **kw))
    greedy = model.generate(ids, pixel_values=pv, max_new_tokens=10)
    assert torch.equal(model.generate(ids, pixel_values=pv, max_new_tokens=10, temperature=0.0, seed=5), greedy)
