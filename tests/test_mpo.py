"""MPO (preference training) against independent references: the formulas on fixed log-probabilities, TRL's
DPOTrainer.dpo_loss with its RunningMoments (test-only, trl 0.28: the last version with the running-mean shift of
bco_pair that the original uses), sequence log-probabilities against transformers' model, and end to end."""
import json
import math
import types

import pytest
import torch

import fixtures as fx
from nanovl.train import RunningMean, mpo_loss


def _trl():
    """trl 0.28's DPOTrainer, imported with transformers 5 (whose _is_package_available returns a tuple that trl
    0.28 reads as a bool): the availability checks of trl's own module are unwrapped, nothing else is touched."""
    import trl.import_utils as tiu

    if not getattr(tiu, "_nanovl_unwrapped", False):
        orig = tiu._is_package_available
        tiu._is_package_available = lambda *a, **k: (lambda r: r[0] if isinstance(r, tuple) else r)(orig(*a, **k))
        tiu._nanovl_unwrapped = True
    from trl import DPOTrainer
    from trl.trainer.utils import RunningMoments

    t = DPOTrainer.__new__(DPOTrainer)  # only dpo_loss is used: its attributes, as DPOConfig's defaults
    accelerator = types.SimpleNamespace(use_distributed=False, device=torch.device("cpu"), is_main_process=True)
    t.__dict__.update(beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl", reference_free=False,
                      f_divergence_params={}, accelerator=accelerator, running=RunningMoments(accelerator),
                      args=types.SimpleNamespace(use_weighting=False, discopop_tau=0.05))
    t.__dict__.update(loss_type=["sigmoid", "bco_pair"], use_weighting=False)
    return t


def test_mpo_loss_by_hand():
    """sigmoid = -log s(b(dc - dr)); bco_pair = -log s(b dc - d) - log s(-(b dr - d)); total 0.8/0.2/1.0."""
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-3.0, -10.0], [-5.0, -4.0], [-4.0, -9.0], [-4.5, -6.0]))
    total, parts = mpo_loss(pc, pr, rc, rr, torch.tensor(2.5), beta=0.1, delta=0.03)
    ls = lambda x: -math.log(1 / (1 + math.exp(-x)))  # noqa: E731  (-log sigmoid)
    dc, dr = [1.0, -1.0], [-0.5, 2.0]
    sig = sum(ls(0.1 * (c - r)) for c, r in zip(dc, dr)) / 2
    bco = sum(ls(0.1 * c - 0.03) + ls(-(0.1 * r - 0.03)) for c, r in zip(dc, dr)) / 2
    assert parts["sigmoid"].item() == pytest.approx(sig, rel=1e-6)
    assert parts["bco_pair"].item() == pytest.approx(bco, rel=1e-6)
    assert total.item() == pytest.approx(0.8 * sig + 0.2 * bco + 2.5, rel=1e-6)


def test_against_trl_dpo_loss_and_running_moments():
    """Five steps of 3 pairs: our sigmoid and bco_pair terms equal trl's dpo_loss, and the running mean delta equals
    its RunningMoments (updated with each step's mean of [beta*dc, beta*dr] before use)."""
    trl = _trl()
    running, g = RunningMean(), torch.Generator().manual_seed(0)
    for step in range(5):
        pc, pr, rc, rr = (torch.randn(3, generator=g) * 20 - 40 for _ in range(4))
        ref_sig, _, _ = trl.dpo_loss(pc, pr, rc, rr, loss_type="sigmoid")
        ref_bco, ch, rj = trl.dpo_loss(pc, pr, rc, rr, loss_type="bco_pair")
        delta = running.update(torch.cat([0.1 * (pc - rc), 0.1 * (pr - rr)]).mean())
        assert delta == pytest.approx(trl.running.mean, rel=1e-6, abs=1e-9) and step == 0 or delta != 0
        _, parts = mpo_loss(pc, pr, rc, rr, torch.tensor(0.0), beta=0.1, delta=delta)
        fx.check_close(parts["sigmoid"], ref_sig.mean(), f"MPO sigmoid vs trl (step {step})", rtol=1e-6, atol=1e-7)
        fx.check_close(parts["bco_pair"], ref_bco.mean(), f"MPO bco_pair vs trl (step {step})", rtol=1e-6,
                       atol=1e-7)
        assert running.mean == pytest.approx(trl.running.mean, rel=1e-6) and running.var == pytest.approx(
            trl.running.var, rel=1e-5)


def test_sequence_logps_match_transformers(make_ckpt):
    """log pi(answer) = the sum of the answer tokens' log-probabilities, with the images encoded once for the
    chosen and the rejected rows: against transformers' InternVLForConditionalGeneration on the same weights."""
    import nanovl
    from nanovl.train.mpo import collate_pairs, sequence_logps

    path, sd, cfg = make_ckpt("qwen2", "300m")
    model = nanovl.load(path)
    model.img_context_token_id = fx.IMG_CONTEXT_ID
    items = []
    for k, tiles in enumerate((2, 1)):
        prompt = fx.image_prompt(tiles, cfg, seed=k)[0]
        pv = fx.random_pixel_values(tiles, seed=k)
        pair = {}
        for name, n in (("chosen", 5 + k), ("rejected", 8)):
            ids = torch.cat([prompt, fx.random_ids(1, n, 512, seed=10 * k + n)[0]])
            labels = torch.full_like(ids, -100)
            labels[len(prompt):] = ids[len(prompt):]
            pair.update({f"{name}_input_ids": ids, f"{name}_labels": labels})
        items.append(dict(pair, pixel_values=pv, image_flags=torch.ones(tiles)))
    batch = collate_pairs(items)
    ref = fx.hf_internvl(sd, cfg)
    with torch.no_grad():
        ours, _ = sequence_logps(model, batch)
        pv = torch.cat([batch["pixel_values"], batch["pixel_values"]])  # transformers: the images twice
        logits = ref(input_ids=batch["input_ids"], pixel_values=pv, attention_mask=batch["attention_mask"]).logits
    lab = batch["labels"][:, 1:]
    lp = logits[:, :-1].float().log_softmax(-1).gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    fx.check_close(ours, (lp * (lab != -100)).sum(1), "MPO sequence log-probs vs transformers", rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from PIL import Image

    if not fx.TOKENIZERS.is_dir():
        pytest.skip("shared assets not available")
    d = tmp_path_factory.mktemp("mpo")
    fx.write_checkpoint(d / "ckpt", "qwen2", "300m", seed=2, tokenizer_dir="InternVL2_5-1B-MPO", max_dynamic_patch=1)
    (d / "images").mkdir()
    lines = []
    for name, rgb, wrong in (("red", (220, 30, 30), "blue"), ("blue", (30, 40, 220), "red"),
                             ("green", (30, 200, 40), "yellow")):
        Image.new("RGB", (64, 48), rgb).save(d / "images" / f"{name}.png")
        lines.append({"image": f"{name}.png", "question": "What colour is this?", "chosen": f"It is {name}.",
                      "rejected": f"It is {wrong}."})
    (d / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return d


def test_mpo_end_to_end(pairs):
    """python -m nanovl.train --mpo on 3 pairs: the reward margin of the chosen answers grows, the model then answers
    them in greedy generation; with LoRA the reference is the same model with its adapters off (no copy)."""
    import nanovl
    from nanovl.train import TrainArgs, finetune

    out = finetune(TrainArgs(model=str(pairs / "ckpt"), data=str(pairs / "pairs.jsonl"), root=str(pairs / "images"),
                             output=str(pairs / "out"), mpo=True, max_steps=20, learning_rate=1e-2, beta=0.1,
                             per_device_batch_size=3, dtype="fp32", warmup_ratio=0.0, drop_path_rate=0.0, quiet=True,
                             freeze_backbone=True))
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(m[0]) >= {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "delta",
                         "loss/sigmoid", "loss/bco_pair", "loss/sft"}
    assert abs(m[0]["rewards/margins"]) < 1e-5  # the policy starts as its reference
    assert m[-1]["rewards/margins"] > 1.0 and m[-1]["rewards/accuracies"] == 1.0
    model = nanovl.load(out)
    for name in ("red", "blue", "green"):
        pv = model.load_image(pairs / "images" / f"{name}.png")
        assert model.chat("What colour is this?", pv, max_new_tokens=8) == f"It is {name}."


def test_lora_reference_is_the_base_model(pairs, make_ckpt):
    """With LoRA, the reference log-probs are the base model's: the policy with its adapters switched off."""
    import nanovl
    from nanovl.train import PreferenceDataset, add_lora
    from nanovl.train.mpo import MPO, collate_pairs, sequence_logps

    model = nanovl.load(pairs / "ckpt")
    base = nanovl.load(pairs / "ckpt")
    add_lora(model, "llm", 4, dropout=0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    ds = PreferenceDataset({"d": {"root": str(pairs / "images"), "annotation": str(pairs / "pairs.jsonl")}},
                           model.tokenizer, max_dynamic_patch=1, num_image_token=model.config.num_image_token,
                           image_size=model.config.image_size)
    batch = collate_pairs([ds[0], ds[1]])
    objective = MPO(model, None)
    with torch.no_grad():
        ref = objective.reference_logps(batch)
        assert torch.equal(ref, sequence_logps(base, batch)[0])
        assert not torch.allclose(sequence_logps(model, batch)[0], ref)  # the adapters are back on
    assert objective.reference is None
