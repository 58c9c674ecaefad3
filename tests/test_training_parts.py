"""The parts of the model only training uses, checked against rules written from the original code's specification:
initialisation and tied embeddings, InternViT's stochastic depth, activation checkpointing, the chunked next-token
loss, and gradients through every path (the decode GEMV included)."""
import math

import pytest
import torch
import torch.nn.functional as F

import fixtures as fx
from nanovl.config import InternVLConfig
from nanovl.llm import Linear, RMSNorm, token_losses
from nanovl.model import InternVL


def _model(llm="qwen2", vit="300m", **over):
    cfg = fx._merge(fx.chat_config(llm, vit), over)
    return InternVL(InternVLConfig.from_dict(cfg))


def test_a_model_built_off_the_meta_device_is_initialised():
    """The reference's init: decoder linears and embedding ~ N(0, initializer_range) with zero biases, norms at 1;
    InternViT: N(0, 1) class and position embeddings, layer scale = initializer_factor, PyTorch's default
    (kaiming-uniform) linears; mlp1 PyTorch's default. Deterministic under a seed; on the meta device nothing runs."""
    torch.manual_seed(0)
    over = {"llm_config": {"hidden_size": 256, "intermediate_size": 512, "vocab_size": 4096, "initializer_range": 0.05,
                           "pad_token_id": 3},
            "vision_config": {"hidden_size": 128, "intermediate_size": 256, "initializer_factor": 0.25}}
    m = _model(**over)
    for name, t in m.state_dict().items():
        assert torch.isfinite(t).all(), name
    lm, vit = m.language_model, m.vision_model
    emb = lm.model.embed_tokens.weight
    assert abs(emb.std().item() - 0.05) < 0.002 and emb[3].abs().max() == 0  # the padding row is zero
    for lin in (lm.model.layers[0].self_attn.qkv_proj, lm.model.layers[1].mlp.down_proj, lm.lm_head):
        assert abs(lin.weight.std().item() - 0.05) < 0.003
        assert lin.bias is None or lin.bias.abs().max() == 0
    assert all((mod.weight == 1).all() for mod in lm.modules() if isinstance(mod, RMSNorm))
    e = vit.embeddings
    assert abs(e.position_embedding.std().item() - 1) < 0.05 and abs(e.class_embedding.std().item() - 1) < 0.3
    assert all((layer.ls1 == 0.25).all() and (layer.ls2 == 0.25).all() for layer in vit.encoder.layers)
    fc1 = vit.encoder.layers[0].mlp.fc1.weight
    bound = 1 / math.sqrt(fc1.shape[1])  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert fc1.abs().max() <= bound and fc1.abs().max() > 0.9 * bound
    assert m.mlp1[1].weight.abs().max() <= 1 / math.sqrt(m.mlp1[1].weight.shape[1])
    torch.manual_seed(0)
    again = _model(**over)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))
    with torch.device("meta"):
        assert _model().language_model.lm_head.weight.is_meta


def test_padding_row_gets_no_gradient():
    """nn.Embedding(padding_idx=pad_token_id), as the reference decoders build it."""
    m = _model(llm_config={"pad_token_id": 5})
    ids = torch.tensor([[5, 6, 7, 5]])
    m(ids).sum().backward()
    g = m.language_model.model.embed_tokens.weight.grad
    assert g[5].abs().max() == 0 and g[6].abs().max() > 0


def _timm_drop_path(x, p, training):
    """timm.layers.DropPath as InternViT uses it (scale_by_keep=True), written from its documentation."""
    if p == 0 or not training:
        return x
    keep = 1 - p
    mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype).bernoulli_(keep)
    return x * mask.div_(keep)  # timm divides the mask, then multiplies


def test_stochastic_depth_as_the_original():
    """drop_path_rate: block i drops each tile's residual branches with p_i = linspace(0, rate, layers)[i], both
    branches, in train mode only (also in a frozen ViT, as the original's freeze_backbone leaves it in train mode)."""
    m = _model(vision_config={"num_hidden_layers": 4, "drop_path_rate": 0.3})
    vit = m.vision_model
    assert [layer.drop_path_rate for layer in vit.encoder.layers] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    layer = vit.encoder.layers[3]
    x = torch.randn(16, 5, 64)
    layer.train()
    for p in layer.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    got = layer(x)
    torch.manual_seed(1)
    with torch.no_grad():
        h = x + _timm_drop_path(layer.attn(layer.norm1(x)) * layer.ls1, 0.3, True)
        want = h + _timm_drop_path(layer.mlp(layer.norm2(h)) * layer.ls2, 0.3, True)
    assert torch.equal(got, want)
    dropped = (got - x).flatten(1).abs().sum(1) == 0  # both branches dropped for these tiles
    assert 0 < int(dropped.sum()) < 16
    layer.eval()
    with torch.no_grad():
        h = x + layer.attn(layer.norm1(x)) * layer.ls1
        assert torch.allclose(layer(x), h + layer.mlp(layer.norm2(h)) * layer.ls2)
    vit.set_drop_path_rate(0.0)
    assert all(layer.drop_path_rate == 0.0 for layer in vit.encoder.layers)


@pytest.mark.parametrize("part", ["vision", "language"])
def test_activation_checkpointing_gives_the_same_gradients(part):
    """gradient_checkpointing recomputes each block in the backward pass: the same loss and gradients (bit for
    bit), also with drop path active (checkpoint replays the saved RNG state)."""
    torch.manual_seed(0)
    m = _model(vision_config={"drop_path_rate": 0.5})
    m.img_context_token_id = fx.IMG_CONTEXT_ID
    cfg = fx.chat_config()
    ids, pv = fx.image_prompt(2, cfg, seed=3), fx.random_pixel_values(2, seed=3)
    labels = ids.masked_fill(ids == fx.IMG_CONTEXT_ID, -100)
    m.train()
    results = []
    for on in (False, True):
        (m.vision_model if part == "vision" else m.language_model).gradient_checkpointing = on
        m.zero_grad()
        torch.manual_seed(7)
        loss = m(ids, pixel_values=pv, labels=labels).sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0), [n for n in g0 if not torch.equal(g0[n], g1[n])][:3]


@pytest.mark.parametrize("chunk", [2048, 3])
def test_token_losses_equal_cross_entropy_on_full_logits(chunk):
    """llm.token_losses = F.cross_entropy(logits[:, :-1].float(), labels[:, 1:], ignore_index=-100) per position, its
    gradients included; only labelled positions go through the head (chunk 3: several recomputed chunks)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = -100
    labels[1, 6] = -100
    ce = token_losses(hidden, head, labels, chunk=chunk)
    ref = F.cross_entropy(head(hidden)[:, :-1].float().reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100,
                          reduction="none").view(2, 8)
    assert ce.shape == (2, 9) and (ce[:, 0] == 0).all() and (ce[:, 1:][labels[:, 1:] == -100] == 0).all()
    torch.testing.assert_close(ce[:, 1:], ref, rtol=1e-6, atol=1e-6)
    w = torch.rand(2, 9)
    (ce * w).sum().backward()
    g_hidden, g_head = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    (ref * w[:, 1:]).sum().backward()
    torch.testing.assert_close(g_hidden, hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_head, head.weight.grad, rtol=1e-5, atol=1e-6)


def test_gradients_flow_through_the_decode_gemv():
    """nanovl.llm.Linear sends a single row through torch.mv: its gradients are F.linear's."""
    torch.manual_seed(0)
    lin = Linear(12, 7)
    x = torch.randn(1, 1, 12, requires_grad=True)
    lin(x).pow(2).sum().backward()
    gx, gw, gb = x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone()
    x.grad = lin.weight.grad = lin.bias.grad = None
    F.linear(x, lin.weight, lin.bias).pow(2).sum().backward()
    for a, b in ((gx, x.grad), (gw, lin.weight.grad), (gb, lin.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_every_parameter_gets_a_gradient():
    """One loss through ViT, projector and decoder reaches every parameter, a one-token prompt (the decode GEMV
    path) included."""
    m = _model()
    m.img_context_token_id = fx.IMG_CONTEXT_ID
    cfg = fx.chat_config()
    ids, pv = fx.image_prompt(1, cfg, seed=1), fx.random_pixel_values(1, seed=1)
    (m(ids, pixel_values=pv).float().logsumexp(-1).sum() + m(ids[:, :1]).sum()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_v2pe_rnd_is_reproducible_with_a_seed(make_ckpt):
    """v2pe_rnd draws each image's stride from the generation seed, not from Python's global random."""
    import nanovl

    path, _, cfg = make_ckpt("qwen2", "300m")
    m = nanovl.load(path)
    m.img_context_token_id = fx.IMG_CONTEXT_ID
    m.rope_pos_id_version = "v2pe_rnd"
    ids = fx.image_prompt(1, cfg, seed=4)
    draws = {tuple(m.positions(ids, generator=torch.Generator().manual_seed(s))[0].tolist()) for s in range(12)}
    assert len(draws) > 1  # the strides really vary
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(m.positions(ids, generator=g()), m.positions(ids, generator=g()))
    pv = fx.random_pixel_values(1, seed=4)
    assert torch.equal(m.generate(ids, pv, max_new_tokens=5, seed=2), m.generate(ids, pv, max_new_tokens=5, seed=2))
