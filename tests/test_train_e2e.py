"""Fine-tuning end to end on a tiny checkpoint: the command line learns a handful of image questions (the loss falls
to near zero and `python -m nanovl.generate` answers with the trained answers), LoRA merged equals the adapters
loaded onto their base, and a resumed run equals an uninterrupted one."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import fixtures as fx

ROOT = Path(__file__).resolve().parents[1]
if not fx.TOKENIZERS.is_dir():
    pytest.skip("shared assets not available", allow_module_level=True)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tiny Qwen2 checkpoint with the InternVL2.5 tokenizer, and one question per solid-colour image."""
    d = tmp_path_factory.mktemp("colours")
    fx.write_checkpoint(d / "ckpt", "qwen2", "300m", seed=1, tokenizer_dir="InternVL2_5-1B-MPO", max_dynamic_patch=1)
    (d / "images").mkdir()
    lines = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (64, 48), rgb).save(d / "images" / f"{name}.png")
        lines.append({"image": f"{name}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": f"It is {name}."}]})
    (d / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return d


def run(*args, module="nanovl.train"):
    r = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_command_line_fine_tune_learns_the_answers(task):
    out = task / "full"
    run("--model", task / "ckpt", "--data", task / "train.jsonl", "--root", task / "images", "--output", out,
        "--max-steps", 40, "--learning-rate", 5e-3, "--per-device-batch-size", 4, "--dtype", "fp32",
        "--warmup-ratio", 0, "--no-freeze-backbone", "--drop-path-rate", 0, "--max-dynamic-patch", 1)
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, 41)) and set(m[0]) >= {"step", "loss", "lr", "grad_norm",
                                                                           "tokens", "seconds"}
    assert m[0]["loss"] > 8 and m[-1]["loss"] < 0.05, [round(r["loss"], 3) for r in m]
    assert (out / "loss.svg").read_text().startswith("<svg") and (out / "config.json").exists()
    for name in COLOURS:
        r = run("--model", out, "--image", task / "images" / f"{name}.png", "--prompt", "What colour is this?",
                "--max-tokens", 8, "--no-stream", module="nanovl.generate")
        assert r.stdout.strip() == f"It is {name}.", r.stdout


def test_lora_merged_equals_adapters_on_their_base(task):
    """--use-llm-lora: the default output is the merged model; --save-lora-adapters writes the adapters alone, which
    nanovl.load(base, adapters=...) merges into the same weights."""
    import nanovl
    from nanovl.train import TrainArgs, finetune

    common = dict(model=str(task / "ckpt"), data=str(task / "train.jsonl"), root=str(task / "images"), max_steps=3,
                  learning_rate=1e-2, per_device_batch_size=2, dtype="fp32", use_llm_lora=4, quiet=True,
                  max_dynamic_patch=1)
    merged = finetune(TrainArgs(output=str(task / "lora-merged"), **common))
    adapters = finetune(TrainArgs(output=str(task / "lora-adapters"), save_lora_adapters=True, **common))
    assert not list(adapters.glob("*.safetensors")) == [] and (adapters / "adapter_config.json").exists()
    a = nanovl.load(merged)
    b = nanovl.load(task / "ckpt", adapters=adapters)
    base = nanovl.load(task / "ckpt")
    sa, sb, s0 = a.state_dict(), b.state_dict(), base.state_dict()
    changed = [k for k in sa if not torch.equal(sa[k], s0[k])]
    assert changed and all(k.startswith("language_model.model.layers.") for k in changed)  # only LoRA targets
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-7)
    assert fx.read_config(merged)["use_llm_lora"] == 0


def test_resume_equals_an_uninterrupted_run(task):
    """checkpoint-2 of a 4-step run (drop path and LoRA dropout on: the RNG state is part of the checkpoint),
    resumed in another directory: steps 3-4 give the same losses and the same final weights."""
    import nanovl
    from nanovl.train import TrainArgs, finetune

    common = dict(model=str(task / "ckpt"), data=str(task / "train.jsonl"), root=str(task / "images"), max_steps=4,
                  learning_rate=5e-3, per_device_batch_size=1, gradient_accumulation_steps=2, dtype="fp32",
                  freeze_backbone=False, drop_path_rate=0.3, use_llm_lora=4, lora_dropout=0.2, save_steps=2,
                  quiet=True, max_dynamic_patch=1)
    full = finetune(TrainArgs(output=str(task / "run"), **common))
    assert (full / "checkpoint-2" / "training_state.pt").exists()
    resumed = finetune(TrainArgs(output=str(task / "resumed"), resume=str(full / "checkpoint-2"), **common))
    a, b = metrics(full), metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert (x["loss"], x["grad_norm"], x["lr"]) == (y["loss"], y["grad_norm"], y["lr"]), (x, y)
    sa, sb = nanovl.load(full).state_dict(), nanovl.load(resumed).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ckpt = nanovl.load(full / "checkpoint-2")  # an intermediate checkpoint is a usable model too
    assert ckpt.tokenizer is not None
