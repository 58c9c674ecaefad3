"""Unit checks of the model pieces against hand-derived rules (vision-and-chat.md §2, §7; language-models.md §3, §5)."""
import math

import pytest
import torch

from nanovl.config import LLMConfig
from nanovl.llm import LanguageModel, RoPE, apply_rope
from nanovl.model import pixel_shuffle, v2pe_positions


def grid(N=2, side=8, C=3):
    """x[n, y, x, c] = a unique code of (n, y, x, c)."""
    n, y, x, c = torch.meshgrid(*(torch.arange(s) for s in (N, side, side, C)), indexing="ij")
    return (n * 1_000_000 + y * 10_000 + x * 100 + c).double()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_index_map(version):
    N, side, C = 2, 8, 3
    x = grid(N, side, C)
    out = pixel_shuffle(x, 0.5, version).reshape(N, (side // 2) ** 2, 4 * C)  # (N, tokens, 4C)
    for n in range(N):
        for i in range(side // 2):  # block row
            for j in range(side // 2):  # block column
                t = i * (side // 2) + j if version == "v2" else j * (side // 2) + i  # v1 leaves the grid transposed
                blocks = [(2 * i, 2 * j), (2 * i, 2 * j + 1), (2 * i + 1, 2 * j), (2 * i + 1, 2 * j + 1)]
                expected = torch.cat([x[n, yy, xx] for yy, xx in blocks])
                assert torch.equal(out[n, t], expected), (version, n, i, j)


def test_pixel_shuffle_real_shape():
    x = torch.randn(3, 32, 32, 1024)
    assert pixel_shuffle(x).reshape(3, -1, 4096).shape == (3, 256, 4096)  # 1024 patches -> 256 tokens of 4C


CTX = 99  # <IMG_CONTEXT> id in these sequences


def test_v2pe_default_stride_is_arange():
    ids = torch.tensor([1, 2, 3] + [CTX] * 512 + [4, 5] + [CTX] * 256 + [6])
    assert torch.equal(v2pe_positions(ids, CTX, 256, 256), torch.arange(len(ids), dtype=torch.float32))


def test_v2pe_fix_hand_computed():
    # text a b <img> | 256 image tokens at stride 64 (delta 1/4) | </img> c
    ids = torch.tensor([10, 11, 12] + [CTX] * 256 + [13, 14])
    pos = v2pe_positions(ids, CTX, 64, 256)
    assert pos[:3].tolist() == [0.0, 1.0, 2.0]
    assert pos[3:259].tolist() == [2 + 0.25 * k for k in range(1, 257)]  # 2.25, 2.5, ..., 66.0
    assert pos[259:].tolist() == [67.0, 68.0]  # ceil(66.0) + 1, then +1


def test_v2pe_ceiling_rule():
    ids = torch.tensor([10] + [CTX] * 3 + [11])  # 3 image tokens with delta 1/4: 0.25, 0.5, 0.75
    pos = v2pe_positions(ids, CTX, 1, 4)
    assert pos.tolist() == [0.0, 0.25, 0.5, 0.75, 2.0]  # text resumes at ceil(0.75) + 1


def tiny_llm(**kw):
    cfg = dict(architectures=["LlamaForCausalLM"], hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=64, vocab_size=50, rope_theta=10000.0)
    return LLMConfig(**{**cfg, **kw})


def test_rope_matches_complex_rotation():
    cfg = tiny_llm()
    pos = torch.tensor([[0, 1, 5, 17]])
    cos, sin = RoPE(cfg)(pos)
    x = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    y = apply_rope(x, cos[:, None].double(), sin[:, None].double())
    # rotate-half pairs feature d with d + hd/2, angle = p / theta^(2d/hd)
    freqs = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.polar(torch.ones(4, 4, dtype=torch.float64),
                                                            pos[0, :, None].double() * freqs)
    assert torch.allclose(y, torch.cat([z.real, z.imag], -1), atol=1e-6)


def test_fractional_positions_equal_integer_ones_in_fp32():
    torch.manual_seed(0)
    lm = LanguageModel(tiny_llm()).eval()
    ids = torch.randint(0, 50, (1, 12))
    pos = torch.arange(12)[None]
    assert torch.allclose(lm(ids, positions=pos), lm(ids, positions=pos.float()), atol=1e-6)


def test_dynamic_ntk_past_max_position_embeddings():
    """Beyond max_position_embeddings the base grows as theta * (f*L/M - (f-1))^(hd/(hd-2)); checked against transformers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    M, L, f = 16, 40, 2.0
    cfg = tiny_llm(max_position_embeddings=M, rope_scaling={"type": "dynamic", "factor": f})
    lm = LanguageModel(cfg).eval()
    for p in lm.parameters():
        torch.nn.init.normal_(p, std=0.2)
    hf_cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, vocab_size=50, max_position_embeddings=M,
                                      rope_scaling={"rope_type": "dynamic", "factor": f, "rope_theta": 10000.0},
                                      attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {}
    for k, v in lm.state_dict().items():  # nanovl stacks q/k/v and gate/up: split them for transformers
        if ".qkv_proj." in k:
            sd.update(zip([k.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")], v.split([32, 16, 16])))
        elif ".gate_up_proj." in k:
            sd.update(zip([k.replace("gate_up_proj", p) for p in ("gate_proj", "up_proj")], v.chunk(2)))
        else:
            sd[k] = v
    hf.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 50, (1, L))
    with torch.no_grad():
        ours, ref = lm(ids), hf(ids).logits
        plain = LanguageModel(tiny_llm(max_position_embeddings=M)).eval()
        plain.load_state_dict(lm.state_dict())
        assert (plain(ids) - ours).abs().max() > 1e-3  # scaling really changes something past M
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-5, f"max |logit diff| past max_position_embeddings: {diff}"
    inv, _ = RoPE(cfg).frequencies(L, "cpu")
    theta = 10000.0 * (f * L / M - (f - 1)) ** (8 / 6)
    assert torch.allclose(inv, 1.0 / theta ** (torch.arange(0, 8, 2).float() / 8))
    assert math.isclose(float(inv[1]), theta ** -0.25, rel_tol=1e-6)
