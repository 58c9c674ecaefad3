"""Every decoder family of InternVL vs its transformers reference (fp32, CPU, eager attention):
Llama (Yi), Qwen3 (InternVL3.5), Phi-3 ("su" LongRoPE), InternLM2 (fused grouped wqkv; no transformers
class, so checked against the same weights in Llama layout and against LlamaForCausalLM as transformers'
own converter does), and the whole model with non-Qwen2 backbones.
"""

import pytest
import torch

import fixtures as fx

TOL = dict(rtol=1e-5, atol=1e-5)


def _decoder_parity(make_ckpt, nv_load, llm, label, lengths=(12, 24), batch=2, **over):
    path, sd, cfg = make_ckpt(llm, "300m", **over)
    model = nv_load(path)
    ref = fx.hf_causal_lm(sd, cfg)
    V = cfg["llm_config"]["vocab_size"]
    for T in lengths:
        ids = fx.random_ids(batch, T, V, seed=100 + T)
        with torch.no_grad():
            out = model.language_model(ids)
            exp = ref(ids).logits
        fx.check_close(out, exp, f"{label} T={T} logits", **TOL)
    return path, sd, cfg, model, ref


# ---------------------------------------------------------------------------------------------
# Llama / Qwen3
# ---------------------------------------------------------------------------------------------


def test_llama_matches_hf(make_ckpt, nv_load):
    """Yi-34B-like: no biases at all, rope_theta 5e6, eps 1e-5, GQA 4 heads / 2 KV heads."""
    path, sd, cfg = make_ckpt("llama", "300m")
    assert not any(k.endswith(".bias") for k in sd if k.startswith("language_model."))
    _decoder_parity(make_ckpt, nv_load, "llama", "Llama (Yi-like) decoder")


def test_qwen3_matches_hf(make_ckpt, nv_load):
    """Qwen3: q_norm/k_norm over head_dim before RoPE; head_dim 32 != hidden/heads 16, so q_proj is
    [128, 64] and o_proj [64, 128]."""
    path, sd, cfg = make_ckpt("qwen3", "300m")
    assert sd["language_model.model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert sd["language_model.model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    _decoder_parity(make_ckpt, nv_load, "qwen3", "Qwen3 decoder (head_dim 32)")


# ---------------------------------------------------------------------------------------------
# Phi-3 "su" (transformers: "longrope")
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_phi3_matches_hf_both_factor_sets(make_ckpt, nv_load, kv_heads):
    """original_max_position_embeddings 16: a 12-token call uses the short factors, a 24-token call the
    long ones (chosen per call from max(position)+1, for the whole call), both scaled by
    sqrt(1 + ln(128/16) / ln 16)."""
    over = {"llm_config": {"num_key_value_heads": kv_heads}}
    path, sd, cfg, model, ref = _decoder_parity(make_ckpt, nv_load, "phi3", f"Phi-3 su decoder kv={kv_heads}", **over)
    assert sd["language_model.model.layers.0.self_attn.qkv_proj.weight"].shape == ((4 + 2 * kv_heads) * 16, 64)
    assert sd["language_model.model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 128, 64)
    # the two factor sets really differ: the first 12 positions of a 24-token call differ from a 12-token call
    ids = fx.random_ids(1, 24, cfg["llm_config"]["vocab_size"], seed=5)
    with torch.no_grad():
        long_call = ref(ids).logits[:, :12]
        short_call = ref(ids[:, :12]).logits
        nv_long, nv_short = model.language_model(ids)[:, :12], model.language_model(ids[:, :12])
    assert fx.max_abs_diff(long_call, short_call) > 1e-2
    fx.check_close(nv_long, long_call, f"Phi-3 kv={kv_heads} first 12 of a 24-token call (long factors)", **TOL)
    fx.check_close(nv_short, short_call, f"Phi-3 kv={kv_heads} 12-token call (short factors)", **TOL)


def test_phi3_generate_across_factor_switch(make_ckpt, nv_load):
    """Greedy decoding from a 12-token prompt for 10 tokens crosses original_max_position_embeddings=16.
    Reference: the original InternVL Phi-3 code path (KV cache kept: cached keys keep the short-factor
    rotation, each new token past position 15 uses the long factors). transformers' own generate()
    differs: it re-prefills everything with the long factors when the sequence first crosses 16."""
    path, sd, cfg = make_ckpt("phi3", "300m")
    model = nv_load(path)
    ref = fx.hf_causal_lm(sd, cfg)
    ids = fx.random_ids(1, 12, cfg["llm_config"]["vocab_size"], seed=0)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, eos_token_id=None)
    kept_cache = fx.hf_greedy_with_cache(ref, ids, 10)
    hf_generate = fx.hf_greedy(ref, ids, 10)
    assert not torch.equal(kept_cache, hf_generate), "test sequence does not separate the two semantics"
    assert torch.equal(out.cpu(), kept_cache), (
        f"Phi-3 greedy tokens across the su switch: nanovl {out.tolist()}, original-code semantics "
        f"(cache kept) {kept_cache.tolist()}, transformers generate() (re-prefill) {hf_generate.tolist()}")


# ---------------------------------------------------------------------------------------------
# InternLM2: fused grouped wqkv
# ---------------------------------------------------------------------------------------------

# InternLM2 numbers for the Llama-layout twin, so that both checkpoints describe the same network
_INTERNLM2_AS_LLAMA = {"rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
                       "rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 32768}


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 2), (4, 4), (4, 1)])
def test_internlm2_equals_llama_layout(make_ckpt, nv_load, heads, kv_heads):
    """The same random weights as a Llama-layout checkpoint and as an InternLM2 checkpoint (wqkv fused
    per KV group by tests/fixtures.py from language-models.md 2.4) give identical logits in nanovl, and
    match transformers' LlamaForCausalLM on the de-fused weights."""
    shape = {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_size": 16 * heads}
    p_l, sd_l, cfg_l = make_ckpt("llama", "300m", seed=31, llm_config={**_INTERNLM2_AS_LLAMA, **shape})
    p_i, sd_i, cfg_i = make_ckpt("internlm2", "300m", seed=31, llm_config=shape)
    # the fixtures really wrote the same numbers in the two layouts
    back = fx.internlm2_lm_to_llama({k[len("language_model."):]: v for k, v in sd_i.items()
                                     if k.startswith("language_model.")}, cfg_i["llm_config"])
    assert all(torch.equal(back[k], sd_l["language_model." + k]) for k in back)
    assert len(back) == sum(k.startswith("language_model.") for k in sd_l)

    m_l, m_i = nv_load(p_l), nv_load(p_i)
    ids = fx.random_ids(2, 16, cfg_i["llm_config"]["vocab_size"], seed=41)
    with torch.no_grad():
        out_l, out_i = m_l.language_model(ids), m_i.language_model(ids)
        exp = fx.hf_causal_lm(sd_i, cfg_i)(ids).logits
    fx.check_close(out_i, out_l, f"InternLM2 fused vs Llama layout nH={heads} nKV={kv_heads}", exact=True)
    fx.check_close(out_i, exp, f"InternLM2 nH={heads} nKV={kv_heads} vs HF LlamaForCausalLM", **TOL)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (6, 2, 8), (8, 8, 4), (32, 2, 3), (4, 1, 5)])
def test_split_wqkv_matches_naive_group_loop(heads, kv_heads, head_dim):
    """weights.wqkv_rows (which row of the stacked [q; k; v] each wqkv row is) against a per-group loop."""
    from nanovl.config import LLMConfig
    from nanovl.weights import wqkv_rows

    H = 7
    g = torch.Generator().manual_seed(heads * 100 + kv_heads)
    wqkv = torch.randn((heads + 2 * kv_heads) * head_dim, H, generator=g)
    cfg = LLMConfig(["InternLM2ForCausalLM"], heads * head_dim, 1, heads, 8, 10, num_key_value_heads=kv_heads,
                    head_dim=head_dim)
    stacked = torch.empty_like(wqkv)
    stacked[wqkv_rows(cfg)] = wqkv  # what loading does
    wq, wk, wv = stacked.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
    rq, rk, rv = fx.naive_split_wqkv(wqkv, heads, kv_heads, head_dim)
    assert wq.shape == (heads * head_dim, H) and wk.shape == wv.shape == (kv_heads * head_dim, H)
    assert torch.equal(wq, rq) and torch.equal(wk, rk) and torch.equal(wv, rv)
    # and it inverts the fixtures' fusing
    assert torch.equal(fx.fuse_wqkv(wq, wk, wv, heads, kv_heads, head_dim), wqkv)


# ---------------------------------------------------------------------------------------------
# whole model with non-Qwen2 backbones vs InternVLForConditionalGeneration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("llm,vit", [("llama", "6b"), ("qwen3", "300m"), ("internlm2", "300m"), ("phi3", "300m")])
def test_whole_model_other_backbones_match_hf(make_ckpt, nv_load, llm, vit):
    """transformers' InternVL takes any text config: Llama, Qwen3, Phi-3 directly; InternLM2 as Llama
    (what transformers' converter does). Prompt: 1 image of 2 tiles (8 image tokens), 19 tokens."""
    path, sd, cfg = make_ckpt(llm, vit)
    model = nv_load(path)
    model.img_context_token_id = fx.IMG_CONTEXT_ID
    ref = fx.hf_internvl(sd, cfg)
    pv = fx.random_pixel_values(2, seed=12)
    ids = fx.image_prompt(2, cfg, seed=12)
    with torch.no_grad():
        out = model(ids, pixel_values=pv)
        exp = ref(input_ids=ids, pixel_values=pv).logits
    fx.check_close(out, exp, f"whole model {llm}+ViT-{vit} logits", **TOL)
