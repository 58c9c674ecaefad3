"""InternVL3.5-Flash: the visual resolution router against values computed here from the specification of the
Flash checkpoints' remote code (explicit matrix products, no nn.MultiheadAttention), the decision rule under both
thresholds, the compressed prompt, and the dense model's logits when every tile is forced to 256 tokens."""
import math

import pytest
import torch
import torch.nn.functional as F

import fixtures as fx
from nanovl.router import CrossAttentionPooling, Gating, decide

C, HEADS = 64, 16  # a 32 x 32 patch grid: image 64, patch 2 (the router hard-codes 256 / 64 tokens a tile)
FLASH = dict(flash_mode=True, flash_relative_threshold=0.1, flash_absolute_threshold=0.5, force_image_size=64,
             vision_config={"image_size": 64, "patch_size": 2, "hidden_size": C, "num_attention_heads": 4})


def _reference_scores(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """(T, 1024, C) ViT tokens (class token dropped) -> (T,) probability of "compress", from the formulas:
    q_0 = query_token; q_{i+1} = LN_i(MHA_i(q_i, x, x)) with attn1/norm1 then attn2/norm2 three times; g = q_4;
    g <- g + LN(W2 gelu(W1 g + b1) + b2) for blocks 1-4; softmax(W LN(g) + b)[0]."""
    def ln(v, name):
        return F.layer_norm(v, (C,), sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)

    def mha(q, x, name):  # q (T, 1, C), x (T, N, C)
        w, b = sd[f"{name}.in_proj_weight"], sd[f"{name}.in_proj_bias"]
        Q, K, V = (t @ w[i * C:(i + 1) * C].T + b[i * C:(i + 1) * C] for i, t in enumerate((q, x, x)))
        hd = C // HEADS
        split = lambda t: t.reshape(t.shape[0], t.shape[1], HEADS, hd).transpose(1, 2)  # noqa: E731
        a = torch.softmax(split(Q) @ split(K).transpose(-1, -2) / math.sqrt(hd), -1) @ split(V)  # (T, h, 1, hd)
        a = a.transpose(1, 2).reshape(q.shape[0], 1, C)
        return a @ sd[f"{name}.out_proj.weight"].T + sd[f"{name}.out_proj.bias"]

    p = "pooling_before_gating"
    q = sd[f"{p}.query_token"][None].expand(x.shape[0], 1, C)
    q = ln(mha(q, x, f"{p}.attn1"), f"{p}.norm1")
    for _ in range(3):
        q = ln(mha(q, x, f"{p}.attn2"), f"{p}.norm2")
    g = q[:, 0]
    for i in range(1, 5):
        b = f"gating.block{i}"
        h = F.gelu(g @ sd[f"{b}.0.weight"].T + sd[f"{b}.0.bias"]) @ sd[f"{b}.3.weight"].T + sd[f"{b}.3.bias"]
        g = g + ln(h, f"{b}.5")
    logits = ln(g, "gating.gate.0") @ sd["gating.gate.1.weight"].T + sd["gating.gate.1.bias"]
    return logits.softmax(-1)[:, 0]


def test_router_modules_against_the_formulas(tmp_path):
    """CrossAttentionPooling + Gating with the checkpoint's weights give the formulas' probabilities; attn3/norm3
    and attn4/norm4 are loaded but do not change anything (the original never runs them)."""
    sd = fx.flash_weights({"hidden_size": C}, {"hidden_size": 32}, fx._Rand(0))
    pool, gate = CrossAttentionPooling(C).eval(), Gating(C).eval()
    pool.load_state_dict({k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("pooling_before_gating.")})
    gate.load_state_dict({k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("gating.")})
    x = torch.randn(5, 1024, C, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = gate(pool(x))[:, 0]
        fx.check_close(got, _reference_scores(sd, x), "Flash router probabilities vs formulas", rtol=1e-5,
                       atol=1e-6)
        pool.attn3.in_proj_weight.mul_(3.0)
        pool.norm4.weight.add_(1.0)
        assert torch.equal(gate(pool(x))[:, 0], got)


def test_decision_rule():
    """compress iff p > quantile(p, relative) (linear, fp32) and p >= absolute; one tile alone never; the least
    likely tile never; in bf16 the thresholds are rounded to bf16 before comparing, as the original's promotion."""
    p = torch.tensor([0.6012, 0.4729, 0.4824, 0.4422])
    assert decide(p, 0.1, 0.5).tolist() == [True, False, False, False]
    assert decide(p, 0.1, 0.0).tolist() == [True, True, True, False]  # only the relative rule: the minimum stays
    assert decide(torch.tensor([0.99]), 0.1, 0.0).tolist() == [False]  # quantile of one value is itself
    q = torch.tensor([0.5, 0.50390625, 0.50390625, 0.6], dtype=torch.bfloat16)
    r = torch.quantile(q.float(), 0.2)  # 0.50234..., 0.50390625 once rounded to bf16
    assert 0.5 < r.item() < 0.50390625
    assert decide(q, 0.2, 0.0).tolist() == [False, False, False, True]  # fp32 comparisons would say F, T, T, T
