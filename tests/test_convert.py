"""python -m nanovl.convert: original <-> -hf. The -hf output is loaded by transformers' own
InternVLForConditionalGeneration (test-only) and must give nanovl's logits; original -> hf -> original gives back the
fixture's tensors bit for bit and its config.json; an unmerged LoRA checkpoint of the original code is merged."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fixtures as fx
from nanovl.convert import convert

ROOT = Path(__file__).resolve().parents[1]
if not fx.TOKENIZERS.is_dir():
    pytest.skip("shared assets not available", allow_module_level=True)
TOKENIZER = {"qwen2": "InternVL2_5-1B-MPO", "qwen3": "InternVL2_5-1B-MPO", "llama": "InternVL2_5-1B-MPO",
             "internlm2": "InternVL2-2B", "phi3": "Phi-3-mini-128k-instruct"}


def _tensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _without_dtype(cfg: dict) -> dict:
    cfg = json.loads(json.dumps(cfg))
    cfg.pop("torch_dtype"), cfg["llm_config"].pop("torch_dtype", None)
    return cfg


@pytest.mark.parametrize("llm,vit", [("qwen2", "300m"), ("qwen3", "300m"), ("llama", "300m"), ("internlm2", "300m"),
                                     ("phi3", "300m"), ("qwen2", "6b")])
def test_round_trip_and_transformers(tmp_path, llm, vit):
    """original -> hf -> original: the same tensors (bit for bit, InternLM2's grouped wqkv included) and the same
    config.json; transformers loads the -hf copy (no missing or unexpected keys) and gives nanovl's logits."""
    import nanovl
    from transformers import InternVLForConditionalGeneration

    over = {"select_layer": -2} if vit == "6b" else {}  # a ViT block nanovl never builds: converted all the same
    if llm == "phi3":
        over["llm_config"] = {"max_position_embeddings": 4096}
    sd = fx.write_checkpoint(tmp_path / "o", llm, vit, tokenizer_dir=TOKENIZER[llm], seed=7, **over)
    convert(tmp_path / "o", tmp_path / "hf", "hf", max_shard_size=200_000)
    convert(tmp_path / "hf", tmp_path / "back", "original")
    back = _tensors(tmp_path / "back")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert _without_dtype(fx.read_config(tmp_path / "back")) == _without_dtype(fx.read_config(tmp_path / "o"))
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    hf_cfg = fx.read_config(tmp_path / "hf")
    assert hf_cfg["model_type"] == "internvl" and hf_cfg["text_config"]["model_type"] == \
        {"internlm2": "llama"}.get(llm, llm)
    ref, info = InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                                 output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model = nanovl.load(tmp_path / "o")
    tok = model.tokenizer
    assert ref.config.image_token_id == tok.token_to_id("<IMG_CONTEXT>")
    ids = fx.image_prompt(2, fx.read_config(tmp_path / "o"), img_context_id=tok.token_to_id("<IMG_CONTEXT>"),
                          img_start_id=tok.token_to_id("<img>"), img_end_id=tok.token_to_id("</img>"), seed=3)
    pv = fx.random_pixel_values(2, seed=3)
    with torch.no_grad():
        ours, theirs = model(ids, pixel_values=pv), ref(input_ids=ids, pixel_values=pv).logits
        again = nanovl.load(tmp_path / "hf")(ids, pixel_values=pv)
    fx.check_close(ours, theirs, f"convert {llm}+{vit} -> hf: transformers vs nanovl logits", rtol=1e-5, atol=1e-5)
    assert torch.equal(again, ours) and nanovl.load(tmp_path / "hf").config.template == model.config.template


def test_transformers_hf_checkpoint_to_original(tmp_path):
    """A checkpoint transformers itself wrote (-hf, no nanovl fields) -> original: the fixture's tensors."""
    sd = fx.write_checkpoint(tmp_path / "o", "qwen2", "300m", seed=2)
    fx.hf_internvl(sd, fx.read_config(tmp_path / "o")).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")
    cfg = fx.read_config(tmp_path / "hf")
    cfg["image_token_id"] = fx.IMG_CONTEXT_ID
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    convert(tmp_path / "hf", tmp_path / "back", "original", dtype="fp32")
    back = _tensors(tmp_path / "back")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert fx.read_config(tmp_path / "back")["architectures"] == ["InternVLChatModel"]


def test_merge_lora_of_an_original_unmerged_checkpoint(tmp_path):
    """--merge-lora: W + 2 B A (computed here in the original layout, InternLM2's wqkv as stored) for every adapted
    weight; without the flag, one clear line."""
    sd = fx.write_checkpoint(tmp_path / "base", "internlm2", "300m", seed=4, tokenizer_dir="InternVL2-2B")
    g = torch.Generator().manual_seed(0)
    peft, expected = {}, dict(sd)
    for k, v in sd.items():
        if k.startswith("language_model.") and any(f".{t}.weight" in k for t in ("wqkv", "wo", "w1", "w2", "w3")):
            base = k.replace("language_model.", "language_model.base_model.model.", 1).removesuffix(".weight")
            A, B = torch.randn(4, v.shape[1], generator=g) * 0.1, torch.randn(v.shape[0], 4, generator=g) * 0.1
            peft.update({f"{base}.base_layer.weight": v, f"{base}.lora_A.default.weight": A,
                         f"{base}.lora_B.default.weight": B})
            expected[k] = v + 2.0 * B @ A
        elif k.startswith("language_model."):
            peft[k.replace("language_model.", "language_model.base_model.model.", 1)] = v
        else:
            peft[k] = v
    src = tmp_path / "unmerged"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in peft.items()}, str(src / "model.safetensors"))
    for f in (tmp_path / "base").iterdir():
        if f.suffix != ".safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    cfg = fx.read_config(src)
    cfg["use_llm_lora"] = 4
    fx.write_config(cfg, src)
    r = subprocess.run([sys.executable, "-m", "nanovl.convert", str(src), str(tmp_path / "x"), "--to", "original"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--merge-lora" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "nanovl.convert", str(src), str(tmp_path / "merged"), "--to",
                        "original", "--merge-lora"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    got = _tensors(tmp_path / "merged")
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert fx.read_config(tmp_path / "merged")["use_llm_lora"] == 0


def test_what_hf_cannot_express(tmp_path):
    """ps_version v1 (InternVL-Chat-V1-1/1-2): transformers always swaps the pixel-shuffle grid back."""
    fx.write_checkpoint(tmp_path / "v1", "llama", "6b", ps_version="v1", tokenizer_dir="InternVL2_5-1B-MPO")
    r = subprocess.run([sys.executable, "-m", "nanovl.convert", str(tmp_path / "v1"), str(tmp_path / "out"), "--to",
                        "hf"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "ps_version v1" in r.stderr, r.stderr
