"""Packed sequences and several processes: the original PackedDataset's buffer rules on hand-made samples, each packed
sample's logits equal to its unpacked logits, the packed loss equal to the per-sample weighted loss, a packed run
equal to the unpacked run, and 2 processes (FSDP2 on gloo) equal to 1 process with twice the batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fixtures as fx
from nanovl.train import compute_loss
from nanovl.train.data import collate
from nanovl.train.packing import Packer, packed_collate

ROOT = Path(__file__).resolve().parents[1]
START, END, CTX = fx.IMG_START_ID, fx.IMG_END_ID, fx.IMG_CONTEXT_ID
N = 4  # <IMG_CONTEXT> per tile in these samples


class Ids:
    def token_to_id(self, t):
        return {"<img>": START, "</img>": END, "<IMG_CONTEXT>": CTX}[t]


def sample(text: int, tiles: list, tail: int = 3, seed: int = 0, learn: int = 2) -> dict:
    """text tokens, one <img> block per entry of `tiles` (N <IMG_CONTEXT> a tile), `tail` text tokens; the last
    `learn` tokens are learned. Tokens >= 100 so that they are never image tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(100, 500, (text,), generator=g)]
    for t in tiles:
        ids += [torch.tensor([START]), torch.full((N * t,), CTX), torch.tensor([END])]
    ids = torch.cat(ids + [torch.randint(100, 500, (tail,), generator=g)])
    labels = torch.full_like(ids, -100)
    labels[-learn:] = ids[-learn:]
    n_tiles = max(sum(tiles), 1)
    return dict(input_ids=ids, labels=labels, position_ids=torch.arange(len(ids)),
                pixel_values=torch.full((n_tiles, 3, 2, 2), float(seed)),
                image_flags=torch.full((n_tiles,), int(bool(tiles))))


def test_buffers_fill_to_the_tile_count_and_token_limit():
    """find_buffer: a sample joins the first buffer (most tiles first) with room for its tiles and tokens; a buffer
    is a row when it reaches exactly num_images_expected tiles or max_packed_tokens tokens; flush() at the end."""
    p = Packer(Ids(), N, max_packed_tokens=100, num_images_expected=4, max_buffer_size=20, strict_mode=False)
    a, b, c = sample(3, [1], seed=1), sample(3, [2], seed=2), sample(3, [1], seed=3)  # 12, 16, 12 tokens
    assert p.add(a) == [] and p.add(b) == []
    rows = p.add(c)  # a + b have 3 tiles, c's 1 more makes 4: a row
    assert len(rows) == 1 and len(rows[0]["pixel_values"]) == 4
    row = rows[0]
    assert torch.equal(row["input_ids"], torch.cat([a["input_ids"], b["input_ids"], c["input_ids"]]))
    assert row["segment_ids"].tolist() == [0] * 12 + [1] * 16 + [2] * 12
    assert row["position_ids"].tolist() == list(range(12)) + list(range(16)) + list(range(12))
    assert row["pixel_values"][:, 0, 0, 0].tolist() == [1, 2, 2, 3]
    d = sample(90, [], seed=4)  # pure text: one dummy tile, 93 tokens
    assert p.add(d) == [] and p.add(sample(3, [1], seed=5)) == []  # no buffer has room for 93 + 12 tokens
    assert [len(r["input_ids"]) for r in p.flush()] == [93, 12]


def test_over_long_buffers_are_cut_outside_image_blocks():
    """split_buffer: a buffer over max_packed_tokens is cut at the limit, or before the <img> block that straddles it,
    whose tokens and tiles go to the next piece; the text between is dropped; a piece without tiles, or with no more
    than 1/256 learned tokens, is dropped."""
    p = Packer(Ids(), N, max_packed_tokens=20, num_images_expected=10, max_buffer_size=20, strict_mode=False)
    s = sample(5, [2, 1], tail=4, learn=4)  # 5 text | <img> 8 ctx </img> (5..14) | <img> 4 ctx </img> (15..20) | 4
    assert [len(r["input_ids"]) for r in p.add(s) + p.flush()] == [10]  # the first piece learns nothing: dropped
    s["labels"][1:3] = s["input_ids"][1:3]
    rows = p.add(s) + p.flush()
    assert [len(r["input_ids"]) for r in rows] == [15, 10]  # cut before the second block (tokens 15..)
    first, second = rows
    assert torch.equal(first["input_ids"], s["input_ids"][:15]) and len(first["pixel_values"]) == 2
    assert torch.equal(second["input_ids"], s["input_ids"][15:]) and len(second["pixel_values"]) == 1
    assert int(second["input_ids"][0]) == START and second["position_ids"][0] == 15  # the sample's own positions


def test_strict_mode_pads_tiles_and_tokens():
    """strict_mode: rows carry exactly num_images_expected tiles (black, image_flags 0) and are padded to
    max_packed_tokens as one more, unlearned segment."""
    p = Packer(Ids(), N, max_packed_tokens=40, num_images_expected=3, strict_mode=True)
    p.add(sample(3, [1], seed=1))
    (row,) = p.flush()
    assert row["image_flags"].tolist() == [1, 0, 0] and (row["pixel_values"][1:] == 0).all()
    batch = packed_collate([row], 40)
    assert batch["input_ids"].shape == (1, 40) and batch["segment_ids"][0, -1] == 1
    assert (batch["labels"][0, 12:] == -100).all() and batch["attention_mask"][0].sum() == 12


@pytest.mark.parametrize("reduction", ["token", "square"])
def test_packed_logits_and_loss_equal_the_unpacked(make_ckpt, reduction):
    """One packed row of 3 samples: each sample's logits equal its own unpacked logits (fp32), and the packed loss
    equals the loss of the same samples in a padded batch (weights per packed sample)."""
    import nanovl

    path, sd, cfg = make_ckpt("qwen2", "300m")
    model = nanovl.load(path)
    model.img_context_token_id = CTX
    items = []
    for k, (tiles, text) in enumerate([(2, 5), (1, 9), (3, 4)]):
        ids = torch.cat([fx.random_ids(1, text, 512, seed=k)[0], torch.tensor([START]),
                         torch.full((tiles * model.config.num_image_token,), CTX), torch.tensor([END]),
                         fx.random_ids(1, 6 + k, 512, seed=10 + k)[0]])
        labels = ids.clone()
        labels[:text + 1 + tiles * model.config.num_image_token + 1] = -100
        items.append(dict(input_ids=ids, labels=labels, position_ids=torch.arange(len(ids)),
                          pixel_values=fx.random_pixel_values(tiles, seed=k), image_flags=torch.ones(tiles)))
    packer = Packer(Ids(), model.config.num_image_token, 1000, 100, strict_mode=False)
    for it in items:
        assert packer.add(it) == []
    (row,) = packer.flush()
    packed = packed_collate([row])
    with torch.no_grad():
        logits = model(packed["input_ids"], pixel_values=packed["pixel_values"], position_ids=packed["position_ids"],
                       segment_ids=packed["segment_ids"])[0]
        at = 0
        for k, it in enumerate(items):
            alone = model(it["input_ids"][None], pixel_values=it["pixel_values"])[0]
            fx.check_close(logits[at:at + len(alone)], alone, f"packed sample {k} logits vs unpacked", rtol=1e-5,
                           atol=1e-5)
            at += len(alone)
        fx.check_close(compute_loss(model, packed, reduction), compute_loss(model, collate(items), reduction),
                       f"packed loss vs padded batch ({reduction})", rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """4 samples of exactly the same length and one tile each (so packing 2 a row makes the batches of 2)."""
    from PIL import Image

    if not fx.TOKENIZERS.is_dir():
        pytest.skip("shared assets not available")
    d = tmp_path_factory.mktemp("packing")
    fx.write_checkpoint(d / "ckpt", "qwen2", "300m", seed=1, tokenizer_dir="InternVL2_5-1B-MPO", max_dynamic_patch=1)
    (d / "images").mkdir()
    lines = []
    for name, rgb in {"red": (220, 30, 30), "blue": (30, 40, 220), "pink": (230, 120, 200), "gray": (99, 99, 99)}.items():
        Image.new("RGB", (64, 48), rgb).save(d / "images" / f"{name}.png")
        lines.append({"image": f"{name}.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                                {"from": "gpt", "value": f"It is {name}."}]})
    (d / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return d


def _args(d, **kw):
    return {**dict(model=str(d / "ckpt"), data=str(d / "train.jsonl"), root=str(d / "images"), max_steps=3,
                   learning_rate=1e-3, dtype="fp32", freeze_backbone=False, drop_path_rate=0.0, warmup_ratio=0.0,
                   quiet=True, max_dynamic_patch=1, seed=3), **kw}


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("reduction", ["token", "square"])
def test_packed_run_equals_the_unpacked_run(colours, reduction):
    """--use-packed-ds with rows of 2 same-length samples trains on exactly the batches of 2: the same losses."""
    from nanovl.train import TrainArgs, finetune

    with torch.no_grad():
        from nanovl.tokenizer import Tokenizer
        from nanovl.train import SupervisedDataset
        ds = SupervisedDataset({"d": {"root": str(colours / "images"), "annotation": str(colours / "train.jsonl")}},
                               Tokenizer(colours / "ckpt"), max_dynamic_patch=1, num_image_token=4)
        lengths = {len(ds[i]["input_ids"]) for i in range(len(ds))}
    assert len(lengths) == 1, "the samples must have one length"
    padded = finetune(TrainArgs(output=str(colours / f"padded-{reduction}"), per_device_batch_size=2,
                                loss_reduction=reduction, **_args(colours)))
    packed = finetune(TrainArgs(output=str(colours / f"packed-{reduction}"), use_packed_ds=True,
                                max_packed_tokens=2 * lengths.pop(), num_images_expected=2, strict_mode=False,
                                loss_reduction=reduction, **_args(colours)))
    for a, b in zip(_metrics(padded), _metrics(packed)):
        assert a["learned_tokens"] == b["learned_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6), (a, b)


def _torchrun(d, out, **kw):
    flags = []
    for k, v in _args(d, **kw).items():
        flags += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)]) if v is not False else \
            [f"--no-{k.replace('_', '-')}"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "nanovl.train",
                        "--output", str(out), *flags], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    return out


@pytest.mark.parametrize("lora", [False, True])
def test_two_processes_equal_one_with_twice_the_batch(colours, lora):
    """torchrun --nproc-per-node 2 (FSDP2, gloo) with batch 1 each == 1 process with batch 2, fp32,
    --loss-reduction-all-gather (the global weighted mean): every step's loss within 1e-6 and gradient norm within
    1e-5 (relative); the final weights' difference under 2% of what training changed in each tensor (AdamW
    divides by the root of the second moment, so a near-zero gradient's rounding moves a weight by up to the
    learning rate). The 2-process checkpoint-2 resumes in 1 process to the same step 3."""
    import nanovl
    from nanovl.train import TrainArgs, finetune

    kw = dict(loss_reduction_all_gather=True, save_steps=2, **({"use_llm_lora": 4, "lora_dropout": 0.0,
                                                                 "learning_rate": 1e-2} if lora else {}))
    args = _args(colours, **kw)
    kw = {k: v for k, v in args.items() if k not in ("model", "data", "root")}
    one = finetune(TrainArgs(output=str(colours / f"one-{lora}"), per_device_batch_size=2, **args))
    two = _torchrun(colours, colours / f"two-{lora}", per_device_batch_size=1, **kw)
    for a, b in zip(_metrics(one), _metrics(two)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["tokens"] == b["tokens"], (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), (a, b)
    s0, sa, sb = (nanovl.load(p).state_dict() for p in (colours / "ckpt", one, two))
    changed = [k for k in sa if not torch.equal(sa[k], s0[k])]
    assert changed and all((sa[k] - sb[k]).norm() < 0.02 * (sa[k] - s0[k]).norm() for k in changed)
    again = finetune(TrainArgs(output=str(colours / f"resumed-{lora}"), per_device_batch_size=2,
                               resume=str(two / "checkpoint-2"), **args))
    assert _metrics(again)[-1]["loss"] == pytest.approx(_metrics(one)[-1]["loss"], rel=1e-6)
