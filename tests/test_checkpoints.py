"""Every released InternVL checkpoint, from its real config (tests/checkpoints.py), against nanovl:

* the model built on the meta device has the published parameter count, and exactly the count of the tensors the
  spec lists (vision-and-chat.md §1.7, language-models.md §2), so no tensor is missing or extra;
* InternVL2-1B's state dict, written as safetensors, is its published file to the byte;
* the checkpoints nanovl does not support (MoE, GPT-OSS, unknown) are refused when the config is read, by name;
* the transformers "-hf" form of each config reads into the same model, and a tiny -hf checkpoint (InternLM2 -> Llama,
  Qwen3; both on-disk layouts) gives the same logits as the original layout;
* the prompts of the templates these checkpoints use, written out literally from vision-and-chat.md §5.4;
* InternVL-Chat-V1-2's older image path (ps_version v1, one 448 tile, Hermes-2) end to end, CLI included.
"""
import dataclasses
import functools
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import checkpoints as ck
import fixtures as fx
from nanovl.template import TEMPLATES, build_prompt, expand_images
from nanovl.config import ARCHITECTURES, InternVLConfig
from nanovl.errors import NanovlError
from nanovl.model import InternVL
from nanovl.weights import read_config

TOL = dict(rtol=1e-5, atol=1e-5)
IMAGE = ck.ASSETS / "media" / "internvl_examples" / "image1.jpg"
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))
import support_table  # noqa: E402


def meta_model(cfg: dict) -> InternVL:
    with torch.device("meta"):
        return InternVL(InternVLConfig.from_dict(cfg))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def catalogue_model(name: str) -> InternVL:
    return meta_model(ck.BY_NAME[name].config)


def spec_count(cfg: dict) -> int:
    """Parameters of a checkpoint from the spec's tensor tables alone (nanovl not involved)."""
    v, lm = cfg["vision_config"], cfg["llm_config"]
    C, I, P = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    layer_norm = v.get("norm_type", "rms_norm") == "layer_norm"  # 6B configs omit it: rms_norm
    vit = C + (C * 3 * P * P + C) + (1 + (v["image_size"] // P) ** 2) * C  # class, patch conv, position
    block = (3 * C * C + 3 * C * v["qkv_bias"] + C * C + C  # attn.qkv, attn.proj
             + 2 * C * v["qk_normalization"] + 2 * C * (1 + layer_norm) + 2 * C  # q/k_norm, norm1/2, ls1/2
             + I * C + I + C * I + C)  # mlp.fc1, mlp.fc2
    assert cfg.get("select_layer", -1) == -1  # every released 1.2+ checkpoint: all blocks are used
    vit += v["num_hidden_layers"] * block
    H, V, L, nH = lm["hidden_size"], lm["vocab_size"], lm["num_hidden_layers"], lm["num_attention_heads"]
    nKV = lm.get("num_key_value_heads") or nH
    hd = lm.get("head_dim") or H // nH
    arch = lm["architectures"][0]
    bias = arch == "Qwen2ForCausalLM" or bool(lm.get("attention_bias")) or bool(lm.get("bias"))
    qk_norm = arch == "Qwen3ForCausalLM"
    proj = 4 * C * 2 + 4 * C * H + H + H * H + H  # mlp1: LayerNorm(4C), Linear(4C, H), Linear(H, H)
    o_bias = bool(lm.get("attention_bias")) or bool(lm.get("bias"))
    layer = ((nH + 2 * nKV) * hd * H + bias * (nH + 2 * nKV) * hd + nH * hd * H + o_bias * H
             + 2 * hd * qk_norm + 2 * H + 3 * H * lm["intermediate_size"])
    head = 0 if lm.get("tie_word_embeddings") else V * H
    flash = 0
    if cfg.get("flash_mode") is not None:  # internvl3_5.md §2.3 (g): mlp2, pooling_before_gating, gating
        flash = (2 * 16 * C + 16 * C * 2 * H + 2 * H + 2 * H * 2 * H + 2 * H + 2 * H * H + H  # mlp2.0/.1/.4/.7
                 + C + 4 * (3 * C * C + 3 * C + C * C + C + 2 * C)  # query_token, attn1-4, norm1-4
                 + 4 * (4 * C * C + 4 * C + 4 * C * C + C + 2 * C) + 2 * C + 2 * C + 2)  # block1-4, gate.0, gate.1
    return vit + proj + V * H + L * layer + H + head + flash


# ---------------------------------------------------------------------------------------------
# parameter counts


@pytest.mark.parametrize("c", ck.CHECKPOINTS, ids=lambda c: c.name)
def test_parameter_count(c):
    model = catalogue_model(c.name)
    n = n_params(model)
    assert n == spec_count(c.config), f"{c.name}: nanovl builds {n:,} parameters, the spec's tensors add up to " \
                                      f"{spec_count(c.config):,}"
    p = c.published
    assert p.check(n), f"{c.name}: {n / 1e9:.4f}B parameters, published {p.text} ({p.source}) allows " \
                       f"{p.lo / 1e9:.4f}B..{p.hi / 1e9:.4f}B"
    assert c.config["template"] in TEMPLATES
    assert model.config.llm_config.arch in ARCHITECTURES
    assert len(model.vision_model.encoder.layers) == c.config["vision_config"]["num_hidden_layers"]


def test_internvl2_1b_safetensors_file_is_the_published_size_to_the_byte():
    """InternVL2-1B (Qwen2: nanovl's names are the checkpoint's names, but for the stacked q/k/v and gate/up) written
    as the bf16 safetensors file save_pretrained produces (tensors sorted by name, metadata {"format": "pt"}, header
    padded to 8 bytes) is exactly the 1,876,395,376 bytes of the published model.safetensors: every tensor name and
    shape accounts for its bytes."""
    model = meta_model(ck.BY_NAME["InternVL2-1B"].config)
    lm = model.config.llm_config
    split = {"qkv_proj": {"q_proj": lm.num_attention_heads * lm.head_dim, "k_proj": lm.num_key_value_heads * lm.head_dim,
                          "v_proj": lm.num_key_value_heads * lm.head_dim},
             "gate_up_proj": {"gate_proj": lm.intermediate_size, "up_proj": lm.intermediate_size}}
    sd = {}
    for name, t in model.state_dict().items():  # back to the checkpoint's separate tensors
        stacked = next((k for k in split if f".{k}." in name), None)
        for part, rows in (split[stacked].items() if stacked else [(None, None)]):
            sd[name.replace(stacked, part) if stacked else name] = t if not stacked else t[:rows]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(sd):
        end = offset + 2 * sd[name].numel()
        header[name] = {"dtype": "BF16", "shape": list(sd[name].shape), "data_offsets": [offset, end]}
        offset = end
    header_len = len(json.dumps(header, separators=(",", ":")).encode())
    size = 8 + header_len + (-header_len) % 8 + offset
    assert size == ck.INTERNVL2_1B_BYTES, f"{size:,} bytes, published {ck.INTERNVL2_1B_BYTES:,}"


def summary(cfg: InternVLConfig) -> dict:
    """What decides the network and its inputs (not token ids or names)."""
    lm = cfg.llm_config
    rope = lm.rope_scaling or {}
    return dict(
        vision={k: v for k, v in dataclasses.asdict(cfg.vision_config).items()
                if k not in ("raw", "initializer_factor", "drop_path_rate")},  # training-only fields
        llm=dict(hidden=lm.hidden_size, layers=lm.num_hidden_layers, heads=lm.num_attention_heads,
                 kv_heads=lm.num_key_value_heads, head_dim=lm.head_dim, inter=lm.intermediate_size,
                 vocab=lm.vocab_size, eps=lm.rms_norm_eps, theta=float(lm.rope_theta),
                 max_pos=lm.max_position_embeddings,
                 rope=(rope.get("rope_type", rope.get("type", "default")), rope.get("factor")),
                 qkv_bias=lm.qkv_bias, o_bias=lm.o_bias, qk_norm=lm.qk_norm, tie=lm.tie_word_embeddings),
        top=dict(template=cfg.template, select_layer=cfg.select_layer, downsample_ratio=cfg.downsample_ratio,
                 ps_version=cfg.ps_version, image_size=cfg.image_size, num_image_token=cfg.num_image_token,
                 dynamic=cfg.dynamic_image_size, thumbnail=cfg.use_thumbnail, max_tiles=cfg.max_dynamic_patch))


@pytest.mark.parametrize("name", list(ck.FROM_REFERENCE))
def test_real_config_equals_the_reference_numbers(name):
    """The real config files and the tables of language-models.md §1 / vision-and-chat.md §1.1 describe the same
    model: the builders the other rows are made with are right where they can be checked."""
    real = InternVLConfig.from_dict(ck.BY_NAME[name].config)
    built = InternVLConfig.from_dict(ck.FROM_REFERENCE[name])
    assert real.llm_config.arch == built.llm_config.arch
    assert summary(real) == summary(built)


# ---------------------------------------------------------------------------------------------
# refused at load time


def assert_names_architecture(msg: str, arch: str):
    assert arch in msg, f"the error does not name {arch!r}: {msg}"
    assert all(a in msg for a in ARCHITECTURES), f"the error does not list the supported architectures: {msg}"


@pytest.mark.parametrize("name", list(ck.UNSUPPORTED))
def test_unsupported_architecture_is_refused_at_load_time(name, tmp_path):
    cfg = ck.UNSUPPORTED[name]
    arch = cfg["llm_config"]["architectures"][0]
    with pytest.raises(NanovlError) as e:
        InternVLConfig.from_dict(cfg)
    assert_names_architecture(str(e.value), arch)
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # no weights needed: the config alone is refused
    import nanovl

    with pytest.raises(NanovlError) as e:
        nanovl.load(tmp_path)
    assert_names_architecture(str(e.value), arch)


def test_unsupported_hf_config_is_refused(tmp_path):
    """An -hf config (InternVL3_5-30B-A3B-HF style): the text model_type names the architecture."""
    from transformers import InternVLConfig as HFConfig, Qwen3MoeConfig

    text = Qwen3MoeConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, moe_intermediate_size=32, num_experts=4, vocab_size=512)
    (tmp_path / "config.json").write_text(json.dumps(HFConfig(text_config=text.to_dict()).to_dict()))
    with pytest.raises(NanovlError) as e:
        read_config(tmp_path)
    assert_names_architecture(str(e.value), "qwen3_moe")


# ---------------------------------------------------------------------------------------------
# the transformers "-hf" format


def hf_config_dict(cfg: dict) -> dict:
    """config.json of the -hf repo for an original config: transformers' own InternVLConfig(...).to_dict(), with the
    decoder as transformers' converter writes it (InternLM2 -> Llama)."""
    from transformers import InternVLConfig as HFConfig

    return HFConfig(vision_config=fx.hf_vision_config_kwargs(cfg["vision_config"]),
                    text_config=fx.hf_text_config(cfg["llm_config"]).to_dict(), image_token_id=151667,
                    downsample_ratio=cfg["downsample_ratio"], vision_feature_layer=cfg["select_layer"]).to_dict()


@pytest.mark.parametrize("c", [c for c in ck.CHECKPOINTS if c.hf], ids=lambda c: c.hf)
def test_hf_config_reads_into_the_same_model(c, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(c.config)))
    hf, fmt = read_config(tmp_path)
    original = InternVLConfig.from_dict(c.config)
    assert fmt == "hf" and hf.image_token_id == 151667
    want = {"InternLM2ForCausalLM": "LlamaForCausalLM"}.get(original.llm_config.arch, original.llm_config.arch)
    assert hf.llm_config.arch == want
    assert summary(hf) == summary(original)
    with torch.device("meta"):
        assert n_params(InternVL(hf)) == n_params(InternVL(original))


@pytest.mark.parametrize("layout", ["save_pretrained", "runtime_keys"])
@pytest.mark.parametrize("llm", ["internlm2", "qwen3"])
def test_hf_checkpoint_gives_the_original_logits(make_ckpt, nv_load, tmp_path, llm, layout):
    """A tiny original checkpoint converted to -hf: InternLM2 becomes Llama with split wqkv (InternVL2_5-2B-MPO-hf),
    Qwen3 keeps its names (InternVL3_5-*-HF). 'save_pretrained' is what transformers 5.23 writes (legacy prefixes
    vision_tower. / multi_modal_projector. / language_model.model. / language_model.lm_head.), 'runtime_keys' the
    module names (model.vision_tower. / model.language_model. / lm_head.)."""
    import nanovl

    path, sd, cfg = make_ckpt(llm, "300m")
    ref = fx.hf_internvl(sd, cfg)
    if layout == "save_pretrained":
        ref.save_pretrained(tmp_path)
        from safetensors import safe_open

        with safe_open(tmp_path / "model.safetensors", "pt") as f:
            prefixes = {k.split(".")[0] for k in f.keys()}
        assert prefixes == {"vision_tower", "multi_modal_projector", "language_model"}
    else:
        hf_cfg, hf_sd = fx.to_hf_internvl(sd, cfg)
        save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(tmp_path / "model.safetensors"))
        (tmp_path / "config.json").write_text(json.dumps(hf_cfg.to_dict()))
    hf = nanovl.load(tmp_path, dtype=torch.float32, device="cpu")
    orig = nv_load(path)
    orig.img_context_token_id = fx.IMG_CONTEXT_ID
    pv = fx.random_pixel_values(2, seed=31)
    ids = fx.image_prompt(2, cfg, seed=31)
    with torch.no_grad():
        out, exp = hf(ids, pixel_values=pv), orig(ids, pixel_values=pv)
        want = ref(input_ids=ids, pixel_values=pv).logits
    fx.check_close(out, exp, f"-hf {llm} ({layout}) vs original-layout checkpoint logits", **TOL)
    fx.check_close(out, want, f"-hf {llm} ({layout}) vs transformers logits", **TOL)


# ---------------------------------------------------------------------------------------------
# prompts (vision-and-chat.md §5.4, written out literally; turns: '<image>\nQ1', 'A1', 'Q2', generate)

SYS_INTERNVL = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYS_2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
GOLDEN = {
    "internlm2-chat": (SYS_INTERNVL, f"<|im_start|>system\n{SYS_INTERNVL}<|im_end|><|im_start|>user\n<image>\nQ1"
                                     "<|im_end|><|im_start|>assistant\nA1<|im_end|><|im_start|>user\nQ2<|im_end|>"
                                     "<|im_start|>assistant\n"),
    "phi3-chat": (SYS_INTERNVL, f"<|system|>\n{SYS_INTERNVL}<|end|><|user|>\n<image>\nQ1<|end|><|assistant|>\nA1"
                                "<|end|><|user|>\nQ2<|end|><|assistant|>\n"),
    # InternVL-Chat-V1-2-Plus: config.json system_message "Answer the questions."
    "Hermes-2": ("Answer the questions.", "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
                                          "<image>\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|><|im_start|>user\n"
                                          "Q2<|im_end|><|im_start|>assistant\n"),
    "internvl2_5": (SYS_2_5, f"<|im_start|>system\n{SYS_2_5}<|im_end|>\n<|im_start|>user\n<image>\nQ1<|im_end|>\n"
                             "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
                             "<|im_start|>assistant\n"),
}
STOP = {"internlm2-chat": "<|im_end|>", "phi3-chat": "<|end|>", "Hermes-2": "<|im_end|>", "internvl2_5": "<|im_end|>"}


@pytest.mark.parametrize("template", list(GOLDEN))
def test_golden_prompt(template):
    system, want = GOLDEN[template]
    t = TEMPLATES[template]
    assert build_prompt(t, system, [("<image>\nQ1", "A1")], "Q2") == want
    assert t.sep.strip() == STOP[template]
    image = "<img>" + "<IMG_CONTEXT>" * 256 + "</img>"  # one 448 tile: 256 tokens, no newline inside
    assert expand_images(want, [1], 256) == want.replace("<image>", image)


def test_every_catalogue_template_has_a_golden_prompt():
    assert {c.config["template"] for c in ck.CHECKPOINTS} <= set(GOLDEN)
    plus = InternVLConfig.from_dict(ck.BY_NAME["InternVL-Chat-V1-2-Plus"].config)
    assert plus.system_message == GOLDEN["Hermes-2"][0]


# ---------------------------------------------------------------------------------------------
# InternVL-Chat-V1-2: ps_version v1, a single 448 resize, no tiling, Hermes-2


@pytest.fixture(scope="module")
def v1_2(tmp_path_factory):
    """A tiny V1-2: Yi-like Llama + InternViT-6B, ps_version v1, no dynamic tiling, the Yi tokenizer."""
    if not IMAGE.exists() or not (fx.TOKENIZERS / "Yi-34B").is_dir():
        pytest.skip("shared assets not available")
    path = tmp_path_factory.mktemp("v1-2")
    sd = fx.write_checkpoint(path, llm="llama", vit="6b", ps_version="v1", template="Hermes-2", tokenizer_dir="Yi-34B",
                             dynamic_image_size=False, use_thumbnail=False, max_dynamic_patch=1)
    import nanovl

    return path, sd, fx.read_config(path), nanovl.load(path, dtype=torch.float32, device="cpu")


def test_v1_2_one_tile_is_the_single_resize(v1_2):
    """The CLI's media path: one tile, equal to §4.3's resize((448, 448)) (PIL bicubic), /255, ImageNet mean/std."""
    from nanovl.cli import load_media, parse_args

    path, _, cfg, model = v1_2
    pixel_values, patches, prefix = load_media(parse_args(["--image", str(IMAGE)]), model.config)
    assert patches == [1] and prefix == "<image>\n"
    S = cfg["force_image_size"]
    x = np.asarray(Image.open(IMAGE).convert("RGB").resize((S, S), Image.BICUBIC), dtype=np.float32) / 255
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    torch.testing.assert_close(pixel_values, torch.from_numpy(x).permute(2, 0, 1)[None], rtol=0, atol=1e-5)


def test_v1_2_logits_match_transformers_with_the_v1_grid(v1_2):
    """transformers cannot express ps_version v1 (§8.4): its v2 features with the token grid transposed, spliced into
    its Llama, are the reference."""
    path, sd, cfg, model = v1_2
    ref = fx.hf_internvl(sd, {**cfg, "ps_version": "v2"})
    ctx = model.img_context_token_id
    assert ctx == model.tokenizer.token_to_id("<IMG_CONTEXT>") == 64000
    pv = fx.random_pixel_values(1, seed=32)
    ids = fx.image_prompt(1, cfg, seed=32, img_context_id=ctx, img_start_id=68, img_end_id=70)
    with torch.no_grad():
        feats = fx.transpose_token_grid(ref.model.get_image_features(pixel_values=pv).pooler_output)
        emb = ref.model.language_model.embed_tokens(ids).clone()
        emb[ids == ctx] = feats.reshape(-1, emb.shape[-1])
        want = ref(inputs_embeds=emb).logits
        out = model(ids, pixel_values=pv)
    fx.check_close(out, want, "V1-2 (Llama + InternViT-6B, ps_version v1) whole-model logits", **TOL)


def test_v1_2_cli_runs_with_one_tile(v1_2, capsys):
    from nanovl.cli import main

    path, _, _, model = v1_2
    assert model.tokenizer.token_to_id(TEMPLATES["Hermes-2"].sep.strip()) == 7  # Yi's <|im_end|>
    main(["--model", str(path), "--image", str(IMAGE), "--prompt", "What is it?", "--max-tokens", "3", "--verbose"])
    err = capsys.readouterr().err
    assert "template Hermes-2" in err and "1 tiles [1]" in err, err


# ---------------------------------------------------------------------------------------------
# the README table (scripts/support_table.py)


def test_support_table_names_only_tests_that_exist():
    """Every test a row of the table cites is defined in the file it names (and for this file's parametrized tests,
    the parameter exists)."""
    cited = {t for c in ck.CHECKPOINTS for t in support_table.tests_for(c)}
    cited |= {t for tests in support_table.TESTS.values() for t in tests if "{" not in t}
    cited |= {t for tests in support_table.TOKENIZER_TESTS.values() for t in tests}
    own = {f"test_parameter_count[{c.name}]" for c in ck.CHECKPOINTS}
    own |= {f"test_real_config_equals_the_reference_numbers[{n}]" for n in ck.FROM_REFERENCE}
    own |= {f"test_hf_config_reads_into_the_same_model[{c.hf}]" for c in ck.CHECKPOINTS if c.hf}
    own |= {f"test_golden_prompt[{t}]" for t in GOLDEN}
    for test in sorted(cited):
        file, func = test.split("::")
        name = func.split("[")[0]
        assert re.search(rf"^def {name}\(", (TESTS / file).read_text(), re.M), f"{test}: no such test"
        if file == "test_checkpoints.py" and "[" in func:
            assert func in own, f"{test}: no such parameter"
    for c in ck.CHECKPOINTS:  # every row: its own parameter count and a parity test of its decoder family
        labels = support_table.labels(c)
        assert "count" in labels and support_table.FAMILY[c.arch] in labels


def test_readme_table_is_the_script_output():
    readme = ROOT / "README.md"
    if not readme.exists() or support_table.START not in readme.read_text():
        pytest.skip("README.md has no support-table block")
    text = readme.read_text()
    block = text.split(support_table.START, 1)[1].split(support_table.END, 1)[0].strip("\n")
    counts = {c.name: n_params(catalogue_model(c.name)) for c in ck.CHECKPOINTS}
    assert block == support_table.render(counts), "README.md's table is stale: run python scripts/support_table.py " \
                                                  "--write README.md"
