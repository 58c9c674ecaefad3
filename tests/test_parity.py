"""nanovl vs transformers on tiny random checkpoints in the original InternVL layout (fp32, CPU).

References: InternVLVisionModel (ViT), Qwen2ForCausalLM (decoder), InternVLForConditionalGeneration
(whole model), all with attn_implementation="eager", loaded with strict key matching from state dicts
converted by tests/fixtures.py (which never imports nanovl).
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fixtures as fx

TOL = dict(rtol=1e-5, atol=1e-5)


def _nanovl():
    import nanovl

    return nanovl


# ---------------------------------------------------------------------------------------------
# reference self-checks (transformers only; they validate the fixtures, not nanovl)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vit", ["300m", "6b"])
def test_reference_conversions_load_strictly(make_ckpt, vit):
    """The converted state dicts fill every HF parameter and nothing else, and the HF whole model's
    parts equal the standalone references (vision tower, Qwen2ForCausalLM)."""
    path, sd, cfg = make_ckpt("qwen2", vit)
    hf = fx.hf_internvl(sd, cfg)  # raises on missing/unexpected keys
    vis = fx.hf_vision_model(sd, cfg)
    lm = fx.hf_causal_lm(sd, cfg)
    pv = fx.random_pixel_values(2)
    ids = fx.random_ids(1, 12, cfg["llm_config"]["vocab_size"])
    with torch.no_grad():
        assert torch.equal(hf.model.vision_tower(pixel_values=pv).last_hidden_state,
                           vis(pixel_values=pv).last_hidden_state)
        assert torch.equal(hf(input_ids=ids).logits, lm(ids).logits)
    # the checkpoint on disk is exactly the returned state dict
    on_disk = fx.load_weights(path)
    assert on_disk.keys() == sd.keys() and all(torch.equal(on_disk[k], sd[k]) for k in sd)


def test_reference_pixel_shuffle_spec_matches_hf(make_ckpt):
    """The index-formula pixel shuffle of the spec (used for the v1 test) equals transformers' v2 shuffle."""
    path, sd, cfg = make_ckpt("qwen2", "300m")
    hf = fx.hf_internvl(sd, cfg)
    pv = fx.random_pixel_values(2)
    with torch.no_grad():
        patches = hf.model.vision_tower(pixel_values=pv).last_hidden_state[:, 1:]
        ours = hf.model.multi_modal_projector(fx.pixel_shuffle_reference(patches, "v2"))
        theirs = hf.model.get_image_features(pixel_values=pv).pooler_output
    assert torch.equal(ours, theirs)


# ---------------------------------------------------------------------------------------------
# InternViT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vit", ["300m", "6b"])
def test_vision_model_matches_hf(make_ckpt, nv_load, vit):
    path, sd, cfg = make_ckpt("qwen2", vit)
    model = nv_load(path)
    ref = fx.hf_vision_model(sd, cfg)
    pv = fx.random_pixel_values(3, seed=1)
    with torch.no_grad():
        out = model.vision_model(pv)
        exp = ref(pixel_values=pv).last_hidden_state
    fx.check_close(out, exp, f"InternViT-{vit} vision_model (N,1+P,C)", **TOL)


@pytest.mark.parametrize("vit", ["300m", "6b"])
def test_vision_model_select_layer_matches_hf(make_ckpt, nv_load, vit):
    """select_layer -2: the hidden state after the first of the 2 blocks (hidden_states[-2])."""
    path, sd, cfg = make_ckpt("qwen2", vit, select_layer=-2)
    model = nv_load(path)
    ref = fx.hf_vision_model(sd, cfg)
    pv = fx.random_pixel_values(2, seed=2)
    with torch.no_grad():
        out = model.vision_model(pv)
        exp = ref(pixel_values=pv, output_hidden_states=True).hidden_states[-2]
    fx.check_close(out, exp, f"InternViT-{vit} vision_model select_layer=-2", **TOL)


@pytest.mark.parametrize("vit,image_size", [("300m", 56), ("6b", 56), ("300m", 112)])
def test_extract_feature_matches_hf(make_ckpt, nv_load, vit, image_size):
    over = {} if image_size == 56 else dict(force_image_size=image_size, vision_config={"image_size": image_size})
    path, sd, cfg = make_ckpt("qwen2", vit, **over)
    model = nv_load(path)
    ref = fx.hf_internvl(sd, cfg)
    pv = fx.random_pixel_values(2, seed=3, size=image_size)
    with torch.no_grad():
        out = model.extract_feature(pv)
        exp = ref.model.get_image_features(pixel_values=pv).pooler_output
    assert out.shape == (2, fx.num_image_token(cfg), cfg["llm_config"]["hidden_size"])
    fx.check_close(out, exp, f"InternViT-{vit}@{image_size} extract_feature (ViT+shuffle+mlp1)", **TOL)


# ---------------------------------------------------------------------------------------------
# decoder (Qwen2 / Qwen2.5)
# ---------------------------------------------------------------------------------------------

QWEN2_ROPE = {
    # InternVL2 / 2.5: plain RoPE
    "plain": {},
    # InternVL3 Qwen2.5 configs: dynamic NTK, factor 2; no effect below max_position_embeddings
    "dynamic": {"llm_config": {"rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"}}},
    # same, with max_position_embeddings small enough that the 24-token test sequence is scaled
    # (transformers semantics: theta' from seq_len = max(position_ids)+1 when it exceeds max_position_embeddings)
    "dynamic-exceeded": {"llm_config": {"rope_scaling": {"type": "dynamic", "factor": 2.0},
                                        "max_position_embeddings": 16}},
}


@pytest.mark.parametrize("rope", list(QWEN2_ROPE))
def test_decoder_matches_qwen2(make_ckpt, nv_load, rope):
    path, sd, cfg = make_ckpt("qwen2", "300m", **QWEN2_ROPE[rope])
    model = nv_load(path)
    ref = fx.hf_causal_lm(sd, cfg)
    V = cfg["llm_config"]["vocab_size"]
    for T in (12, 24):
        ids = fx.random_ids(2, T, V, seed=T)
        with torch.no_grad():
            out = model.language_model(ids)
            exp = ref(ids).logits
        fx.check_close(out, exp, f"Qwen2 decoder rope={rope} T={T} logits", **TOL)


# ---------------------------------------------------------------------------------------------
# whole model
# ---------------------------------------------------------------------------------------------


def _whole_model_case(make_ckpt, nv_load, llm, vit, **over):
    path, sd, cfg = make_ckpt(llm, vit, **over)
    model = nv_load(path)
    model.img_context_token_id = fx.IMG_CONTEXT_ID
    ref = fx.hf_internvl(sd, cfg, image_token_id=fx.IMG_CONTEXT_ID)
    return path, sd, cfg, model, ref


@pytest.mark.parametrize("vit", ["300m", "6b"])
def test_whole_model_matches_hf(make_ckpt, nv_load, vit):
    """1 image of 2 tiles: <img> + <IMG_CONTEXT> x (4 tokens x 2 tiles) + </img> inside text."""
    path, sd, cfg, model, ref = _whole_model_case(make_ckpt, nv_load, "qwen2", vit)
    pv = fx.random_pixel_values(2, seed=4)
    ids = fx.image_prompt(2, cfg, seed=4)
    assert (ids == fx.IMG_CONTEXT_ID).sum() == 2 * fx.num_image_token(cfg) == 8
    with torch.no_grad():
        out = model(ids, pixel_values=pv)
        exp = ref(input_ids=ids, pixel_values=pv).logits
        no_img = ref(input_ids=ids).logits  # image features really change the logits
    assert fx.max_abs_diff(exp, no_img) > 1e-2
    fx.check_close(out, exp, f"whole model qwen2+ViT-{vit} 1 image x 2 tiles logits", **TOL)


def test_whole_model_batch_matches_hf(make_ckpt, nv_load):
    """Batch of 2 prompts, each with its own 2-tile image: features are consumed in order."""
    path, sd, cfg, model, ref = _whole_model_case(make_ckpt, nv_load, "qwen2", "300m")
    pv = torch.cat([fx.random_pixel_values(2, seed=5), fx.random_pixel_values(2, seed=6)])
    ids = torch.cat([fx.image_prompt(2, cfg, seed=5), fx.image_prompt(2, cfg, seed=6)])
    with torch.no_grad():
        out = model(ids, pixel_values=pv)
        exp = ref(input_ids=ids, pixel_values=pv).logits
    fx.check_close(out, exp, "whole model qwen2 batch=2 (2 tiles each) logits", **TOL)


def test_whole_model_generate_matches_hf(make_ckpt, nv_load):
    path, sd, cfg, model, ref = _whole_model_case(make_ckpt, nv_load, "qwen2", "300m")
    pv = fx.random_pixel_values(2, seed=7)
    ids = fx.image_prompt(2, cfg, seed=7)
    n = 8
    with torch.no_grad():
        out = model.generate(ids, pixel_values=pv, max_new_tokens=n, eos_token_id=None)
        exp = fx.hf_greedy(ref, ids, n, pixel_values=pv)
    assert out.shape == (1, n), f"generate returned shape {tuple(out.shape)}, expected (1, {n}) new tokens"
    assert torch.equal(out.cpu(), exp), f"greedy tokens differ: nanovl {out.tolist()} vs transformers {exp.tolist()}"


# ---------------------------------------------------------------------------------------------
# ps_version v1 (not expressible in transformers): v1 == v2 with the token grid transposed
# ---------------------------------------------------------------------------------------------


def test_ps_version_v1_is_transposed_v2(make_ckpt, nv_load):
    path1, sd1, cfg1 = make_ckpt("qwen2", "300m", ps_version="v1", seed=11,
                                 force_image_size=112, vision_config={"image_size": 112})
    path2, sd2, cfg2 = make_ckpt("qwen2", "300m", ps_version="v2", seed=11,
                                 force_image_size=112, vision_config={"image_size": 112})
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    m1, m2 = nv_load(path1), nv_load(path2)
    ref = fx.hf_internvl(sd2, cfg2)
    pv = fx.random_pixel_values(2, seed=8, size=112)
    with torch.no_grad():
        f1, f2 = m1.extract_feature(pv), m2.extract_feature(pv)
        hf_v2 = ref.model.get_image_features(pixel_values=pv).pooler_output
        # from the spec: token t = j*(w/2) + i for v1
        patches = ref.model.vision_tower(pixel_values=pv).last_hidden_state[:, 1:]
        spec_v1 = ref.model.multi_modal_projector(fx.pixel_shuffle_reference(patches, "v1"))
    assert fx.max_abs_diff(f1, f2) > 1e-2, "v1 and v2 gave the same features: the grid was not transposed"
    fx.check_close(f1, fx.transpose_token_grid(hf_v2), "ps_version v1 extract_feature vs transpose(HF v2)", **TOL)
    fx.check_close(f1, spec_v1, "ps_version v1 extract_feature vs spec index formula", **TOL)

    # whole model under v1: HF language model fed embeddings spliced with the transposed features
    m1.img_context_token_id = fx.IMG_CONTEXT_ID
    ids = fx.image_prompt(2, cfg1, seed=8)
    with torch.no_grad():
        emb = ref.model.language_model.embed_tokens(ids).clone()
        emb[ids == fx.IMG_CONTEXT_ID] = fx.transpose_token_grid(hf_v2).reshape(-1, emb.shape[-1])
        exp = ref(inputs_embeds=emb).logits
        out = m1(ids, pixel_values=pv)
    fx.check_close(out, exp, "ps_version v1 whole-model logits", **TOL)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def test_sharded_checkpoint_equals_single_file(make_ckpt, nv_load):
    p1, sd1, cfg1 = make_ckpt("qwen2", "300m", seed=21)
    p3, sd3, cfg3 = make_ckpt("qwen2", "300m", seed=21, shards=3)
    index = json.loads((p3 / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 and not (p3 / "model.safetensors").exists()
    m1, m3 = nv_load(p1), nv_load(p3)
    for m in (m1, m3):
        m.img_context_token_id = fx.IMG_CONTEXT_ID
    pv = fx.random_pixel_values(2, seed=9)
    ids = fx.image_prompt(2, cfg1, seed=9)
    with torch.no_grad():
        a, b = m1(ids, pixel_values=pv), m3(ids, pixel_values=pv)
    fx.check_close(b, a, "sharded (3) vs single-file logits", exact=True)


def test_img_context_id_from_tokenizer(tmp_path):
    """With tokenizer files in the checkpoint, load() takes <IMG_CONTEXT> from them (Phi-3 + InternVL added
    tokens: vocab 32020) and the whole model still matches transformers with that image_token_id."""
    tok_dir = fx.TOKENIZERS / "Phi-3-mini-128k-instruct"
    added = json.loads(next(tok_dir.glob("added_tokens*.json")).read_text())
    sd = fx.write_checkpoint(tmp_path, "phi3", "300m", tokenizer_dir=tok_dir)
    cfg = fx.read_config(tmp_path)
    assert cfg["llm_config"]["vocab_size"] == 32020
    model = _nanovl().load(tmp_path, dtype=torch.float32, device="cpu")
    ctx = added["<IMG_CONTEXT>"]
    assert model.img_context_token_id == ctx
    ref = fx.hf_internvl(sd, cfg, image_token_id=ctx)
    pv = fx.random_pixel_values(2, seed=13)
    ids = fx.image_prompt(2, cfg, seed=13, img_context_id=ctx, img_start_id=added["<img>"],
                          img_end_id=added["</img>"])
    with torch.no_grad():
        out = model(ids, pixel_values=pv)
        exp = ref(input_ids=ids, pixel_values=pv).logits
    fx.check_close(out, exp, "whole model phi3 with real tokenizer ids (vocab 32020) logits", **TOL)


@pytest.mark.parametrize("vit,rope", [("300m", "plain"), ("6b", "dynamic-exceeded")])
def test_hf_format_checkpoint_matches_original(make_ckpt, nv_load, tmp_path, vit, rope):
    """The same network saved by transformers' own save_pretrained (an "-hf" checkpoint, as transformers
    5.x writes it: split vision q/k/v, renamed keys, rope settings under text_config.rope_parameters)
    loads to the same logits as the original-layout checkpoint."""
    path, sd, cfg = make_ckpt("qwen2", vit, **QWEN2_ROPE[rope])
    ref = fx.hf_internvl(sd, cfg)
    ref.save_pretrained(tmp_path)
    orig = nv_load(path)
    orig.img_context_token_id = fx.IMG_CONTEXT_ID
    hf_fmt = _nanovl().load(tmp_path, dtype=torch.float32, device="cpu")
    assert hf_fmt.img_context_token_id == fx.IMG_CONTEXT_ID, "image_token_id of the -hf config not used"
    pv = fx.random_pixel_values(2, seed=10)
    ids = torch.cat([fx.image_prompt(2, cfg, seed=10), fx.random_ids(1, 8, cfg["llm_config"]["vocab_size"])], 1)
    with torch.no_grad():
        out, exp = hf_fmt(ids, pixel_values=pv), orig(ids, pixel_values=pv)
        want = ref(input_ids=ids, pixel_values=pv).logits
    fx.check_close(out, want, f"-hf checkpoint (save_pretrained) ViT-{vit} rope={rope} vs transformers", **TOL)
    fx.check_close(out, exp, f"-hf checkpoint ViT-{vit} rope={rope} vs original-layout checkpoint", **TOL)


def _broken_checkpoint(tmp_path, edit_weights=None, edit_config=None):
    fx.write_checkpoint(tmp_path, "qwen2", "300m")
    if edit_config is not None:
        cfg = fx.read_config(tmp_path)
        edit_config(cfg)
        fx.write_config(cfg, tmp_path)
    if edit_weights is not None:
        sd = dict(load_file(str(tmp_path / "model.safetensors")))
        edit_weights(sd)
        save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return tmp_path


def _load_error(path):
    nanovl = _nanovl()
    from nanovl.errors import NanovlError

    with pytest.raises(NanovlError) as ei:
        nanovl.load(path, dtype=torch.float32, device="cpu")
    return str(ei.value)


def test_load_error_missing_tensor(tmp_path):
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    msg = _load_error(_broken_checkpoint(tmp_path, lambda sd: sd.pop(name)))
    assert name in msg, f"message does not name the missing tensor {name!r}: {msg}"


def test_load_error_unexpected_tensor(tmp_path):
    name = "vision_model.encoder.layers.0.attn.extra_proj.weight"
    msg = _load_error(_broken_checkpoint(tmp_path, lambda sd: sd.__setitem__(name, torch.zeros(4, 4))))
    assert name in msg, f"message does not name the unexpected tensor {name!r}: {msg}"


def test_load_error_wrong_shape(tmp_path):
    name = "mlp1.1.weight"

    def edit(sd):
        sd[name] = torch.zeros(fx.LLM_HIDDEN, 4 * fx.VIT_HIDDEN + 1)

    msg = _load_error(_broken_checkpoint(tmp_path, edit))
    assert name in msg, f"message does not name the mis-shaped tensor {name!r}: {msg}"
    assert str(4 * fx.VIT_HIDDEN + 1) in msg, f"message does not give the bad shape: {msg}"


def test_load_error_unknown_architecture(tmp_path):
    arch = "MambaForCausalLM"

    def edit(cfg):
        cfg["llm_config"]["architectures"] = [arch]

    msg = _load_error(_broken_checkpoint(tmp_path, edit_config=edit))
    assert arch in msg, f"message does not name the architecture {arch!r}: {msg}"
