"""Saving: nanovl writes checkpoints in the ORIGINAL OpenGVLab layout, and `original_state_dict()` gives every tensor
under the original key names. The references are the checkpoints tests/fixtures.py writes from the specification
(it never imports nanovl), and transformers' own -hf save_pretrained.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import fixtures as fx

FAMILIES = ["qwen2", "qwen3", "llama", "internlm2", "phi3"]


def _load(path):
    import nanovl

    return nanovl.load(path, dtype=torch.float32, device="cpu")


def _saved(path) -> dict:
    files = sorted(path.glob("*.safetensors"))
    assert files, f"nothing saved in {path}"
    out = {}
    for f in files:
        part = load_file(str(f))
        assert not set(part) & set(out), "a tensor in two shards"
        out.update(part)
    return out


@pytest.mark.parametrize("vit", ["300m", "6b"])
@pytest.mark.parametrize("llm", FAMILIES)
def test_original_state_dict_is_the_checkpoint(make_ckpt, llm, vit):
    """Every tensor of the loaded model under its original name (q/k/v and gate/up un-stacked, InternLM2's wqkv
    re-grouped, Phi-3's fused tensors as they are) is bit-identical to the tensor the fixture wrote."""
    path, sd, _ = make_ckpt(llm, vit)
    osd = _load(path).original_state_dict()
    assert osd.keys() == sd.keys()
    assert all(torch.equal(osd[k], sd[k]) for k in sd), [k for k in sd if not torch.equal(osd[k], sd[k])][:5]


@pytest.mark.parametrize("llm,vit", [(f, v) for f in FAMILIES for v in ("300m", "6b")])
def test_load_save_load_is_bit_identical(tmp_path, llm, vit):
    """original layout in -> save (fp32, sharded) -> the files hold exactly the source tensors and config, and they
    load to the same model. The 6B ViT uses select_layer -2: the block nanovl never builds is carried over."""
    src = tmp_path / "src"
    over = {"select_layer": -2} if vit == "6b" else {}
    sd = fx.write_checkpoint(src, llm, vit, seed=3, tokenizer_dir=None, **over)
    (src / "generation_config.json").write_text('{"eos_token_id": 2}')
    (src / "modeling_internvl_chat.py").write_text("# the remote code travels with the checkpoint\n")
    model = _load(src)
    assert len(model.vision_model.encoder.layers) == (1 if vit == "6b" else 2)
    out = model.save_pretrained(tmp_path / "out", dtype=torch.float32, max_shard_size=40_000)
    saved = _saved(out)
    assert saved.keys() == sd.keys(), sorted(set(saved) ^ set(sd))[:6]
    assert all(torch.equal(saved[k], sd[k]) for k in sd)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert index["weight_map"].keys() == sd.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    src_cfg, out_cfg = fx.read_config(src), fx.read_config(out)
    assert out_cfg.pop("torch_dtype") == "float32" and out_cfg["llm_config"].pop("torch_dtype") == "float32"
    src_cfg.pop("torch_dtype"), src_cfg["llm_config"].pop("torch_dtype")
    added = {k: v for k, v in out_cfg.items() if k not in src_cfg}
    assert {k: out_cfg[k] for k in src_cfg} == src_cfg and added == {}, added
    assert (out / "generation_config.json").exists() and (out / "modeling_internvl_chat.py").exists()
    again = _load(out)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("llm,vit", [("qwen2", "300m"), ("qwen2", "6b"), ("llama", "300m"), ("qwen3", "300m")])
def test_hf_checkpoint_saved_in_the_original_layout(tmp_path, llm, vit):
    """A checkpoint written by transformers' save_pretrained (-hf layout) -> nanovl -> save: the original-layout
    tensors the fixture derived the -hf checkpoint from, bit for bit, and a config.json the original code reads."""
    sd = fx.write_checkpoint(tmp_path / "orig", llm, vit, seed=4)
    cfg = fx.read_config(tmp_path / "orig")
    fx.hf_internvl(sd, cfg).save_pretrained(tmp_path / "hf")
    out = _load(tmp_path / "hf").save_pretrained(tmp_path / "out", dtype=torch.float32)
    saved = _saved(out)
    assert saved.keys() == sd.keys(), sorted(set(saved) ^ set(sd))[:6]
    assert all(torch.equal(saved[k], sd[k]) for k in sd)
    written = fx.read_config(out)
    assert written["architectures"] == ["InternVLChatModel"] and written["model_type"] == "internvl_chat"
    assert written["llm_config"]["architectures"] == cfg["llm_config"]["architectures"]
    assert "rope_parameters" not in written["llm_config"]
    assert written["llm_config"]["rope_theta"] == cfg["llm_config"]["rope_theta"]
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "qkv_bias",
              "qk_normalization", "norm_type", "image_size", "patch_size"):
        assert written["vision_config"][k] == cfg["vision_config"][k], k
    assert written["template"] == "internvl2_5" and written["ps_version"] == "v2"
    ids, pv = fx.image_prompt(1, cfg, seed=2), fx.random_pixel_values(1, seed=2)
    a, b = _load(out), _load(tmp_path / "orig")
    for m in (a, b):
        m.img_context_token_id = fx.IMG_CONTEXT_ID
    with torch.no_grad():
        assert torch.equal(a(ids, pixel_values=pv), b(ids, pixel_values=pv))


def test_save_in_bf16_and_tokenizer_files(make_ckpt, tmp_path):
    """The default save is bf16 (as released checkpoints), with the source's tokenizer files."""
    path, sd, _ = make_ckpt("qwen2", "300m", tokenizer_dir="InternVL2_5-1B-MPO", seed=8)
    out = _load(path).save_pretrained(tmp_path)
    saved = _saved(out)
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    assert all(torch.equal(saved[k], sd[k].to(torch.bfloat16)) for k in sd)
    assert fx.read_config(out)["torch_dtype"] == "bfloat16"
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (path / f).read_bytes()
    model = _load(out)
    assert model.tokenizer is not None and model.img_context_token_id == model.tokenizer.token_to_id("<IMG_CONTEXT>")


def test_tied_embeddings(tmp_path):
    """tie_word_embeddings: tied at construction (one tensor, one gradient), tied after loading a checkpoint that
    stores no head; saving writes the head anyway, because the original code always builds an untied one."""
    from nanovl.config import InternVLConfig
    from nanovl.model import InternVL

    cfg = fx.chat_config("qwen2")
    cfg["llm_config"]["tie_word_embeddings"] = True
    model = InternVL(InternVLConfig.from_dict(cfg))
    lm = model.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    untied = InternVL(InternVLConfig.from_dict(fx.chat_config("qwen2")))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(untied) - n(model) == cfg["llm_config"]["vocab_size"] * cfg["llm_config"]["hidden_size"]
    sd = fx.write_checkpoint(tmp_path / "src", "qwen2", llm_config={"tie_word_embeddings": True})
    from safetensors.torch import save_file
    del sd["language_model.lm_head.weight"]
    save_file(sd, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    loaded = _load(tmp_path / "src")
    assert loaded.language_model.lm_head.weight is loaded.language_model.model.embed_tokens.weight
    saved = _saved(loaded.save_pretrained(tmp_path / "out", dtype=torch.float32))
    assert torch.equal(saved["language_model.lm_head.weight"], sd["language_model.model.embed_tokens.weight"])


def test_gradients_under_original_names(make_ckpt):
    """original_state_dict(grads=True): each parameter's .grad under the original names, cut exactly as the weights
    are (the q rows of qkv_proj's gradient are q_proj's), None where a parameter has no gradient."""
    path, sd, cfg = make_ckpt("internlm2", "300m")
    model = _load(path)
    model.img_context_token_id = fx.IMG_CONTEXT_ID
    for p in model.vision_model.parameters():
        p.requires_grad_(False)
    ids, pv = fx.image_prompt(1, cfg, seed=1), fx.random_pixel_values(1, seed=1)
    model(ids, pixel_values=pv).float().logsumexp(-1).sum().backward()
    grads = model.original_state_dict(grads=True)
    assert grads.keys() == sd.keys()
    assert all(grads[k] is None for k in grads if k.startswith("vision_model."))
    lm = model.language_model.model.layers[0]
    wqkv = grads["language_model.model.layers.0.attention.wqkv.weight"]
    back = torch.cat(fx.naive_split_wqkv(wqkv, 4, 2, 16))  # the fixtures' own per-group loop
    assert torch.equal(back, lm.self_attn.qkv_proj.weight.grad)
    assert torch.equal(grads["language_model.model.layers.0.feed_forward.w3.weight"],
                       lm.mlp.gate_up_proj.weight.grad[fx.LLM_INTER:])
