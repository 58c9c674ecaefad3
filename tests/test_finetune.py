"""Fine-tuning against independent references: the loss and gradients of transformers' InternVLForConditionalGeneration
(test-only) on the -hf copy of the same tiny weights, LoRA against peft on that model, the loss weights and the
learning-rate schedule against their formulas and transformers' scheduler, and the freezing switches against the
original's rules (training.md section 4.1)."""
import math

import pytest
import torch

import fixtures as fx
from nanovl.train import add_lora, compute_loss, lora_state_dict, merge_lora, token_weights
from nanovl.train.data import collate

TOL = dict(rtol=2e-5, atol=2e-6)


def _load(path):
    import nanovl

    m = nanovl.load(path, dtype=torch.float32)
    m.img_context_token_id = fx.IMG_CONTEXT_ID
    return m


def _batch(cfg, seed=0):
    """Two image samples of different lengths, right-padded: text, <img> 256*tiles <IMG_CONTEXT> </img>, text;
    the first 5 and the image tokens are not learned."""
    items = []
    for k, (tiles, extra) in enumerate([(2, 6), (1, 11)]):
        ids = torch.cat([fx.image_prompt(tiles, cfg, seed=seed + k)[0],
                         fx.random_ids(1, extra, cfg["llm_config"]["vocab_size"], seed=seed + k)[0]])
        labels = ids.clone()
        labels[:5] = -100
        labels[ids == fx.IMG_CONTEXT_ID] = -100
        items.append(dict(input_ids=ids, labels=labels, position_ids=torch.arange(len(ids)),
                          pixel_values=fx.random_pixel_values(tiles, seed=seed + k), image_flags=torch.ones(tiles)))
    return collate(items)


@pytest.mark.parametrize("llm", ["qwen2", "internlm2", "qwen3", "phi3", "llama"])
def test_loss_and_gradients_match_transformers(make_ckpt, llm):
    """Token-mean next-token loss and every gradient (frozen ViT, as the 2nd-finetune recipe) equal transformers'
    on the same weights; nanovl's gradients read under the original names, converted by the fixtures."""
    path, sd, cfg = make_ckpt(llm, "300m")
    model = _load(path)
    model.vision_model.requires_grad_(False)
    model.train()
    batch = _batch(cfg)
    loss = compute_loss(model, batch, "token")
    loss.backward()
    ref = fx.hf_internvl(sd, cfg)
    ref.model.vision_tower.requires_grad_(False)
    ref.train()
    out = ref(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
              labels=batch["labels"])
    fx.check_close(loss, out.loss, f"{llm}: training loss vs transformers", **TOL)
    out.loss.backward()
    ours = model.original_state_dict(grads=True)
    assert all(ours[k] is None for k in ours if k.startswith("vision_model."))
    _, mapped = fx.to_hf_internvl({k: (torch.zeros_like(sd[k]) if g is None else g) for k, g in ours.items()}, cfg)
    theirs = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert theirs.keys() <= mapped.keys() and len(theirs) > 10
    worst = max(theirs, key=lambda n: (mapped[n] - theirs[n]).abs().max() / (theirs[n].abs().max() + 1e-12))
    fx.check_close(mapped[worst], theirs[worst], f"{llm}: gradient vs transformers (worst: {worst})", **TOL)
    for n in theirs:
        torch.testing.assert_close(mapped[n], theirs[n], **TOL, msg=lambda m: f"{n}: {m}")


LORA_TARGETS = {"qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}  # the original's targets (4.1)


@pytest.mark.parametrize("llm", list(LORA_TARGETS))
def test_lora_matches_peft(make_ckpt, llm):
    """LLM LoRA r=4 (alpha 2r) on the original's target modules: the same loss, the same A/B gradients under the
    original's peft names, and the same merged weights as peft on transformers' model."""
    from peft import LoraConfig, inject_adapter_in_model

    path, sd, cfg = make_ckpt(llm, "300m", seed=5)
    model = _load(path)
    model.vision_model.requires_grad_(False)
    add_lora(model, "llm", 4, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # B = 0 at init: make the test non-trivial
    ref = fx.hf_internvl(sd, cfg)
    ref.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[llm]),
                            ref.model.language_model)
    ours = lora_state_dict(model)
    peft_params = {n: p for n, p in ref.model.language_model.named_parameters() if "lora_" in n}
    name = lambda n: f"language_model.base_model.model.model.{n}"  # noqa: E731  (the original's key for it)
    assert {name(n) for n in peft_params} == set(ours), "not the original's LoRA modules"
    with torch.no_grad():
        for n, p in peft_params.items():
            p.copy_(ours[name(n)])
            p.requires_grad_(True)
    model.train()
    ref.train()
    batch = _batch(cfg, seed=3)
    loss = compute_loss(model, batch, "token")
    loss.backward()
    out = ref(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
              labels=batch["labels"])
    out.loss.backward()
    fx.check_close(loss, out.loss, f"{llm}: LoRA loss vs peft", **TOL)
    grads = lora_state_dict(model, grads=True)
    for n, p in peft_params.items():
        torch.testing.assert_close(grads[name(n)], p.grad, **TOL, msg=lambda m: f"{n}: {m}")
    fx.check_close(grads[name(next(iter(peft_params)))], next(iter(peft_params.values())).grad,
                   f"{llm}: LoRA A gradient vs peft", **TOL)
    with torch.no_grad():
        for module in ref.model.language_model.modules():
            if hasattr(module, "merge") and hasattr(module, "lora_A"):
                module.merge()
        merge_lora(model)
        _, merged = fx.to_hf_internvl(model.original_state_dict(), cfg)
    for n, p in ref.named_parameters():
        key = n.replace(".base_layer.", ".")
        if "lora_" not in n:
            torch.testing.assert_close(merged[key], p, rtol=1e-6, atol=1e-6, msg=lambda m: f"merged {n}: {m}")


def test_lora_internlm2_wqkv_and_merge(make_ckpt, tmp_path):
    """InternLM2: one LoRA pair on the grouped wqkv (the original's target), its B regrouped under the original's
    name. The adapters written in the original's unmerged layout load back merged to the same logits, and LoRA
    merged and unmerged give the same logits."""
    import nanovl
    from safetensors.torch import save_file

    path, sd, cfg = make_ckpt("internlm2", "300m", seed=6)
    model = _load(path)
    add_lora(model, "llm", 4, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    adapters = lora_state_dict(model)
    keys = {k.split("layers.0.")[1] for k in adapters if "layers.0." in k}
    assert keys == {f"{m}.lora_{ab}.default.weight" for m in ("attention.wqkv", "attention.wo", "feed_forward.w1",
                                                               "feed_forward.w2", "feed_forward.w3") for ab in "AB"}
    assert adapters["language_model.base_model.model.model.layers.0.attention.wqkv.lora_B.default.weight"].shape == \
        (sd["language_model.model.layers.0.attention.wqkv.weight"].shape[0], 4)
    ids, pv = fx.image_prompt(1, cfg, seed=2), fx.random_pixel_values(1, seed=2)
    model.eval()
    with torch.no_grad():
        lora_logits = model(ids, pixel_values=pv)
    # the original's unmerged checkpoint: targeted weights as .base_layer, the rest under base_model.model
    peft = {}
    for k, v in sd.items():
        if k.startswith("language_model."):
            k = k.replace("language_model.", "language_model.base_model.model.", 1)
            if any(f".{t}.weight" in k for t in ("wqkv", "wo", "w1", "w2", "w3")):
                k = k.replace(".weight", ".base_layer.weight")
        peft[k] = v
    peft.update(adapters)
    unmerged = tmp_path / "unmerged"
    unmerged.mkdir()
    save_file({k: v.contiguous() for k, v in peft.items()}, str(unmerged / "model.safetensors"))
    c = dict(cfg, use_llm_lora=4)
    fx.write_config(c, unmerged)
    loaded = nanovl.load(unmerged)
    loaded.img_context_token_id = fx.IMG_CONTEXT_ID
    merge_lora(model)
    with torch.no_grad():
        fx.check_close(loaded(ids, pixel_values=pv), lora_logits, "InternLM2 LoRA: original unmerged layout, "
                       "merged at load vs LoRA model", rtol=1e-5, atol=1e-5)
        fx.check_close(model(ids, pixel_values=pv), lora_logits, "InternLM2 LoRA: merged vs unmerged logits",
                       rtol=1e-5, atol=1e-5)


def test_unmerged_original_lora_checkpoint_is_merged_at_load(make_ckpt, tmp_path):
    """A checkpoint in the original code's unmerged LoRA layout (peft names, use_llm_lora in config.json) loads with
    W + 2 B A (alpha = 2r), computed here in the original layout without nanovl, for every adapted weight."""
    import nanovl
    from safetensors.torch import save_file

    path, sd, cfg = make_ckpt("qwen2", "300m", seed=9)
    g = torch.Generator().manual_seed(2)
    peft, expected = {}, dict(sd)
    for k, v in sd.items():
        if k.startswith("language_model."):
            k2 = k.replace("language_model.", "language_model.base_model.model.", 1)
            if k.endswith("_proj.weight"):
                A, B = torch.randn(8, v.shape[1], generator=g) * 0.1, torch.randn(v.shape[0], 8, generator=g) * 0.1
                base = k2.removesuffix(".weight")
                peft.update({f"{base}.base_layer.weight": v, f"{base}.lora_A.default.weight": A,
                             f"{base}.lora_B.default.weight": B})
                expected[k] = v + 2.0 * B @ A
                continue
            if k.endswith("_proj.bias"):
                k2 = k2.replace(".bias", ".base_layer.bias")
            peft[k2] = v
        elif k.startswith("vision_model.") and ".attn.qkv." in k:  # backbone LoRA too
            k2 = k.replace("vision_model.", "vision_model.base_model.model.", 1).replace(".qkv.", ".qkv.base_layer.")
            peft[k2] = v
            if k.endswith(".weight"):
                A, B = torch.randn(8, v.shape[1], generator=g) * 0.1, torch.randn(v.shape[0], 8, generator=g) * 0.1
                base = k.replace("vision_model.", "vision_model.base_model.model.", 1).removesuffix(".weight")
                peft.update({f"{base}.lora_A.default.weight": A, f"{base}.lora_B.default.weight": B})
                expected[k] = v + 2.0 * B @ A
        else:
            peft[k.replace("vision_model.", "vision_model.base_model.model.", 1) if k.startswith("vision_model.")
                 else k] = v
    save_file({k: v.contiguous() for k, v in peft.items()}, str(tmp_path / "model.safetensors"))
    fx.write_config(dict(cfg, use_llm_lora=8, use_backbone_lora=8), tmp_path)
    got = nanovl.load(tmp_path).original_state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------
# loss weights, schedule, optimizer


def test_loss_reductions_by_hand():
    """token: every learned token 1; sample: 1/x; square: 1/sqrt(x), x = learned tokens of the sample (a row, or a
    packed segment); 0 where the label is -100."""
    labels = torch.tensor([[-100, 5, 6, 7, -100], [-100, -100, 8, -100, -100]])
    for red, f in (("token", lambda x: 1.0), ("sample", lambda x: 1 / x), ("square", lambda x: x ** -0.5)):
        w = token_weights(labels, red)
        assert w.flatten().tolist() == pytest.approx([0, f(3), f(3), f(3), 0, 0, 0, f(1), 0, 0])
    seg = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]])  # row 0 packs a 3-token and a 2-token sample
    labels = torch.tensor([[-100, 5, 6, -100, 7], [-100, -100, 8, -100, -100]])
    assert token_weights(labels, "square", seg).flatten().tolist() == pytest.approx([0, 2 ** -0.5, 2 ** -0.5, 0, 1,
                                                                                     0, 0, 1, 0, 0])


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_weighted_loss_equals_per_sample_formula(make_ckpt, reduction):
    """compute_loss = sum_i w_i sum_t CE_it / sum_i w_i x_i with w_i = f(x_i): the per-sample losses of
    transformers' model combined by the formula of the InternVL2.5 report (section 3.4)."""
    path, sd, cfg = make_ckpt("qwen2", "300m")
    model = _load(path)
    batch = _batch(cfg, seed=7)
    with torch.no_grad():
        ours = compute_loss(model, batch, reduction)
        ref = fx.hf_internvl(sd, cfg)
        logits = ref(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                     attention_mask=batch["attention_mask"]).logits
    num = den = 0.0
    for b in range(2):
        lab = batch["labels"][b, 1:]
        ce = torch.nn.functional.cross_entropy(logits[b, :-1], lab, ignore_index=-100, reduction="sum")
        x = int((lab != -100).sum())
        w = {"token": 1.0, "sample": 1 / x, "square": x ** -0.5}[reduction]
        num, den = num + w * ce, den + w * x
    fx.check_close(ours, num / den, f"loss_reduction={reduction} vs per-sample formula", **TOL)


def test_schedule_matches_transformers():
    """Linear warmup then cosine to 0: transformers' get_cosine_schedule_with_warmup, step by step."""
    from transformers import get_cosine_schedule_with_warmup

    from nanovl.train.trainer import cosine_with_warmup

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, 3, 20)
    for step in range(20):
        assert cosine_with_warmup(step, 3, 20) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()


def test_master_weights_in_bf16(monkeypatch):
    """bf16 training: AdamW on fp32 masters; gradients of several micro-batches accumulate in fp32 (accumulate()
    before each backward), a single micro-batch's bf16 gradients are used as they are, the update runs a chunk of
    parameters at a time, and the bf16 parameter is the rounded master. Equal to torch's AdamW and
    clip_grad_norm_ on fp32 copies fed the same gradients."""
    from nanovl.train.trainer import MasterAdamW

    monkeypatch.setattr(MasterAdamW, "CHUNK", 40)  # groups of parameters [0, 1], [2] (alone and last: bigger than a
    # chunk)
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(*shape).to(torch.bfloat16)) for shape in ((6, 5), (9,), (7, 8))]
    refs = [torch.nn.Parameter(p.detach().float().clone()) for p in ps]
    opt = MasterAdamW([(f"w{i}", p) for i, p in enumerate(ps)], lr=0.1, weight_decay=0.05)
    ref_opt = torch.optim.AdamW(refs, lr=0.1, weight_decay=0.05)
    assert list(opt.chunks([0, 1, 2])) == [[0, 1], [2]] and list(opt.chunks([2, 0, 1])) == [[0, 1], [2]]
    for micro_batches in (2, 1, 3, 1):
        gs = [[torch.randn(p.shape).to(torch.bfloat16) * 3 for p in ps] for _ in range(micro_batches)]
        for g in gs:
            opt.accumulate()
            for p, gi in zip(ps, g):  # what backward does: into .grad
                p.grad = gi.clone()
        assert micro_batches > 1 or all(m.grad is None for m in opt.masters)  # nothing copied to fp32 yet
        norm = opt.step(max_grad_norm=1.0)
        for j, r in enumerate(refs):
            r.grad = sum(g[j].float() for g in gs)
        assert norm == pytest.approx(float(torch.nn.utils.clip_grad_norm_(refs, 1.0)), rel=1e-6)
        ref_opt.step()
        for p, m, r in zip(ps, opt.masters, refs):
            torch.testing.assert_close(m.detach(), r.detach(), rtol=1e-6, atol=1e-7)
            assert torch.equal(p.detach(), m.detach().to(torch.bfloat16)) and p.grad is None and m.grad is None


# ---------------------------------------------------------------------------------------------
# what trains


def _trainable(make_ckpt, **flags):
    from nanovl.train.trainer import TrainArgs, configure

    path, _, _ = make_ckpt("qwen2", "300m")
    model = _load(path)
    args = TrainArgs(model="", output="", **{"freeze_backbone": False, **flags})
    configure(model, args)
    return {n for n, p in model.named_parameters() if p.requires_grad}, model


def test_freezing_switches_as_the_original(make_ckpt):
    """training.md 4.1: freeze_backbone / freeze_llm / freeze_mlp freeze their part; LLM LoRA freezes the whole
    decoder but its adapters (and, unless --no-freeze-mlp, mlp1, as the LoRA recipe); unfreeze_vit_layers=-1 trains
    the last ViT layer (also under a frozen backbone); unfreeze_lm_head trains the head (a no-op in the original)."""
    everything, model = _trainable(make_ckpt)
    parts = lambda names, p: {n for n in names if n.startswith(p)}  # noqa: E731
    assert everything == {n for n, _ in model.named_parameters()}
    got, _ = _trainable(make_ckpt, freeze_backbone=True)
    assert got == everything - parts(everything, "vision_model.")
    got, _ = _trainable(make_ckpt, freeze_llm=True, freeze_mlp=True)
    assert got == parts(everything, "vision_model.")
    got, _ = _trainable(make_ckpt, freeze_backbone=True, unfreeze_vit_layers=-1)
    assert parts(got, "vision_model.") == parts(everything, "vision_model.encoder.layers.1.")
    got, _ = _trainable(make_ckpt, freeze_backbone=True, use_llm_lora=4)  # the LoRA recipe: mlp1 frozen too
    assert got == {n for n in got if ".lora_" in n} and len(got) == 2 * 7 * 2  # 2 layers x 7 targets x (A, B)
    got, _ = _trainable(make_ckpt, freeze_backbone=True, use_llm_lora=4, freeze_mlp=False)
    assert parts(got, "mlp1.") == parts(everything, "mlp1.")
    got, _ = _trainable(make_ckpt, freeze_llm=True, unfreeze_lm_head=True)
    assert parts(got, "language_model.") == {"language_model.lm_head.weight"}
    got, _ = _trainable(make_ckpt, use_backbone_lora=4, freeze_llm=True, freeze_mlp=True)
    assert got == {n for n in got if ".lora_" in n} and all(n.startswith("vision_model.") for n in got)
    assert len(got) == 2 * 2 * 4  # 2 layers x (qkv, proj, fc1, fc2) x (A, B)
