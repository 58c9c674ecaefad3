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


# ---------------------------------------------------------------------------------------------
# the whole Flash model: a tiny checkpoint in the original layout against a reference pipeline built from
# transformers' InternViT and Qwen2 (test-only) plus the formulas above


from pathlib import Path  # noqa: E402

import nanovl  # noqa: E402
from nanovl import chat as chat_module  # noqa: E402
from nanovl.router import compress_prompt  # noqa: E402

TOKENIZER = "InternVL2_5-1B-MPO"
if not (fx.TOKENIZERS / TOKENIZER).is_dir():
    pytest.skip(f"shared assets not available: {fx.TOKENIZERS}", allow_module_level=True)


@pytest.fixture(scope="module")
def flash(make_ckpt):
    path, sd, cfg = make_ckpt("qwen2", "300m", seed=70, template="internvl2_5", tokenizer_dir=TOKENIZER, **FLASH)
    return path, sd, cfg, nanovl.load(path, dtype=torch.float32, device="cpu")


def _ref_quantile(p: torch.Tensor, q: float) -> float:
    """numpy's default 'linear' quantile, written out: the sorted values at (n - 1) q, interpolated."""
    s = sorted(p.tolist())
    h = (len(s) - 1) * q
    lo = math.floor(h)
    return s[lo] + (h - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo])


def _ref_shuffle(x: torch.Tensor, s: float) -> torch.Tensor:
    """The original's pixel_shuffle (ps_version v2) step by step: (N, W, H, C) -> (N, H s, W s, C / s^2)."""
    n, w, h, c = x.shape
    x = x.view(n, w, int(h * s), int(c / s)).permute(0, 2, 1, 3).contiguous()
    return x.view(n, int(h * s), int(w * s), int(c / (s * s))).permute(0, 2, 1, 3).contiguous()


def _ref_mlp2(sd, x):
    ln = F.layer_norm(x, (x.shape[-1],), sd["mlp2.0.weight"], sd["mlp2.0.bias"], 1e-5)
    h = F.gelu(ln @ sd["mlp2.1.weight"].T + sd["mlp2.1.bias"])
    h = F.gelu(h @ sd["mlp2.4.weight"].T + sd["mlp2.4.bias"])
    return h @ sd["mlp2.7.weight"].T + sd["mlp2.7.bias"]


def _reference(sd, cfg, pv, relative, absolute):
    """The Flash pipeline from the spec: transformers' ViT, the formulas' scores, the decision with the written-out
    quantile, mlp1 through transformers' projector for kept tiles, shuffle 0.25 + mlp2 for compressed ones.
    -> (scores, compressed, [per-tile (n, D) features])."""
    hf = fx.hf_internvl(sd, cfg)
    with torch.no_grad():
        x = hf.model.vision_tower(pixel_values=pv).last_hidden_state[:, 1:]  # (T, 1024, C)
        scores = _reference_scores(sd, x)
        r = _ref_quantile(scores, relative)
        compressed = [bool(p > r and p >= absolute) for p in scores.tolist()]
        dense = hf.model.get_image_features(pixel_values=pv).pooler_output  # (T, 256, D)
        small = _ref_mlp2(sd, _ref_shuffle(x.reshape(len(x), 32, 32, C), 0.25).reshape(len(x), 64, 16 * C))
    return scores, compressed, [small[i] if c else dense[i] for i, c in enumerate(compressed)], hf


def _record_generate(monkeypatch):
    """Capture what chat hands to the decode loop: the prompt ids and the image features."""
    seen = {}
    real = chat_module.generation.generate

    def spy(model, input_ids, **kw):
        seen.update(ids=input_ids[0].tolist(), vit=kw.get("vit_embeds"))
        return real(model, input_ids, **kw)

    monkeypatch.setattr(chat_module.generation, "generate", spy)
    return seen


@pytest.mark.parametrize("relative,absolute", [(0.1, 0.5), (0.5, 0.0), (0.0, 0.85)])
def test_flash_chat_against_reference(flash, monkeypatch, relative, absolute):
    """route() and chat() on 7 tiles give the reference's scores and decisions under both thresholds; chat's prompt is
    the template's with 256 <IMG_CONTEXT> a kept tile and 64 a compressed one (positions contiguous), its
    features the reference's, and the first-step logits transformers' Qwen2 on those embeddings."""
    path, sd, cfg, model = flash
    monkeypatch.setattr(model.config, "flash_relative_threshold", relative)
    monkeypatch.setattr(model.config, "flash_absolute_threshold", absolute)
    pv = fx.random_pixel_values(7, seed=71, size=64)
    ref_scores, ref_compressed, ref_feats, hf = _reference(sd, cfg, pv, relative, absolute)
    scores, compressed = model.route(pv)
    fx.check_close(scores, ref_scores, f"Flash route() scores vs reference (rel {relative}, abs {absolute})",
                   rtol=1e-5, atol=1e-5)
    assert compressed.tolist() == ref_compressed
    assert 0 < sum(ref_compressed) < 7 or (relative, absolute) == (0.0, 0.85)

    seen = _record_generate(monkeypatch)
    model.chat("Describe.", pv, max_new_tokens=2)
    tok = model.tokenizer
    n_img = sum(64 if c else 256 for c in ref_compressed)
    want = ("<|im_start|>system\n" + nanovl.template.get_template("internvl2_5").default_system + "<|im_end|>\n"
            "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * n_img + "</img>\nDescribe.<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert seen["ids"] == tok.encode(want)
    assert [len(t) for t in seen["vit"]] == [64 if c else 256 for c in ref_compressed]
    fx.check_close(torch.cat(seen["vit"]), torch.cat(ref_feats), f"Flash features (7 tiles, {n_img} tokens) vs "
                   f"reference", rtol=1e-5, atol=1e-5)

    ids = torch.tensor([seen["ids"]])
    with torch.no_grad():
        emb = hf.get_input_embeddings()(ids)
        emb[ids == tok.token_to_id("<IMG_CONTEXT>")] = torch.cat(ref_feats)
        ref_logits = hf(inputs_embeds=emb).logits
        logits = model(ids, vit_embeds=seen["vit"])
    fx.check_close(logits, ref_logits, f"Flash compressed-prompt logits vs transformers (rel {relative})",
                   rtol=1e-5, atol=1e-5)


def test_forced_256_is_the_dense_model(flash, make_ckpt, monkeypatch):
    """Forced to 256, a Flash checkpoint answers and scores exactly as the same weights without the router; forced
    to 64, every tile is compressed; route() reports the forced decisions with the router's own scores."""
    path, sd, cfg, model = flash
    dense_path, _, _ = make_ckpt("qwen2", "300m", seed=70, template="internvl2_5", tokenizer_dir=TOKENIZER,
                                 **{k: v for k, v in FLASH.items() if not k.startswith("flash")})
    dense = nanovl.load(dense_path, dtype=torch.float32, device="cpu")
    assert not hasattr(dense, "gating")
    pv = fx.random_pixel_values(5, seed=72, size=64)
    scores = model.route(pv)[0]
    monkeypatch.setattr(model, "flash_force", 256)
    s256, c256 = model.route(pv)
    assert torch.equal(s256, scores) and not c256.any()
    seen = _record_generate(monkeypatch)
    a = model.chat("What is it?", pv, max_new_tokens=6)
    flash_ids, flash_vit = seen["ids"], seen["vit"]
    assert a == dense.chat("What is it?", pv, max_new_tokens=6)
    assert flash_ids == seen["ids"]  # the dense call ran last
    ids = torch.tensor([flash_ids])
    with torch.no_grad():
        fx.check_close(model(ids, vit_embeds=flash_vit), dense(ids, pixel_values=pv),
                       "Flash forced to 256 vs dense model logits", exact=True)
    monkeypatch.setattr(model, "flash_force", 64)
    assert model.route(pv)[1].all()
    model.chat("What is it?", pv, max_new_tokens=1)
    assert [len(t) for t in seen["vit"]] == [64] * 5


def test_single_tile_never_compressed_and_batch_routes_per_question(flash):
    """One tile alone is never compressed (p > quantile of itself is false); batch_chat routes each question's tiles
    among themselves (the original takes one prompt): its answers are those of chat() on each question alone."""
    _, _, _, model = flash
    pv = fx.random_pixel_values(7, seed=73, size=64)
    assert model.route(pv[:1])[1].tolist() == [False]
    qs = ["Describe.", "What colour?", "Count."]
    counts = [1, 2, 4]
    got = model.batch_chat(qs, pv, num_patches_list=counts, max_new_tokens=5)
    starts = [0, 1, 3]
    assert got == [model.chat(q, pv[s:s + n], max_new_tokens=5) for q, s, n in zip(qs, starts, counts)]
    per_question = [model.route(pv[s:s + n])[1].tolist() for s, n in zip(starts, counts)]
    joint = model.route(pv)[1].tolist()
    assert per_question != [joint[s:s + n] for s, n in zip(starts, counts)]  # so the answers tell the two apart


def test_compress_prompt_worked_example():
    """Two images (2 tiles, then 1) in one prompt; tiles 1 and 3 compressed: the first image's run becomes 64 + 256,
    the second's 64, the text around them unchanged; a run that is not a whole number of tiles is refused."""
    I = 7  # noqa: E741
    ids = [1, 2, 5] + [I] * 512 + [6, 3, 5] + [I] * 256 + [6, 4]
    out = compress_prompt(ids, [64, 256, 64], I)
    assert out == [1, 2, 5] + [I] * 320 + [6, 3, 5] + [I] * 64 + [6, 4]
    with pytest.raises(nanovl.NanovlError, match="not a whole number"):
        compress_prompt([1] + [I] * 300 + [2], [256], I)
    with pytest.raises(nanovl.NanovlError, match="2 256-token image blocks but there are 3"):
        compress_prompt([1] + [I] * 512, [256, 64, 64], I)


def test_flash_config_is_checked(tmp_path):
    """flash_mode on without thresholds, or on a grid that is not 32 x 32, is one clear error at load time."""
    bad = dict(FLASH, flash_absolute_threshold=None)
    fx.write_checkpoint(tmp_path / "a", "qwen2", "300m", **bad)
    with pytest.raises(nanovl.NanovlError, match="flash_absolute_threshold must be a number in"):
        nanovl.load(tmp_path / "a")
    fx.write_checkpoint(tmp_path / "b", "qwen2", "300m", flash_mode=True, flash_relative_threshold=0.1,
                        flash_absolute_threshold=0.5)  # the default tiny 56-pixel, 4x4 grid
    with pytest.raises(nanovl.NanovlError, match="32x32 patch grid"):
        nanovl.load(tmp_path / "b")


def test_flash_checkpoint_saves_and_refuses_hf(flash, tmp_path):
    """save_pretrained keeps the router and mlp2 under their original names (the original loads them); the -hf
    format has no Flash model, so convert refuses it in one line."""
    from nanovl.convert import convert
    from safetensors import safe_open

    path, sd, _, model = flash
    out = model.save_pretrained(tmp_path / "saved", dtype=torch.float32)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert all(torch.equal(f.get_tensor(k), sd[k]) for k in sd if k.startswith(("mlp2", "pooling", "gating")))
    assert keys == set(sd)
    with pytest.raises(nanovl.NanovlError, match="no -hf form"):
        convert(path, tmp_path / "hf", to="hf")


def test_cli_verbose_and_show_routing(flash, tmp_path):
    """--verbose prints, per image, the compressed tiles and the tokens saved (the router's decisions for those
    tiles); --show-routing writes the picture; --flash 64 compresses every tile."""
    import os
    import subprocess
    import sys

    from PIL import Image

    path, _, _, model = flash
    img = tmp_path / "img.png"
    Image.radial_gradient("L").resize((300, 180)).convert("RGB").save(img)
    root = Path(__file__).resolve().parents[1]

    def run(*args):
        r = subprocess.run([sys.executable, "-m", "nanovl.generate", "--model", str(path), "--image", str(img),
                            "--max-tokens", "2", "--max-tiles", "6", "--verbose", *args], cwd=root, text=True,
                           capture_output=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
        assert r.returncode == 0, r.stderr
        return [line for line in r.stderr.splitlines() if line.startswith("[router:")]

    pv = model.load_image(img, max_num=6)
    compressed = model.route(pv)[1].tolist()
    lines = run("--show-routing", str(tmp_path / "map.png"))
    k = [i + 1 for i, c in enumerate(compressed) if c]
    assert lines == [f"[router: image 1: {len(k)} of {len(pv)} tiles compressed to 64 tokens {k if k else ''}, "
                     f"{192 * len(k)} image tokens saved ({256 * len(pv) - 192 * len(k)} of {256 * len(pv)})]"]
    assert Image.open(tmp_path / "map.png").size[0] > 224
    assert run("--flash", "64")[0].startswith(f"[router: image 1: {len(pv)} of {len(pv)} tiles compressed")


def test_flash_benchmark_smoke(tmp_path):
    """benchmarks/flash_bench.py --smoke runs every setting; the prompt lengths are the spec's arithmetic (60 text
    tokens + <img></img> + 13 tiles of 256, of 64, or a mix) and every time is finite."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("flash_bench", Path(__file__).resolve().parents[1] / "benchmarks"
                                                  / "flash_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--out", str(tmp_path), "--reps", "1", "--new-tokens", "3"])
    res = json.loads((tmp_path / "flash_results.json").read_text())
    rows, n = res["rows"], res["compressed_by_router"]
    assert rows["256"]["prompt_tokens"] == 62 + 13 * 256 and rows["64"]["prompt_tokens"] == 62 + 13 * 64
    assert rows["router"]["prompt_tokens"] == 62 + 13 * 256 - 192 * n
    assert all(math.isfinite(r["ttft_s"]) and r["ttft_s"] > 0 for r in rows.values())
    assert (tmp_path / "flash-routing.png").exists() and "| router |" in (tmp_path / "flash_results.md").read_text()
