"""Real-weight checks against published reference outputs. They run wherever the checkpoints exist:
NANOVL_WEIGHTS=/path/to/dir-with-checkpoints pytest tests/test_real_weights.py   (skipped otherwise)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import nanovl

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
REF = ASSETS / "reference_outputs"
WEIGHTS = Path(os.environ.get("NANOVL_WEIGHTS", "weights"))


def checkpoint(*names):
    for name in names:
        for folder in (name, f"OpenGVLab--{name}"):  # a copy of its own, or where nanovl.load downloads it
            if (WEIGHTS / folder / "config.json").exists():
                return WEIGHTS / folder
    pytest.skip(f"no real checkpoint {names[0]} under {WEIGHTS} (set NANOVL_WEIGHTS)")


@pytest.mark.parametrize("case", ["cat", "dog"])
def test_internvl3_5_vision_tokens(case):
    """ViT + pixel shuffle + mlp1 of InternVL3.5-1B vs the reference's extract_feature (fp32, CPU)."""
    path = checkpoint("InternVL3_5-1B-Instruct", "InternVL3_5-1B")
    if not REF.exists():
        pytest.skip("../shared/assets is absent")
    d = REF / "internvl3_5_1b_vit_projector"
    pixel_values = torch.from_numpy(np.fromfile(d / f"{case}_pixel_values_fp32.bin", np.float32)).view(1, 3, 448, 448)
    expected = torch.from_numpy(np.fromfile(d / f"{case}_visual_tokens_fp32.bin", np.float32)).view(1, 256, 1024)
    model = nanovl.load(path, dtype=torch.float32)
    with torch.no_grad():
        ours = model.extract_feature(pixel_values)
    cos = torch.nn.functional.cosine_similarity(ours.flatten(), expected.flatten(), dim=0).item()
    diff = (ours - expected).abs()
    print(f"{case}: cosine {cos:.7f}, max |diff| {diff.max():.2e}, mean |diff| {diff.mean():.2e}")
    assert cos > 0.9999 and diff.mean() < 1e-3


HF_CASES = {"InternVL3-1B-hf": 0.1, "InternVL2_5-2B-MPO-hf": 0.1}  # atol of transformers' own test is 0.1 / 1e-3 (fp16 CUDA)


@pytest.mark.parametrize("name", list(HF_CASES))
def test_hf_integration_expectations(name):
    """transformers' published greedy text and last-position logits for the -hf checkpoints (single 448 tile)."""
    path = checkpoint(name)
    if not REF.exists():
        pytest.skip("../shared/assets is absent")
    exp = json.loads((REF / "hf_transformers_integration_expectations.json").read_text())[f"OpenGVLab/{name}"]
    model = nanovl.load(path, dtype=torch.float32)
    pixel_values = nanovl.load_image(ASSETS / "media/coco/000000039769.png", max_num=1)
    image = "<img>" + "<IMG_CONTEXT>" * model.config.num_image_token + "</img>"
    ids = torch.tensor([model.tokenizer.encode(exp["prompt"].replace("<IMG_CONTEXT>", image))])
    with torch.no_grad():
        logits = model(ids, pixel_values=pixel_values)[0, -1, :5]
    expected = torch.tensor(exp["logits_last_position_first5_fp16"]["cuda_8"])
    print(f"{name}: last-position logits {logits.tolist()} vs {expected.tolist()}")
    assert torch.allclose(logits, expected, atol=HF_CASES[name])
    new = model.generate(ids, pixel_values=pixel_values, max_new_tokens=20)
    assert model.tokenizer.decode(new[0].tolist()) == exp["generate_max_new_tokens_20_greedy"]


def test_original_and_hf_layouts_agree():
    """The same model published twice (original remote-code layout and -hf) gives the same logits in nanovl."""
    original, hf = checkpoint("InternVL3-1B"), checkpoint("InternVL3-1B-hf")
    pixel_values = nanovl.load_image(ASSETS / "media/internvl_examples/image1.jpg", max_num=2) if ASSETS.exists() \
        else torch.randn(3, 3, 448, 448)
    logits = []
    for path in (original, hf):
        model = nanovl.load(path, dtype=torch.float32)
        prompt = "<img>" + "<IMG_CONTEXT>" * 256 * len(pixel_values) + "</img>\nDescribe the image."
        with torch.no_grad():
            logits.append(model(torch.tensor([model.tokenizer.encode(prompt)]), pixel_values=pixel_values))
    assert torch.allclose(*logits, atol=1e-4)
