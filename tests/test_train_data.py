"""Training data: the meta JSON and JSONL formats (original and ms-swift), images, several images, video (file and
frame folder), augmentation, repeat_time, and every bad sample reported with file:line and its reason."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import fixtures as fx
from nanovl.preprocess import dynamic_preprocess, to_tensor
from nanovl.train import BadSample, SupervisedDataset, collate
from nanovl.train.data import frame_indices, jpeg_degrade

ASSETS = fx.ASSETS
VIDEO = ASSETS / "media" / "internvl_examples" / "red-panda.mp4"
if not fx.TOKENIZERS.is_dir():
    pytest.skip(f"shared assets not available: {ASSETS}", allow_module_level=True)
N_TOK = 4  # num_image_token in these tests: short prompts


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from nanovl.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("tok")
    fx.copy_tokenizer(fx.TOKENIZERS / "InternVL2_5-1B-MPO", d)
    return Tokenizer(d)


@pytest.fixture
def data(tmp_path):
    """write(lines) -> meta dict of one dataset whose images are a.png (640x480), b.png (300x300), c.png (100x400)."""
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (640, 480)), ("b.png", (300, 300)), ("c.png", (100, 400))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / name)

    def write(lines, **meta):
        path = tmp_path / "train.jsonl"
        path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
        return {"d": {"root": str(root), "annotation": str(path), "data_augment": False, "repeat_time": 1, **meta}}

    write.root = root
    return write


def ds(meta, tok, **kw):
    return SupervisedDataset(meta, tok, num_image_token=N_TOK, image_size=56, max_dynamic_patch=6, **kw)


def qa(q="<image>\nWhat is it?", a="A picture.", **extra):
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], **extra}


def test_single_image_tiles_and_tokens(data, tok):
    """The inference tiling (closest grid <= max_dynamic_patch, thumbnail) and 4 <IMG_CONTEXT> per tile."""
    item = ds(data([qa(image="a.png")]), tok)[0]
    tiles = dynamic_preprocess(Image.open(data.root / "a.png").convert("RGB"), 1, 6, 56, True)
    assert torch.equal(item["pixel_values"], torch.stack([to_tensor(t, 56) for t in tiles]))
    ctx = tok.token_to_id("<IMG_CONTEXT>")
    assert int((item["input_ids"] == ctx).sum()) == N_TOK * len(tiles) and item["image_flags"].tolist() == [1] * len(tiles)
    assert torch.equal(item["position_ids"], torch.arange(len(item["input_ids"])))


def test_several_images_share_the_tile_budget(data, tok):
    """Each of n images gets max(1, max_dynamic_patch // n) tiles, in order."""
    item = ds(data([qa("Image-1: <image>\nImage-2: <image>\nCompare.", image=["a.png", "c.png"])]), tok)[0]
    a = dynamic_preprocess(Image.open(data.root / "a.png").convert("RGB"), 1, 3, 56, True)
    c = dynamic_preprocess(Image.open(data.root / "c.png").convert("RGB"), 1, 3, 56, True)
    assert len(item["pixel_values"]) == len(a) + len(c)
    assert torch.equal(item["pixel_values"][len(a)], to_tensor(c[0], 56))


def test_meta_max_dynamic_patch_and_repeat_time(data, tok):
    meta = data([qa(image="a.png"), qa(image="b.png"), qa(image="c.png"), qa(image="a.png")], max_dynamic_patch=1,
                repeat_time=0.5)
    d = ds(meta, tok)
    assert len(d) == 2 and len(d[0]["pixel_values"]) == 1  # the first int(4 * 0.5) lines, one tile each
    meta["d"]["repeat_time"] = 3
    assert len(ds(meta, tok)) == 12
    meta["d"]["repeat_time"] = 1.5
    with pytest.raises(Exception, match="repeat_time"):
        ds(meta, tok)


def test_ms_swift_format_equals_the_original(data, tok):
    """ms-swift's messages/images: the same sample as the original's conversations/image."""
    original = qa("<image>\nDescribe.", "Red.", image="a.png")
    original["conversations"].insert(0, {"from": "system", "value": "Be brief."})
    swift = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nDescribe."},
                          {"role": "assistant", "content": "Red."}], "images": ["a.png"]}
    untagged = {"messages": [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "Red."}],
                "images": [str(data.root / "a.png")]}  # no <image> tag, an absolute path
    d = ds(data([original, swift, untagged]), tok)
    a, b, c = d[0], d[1], d[2]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(c["pixel_values"], a["pixel_values"])


def test_pure_text_has_one_dummy_tile(data, tok):
    item = ds(data([qa("Hello <image> there", "Hi.")]), tok)[0]
    assert item["pixel_values"].shape == (1, 3, 56, 56) and item["image_flags"].tolist() == [0]
    assert tok.token_to_id("<IMG_CONTEXT>") not in item["input_ids"].tolist()
    assert "<image>" in tok.decode(item["input_ids"], skip_special_tokens=False)  # left as text, as the original


def test_video_file_and_frame_folder(data, tok, tmp_path):
    """<video>: t ~ U[min_num_frame, max_num_frame] frames, 'Frame-k: <image>' each, one tile a frame; the same
    frames for the same (seed, epoch, index), others in another epoch; a frame folder sorted by its _N.jpg number."""
    if not VIDEO.exists():
        pytest.skip("no red-panda.mp4")
    shutil.copy(VIDEO, data.root / "v.mp4")
    frames = data.root / "frames"
    frames.mkdir()
    for k in range(12):
        Image.new("RGB", (40, 30), (k * 20, 0, 0)).save(frames / f"f_{k}.jpg")
    meta = data([{"video": "v.mp4", "conversations": [{"from": "human", "value": "What happens?"},
                                                       {"from": "gpt", "value": "A panda eats."}]},
                 {"video": "frames/", "conversations": [{"from": "human", "value": "<video>\nAnd here?"},
                                                        {"from": "gpt", "value": "Red."}]}])
    d = ds(meta, tok, min_num_frame=3, max_num_frame=5)
    v = d[0]
    n = len(v["pixel_values"])
    assert 3 <= n <= 5 and int((v["input_ids"] == tok.token_to_id("<IMG_CONTEXT>")).sum()) == n * N_TOK
    text = tok.decode(v["input_ids"], skip_special_tokens=False)
    assert all(f"Frame-{k + 1}: <img>" in text for k in range(n))
    assert torch.equal(d[0]["pixel_values"], v["pixel_values"])  # reproducible
    runs = set()
    for epoch in range(6):
        d.set_epoch(epoch)
        runs.add(tuple(d[0]["pixel_values"][:, 0, 0, 0].tolist()))
    assert len(runs) > 1
    f = d[1]
    assert 3 <= len(f["pixel_values"]) <= 5
    reds = f["pixel_values"][:, 0, 0, 0].tolist()
    assert reds == sorted(reds)  # in frame order


def test_frame_sampling_rules():
    """'middle' is the original's (a+b)//2 of each interval; 'rand' picks inside each interval; padded to n."""
    rng = np.random.default_rng(0)
    edges = np.linspace(0, 100, 9).astype(int)
    assert frame_indices(8, 100, "middle", rng) == [(edges[k] + edges[k + 1] - 1) // 2 for k in range(8)]
    for _ in range(20):
        idx = frame_indices(8, 100, "rand", rng)
        assert all(edges[k] <= i < edges[k + 1] - 1 for k, i in enumerate(idx))
    assert frame_indices(6, 3, "middle", rng) == [0, 1, 2, 2, 2, 2]


def test_data_augment_jpeg_per_tile(data, tok):
    """data_augment: each tile re-encoded as JPEG at a quality drawn from 75..100, reproducibly."""
    meta = data([qa(image="a.png")], data_augment=True)
    item = ds(meta, tok)[0]
    plain = ds(data([qa(image="a.png")]), tok)[0]
    assert not torch.equal(item["pixel_values"], plain["pixel_values"])
    assert torch.equal(ds(meta, tok)[0]["pixel_values"], item["pixel_values"])
    tiles = dynamic_preprocess(Image.open(data.root / "a.png").convert("RGB"), 1, 6, 56, True)
    candidates = [{q: to_tensor(jpeg_degrade(t, q), 56) for q in range(75, 101)} for t in tiles]
    for k, cand in enumerate(candidates):  # every tile equals one of the 26 re-encodings of that tile
        assert any(torch.equal(item["pixel_values"][k], x) for x in cand.values())


def test_collate_pads_right_and_concatenates_tiles(data, tok):
    d = ds(data([qa(image="a.png"), qa("Hi", "Hello there, how are you?")]), tok)
    b = collate([d[0], d[1]])
    T = max(len(d[0]["input_ids"]), len(d[1]["input_ids"]))
    assert b["input_ids"].shape == b["labels"].shape == (2, T)
    short = int(np.argmin([len(d[0]["input_ids"]), len(d[1]["input_ids"])]))
    n = len(d[short]["input_ids"])
    assert (b["labels"][short, n:] == -100).all() and not b["attention_mask"][short, n:].any()
    assert b["pixel_values"].shape[0] == 8 and b["image_flags"].tolist() == [1] * 7 + [0]


# ---------------------------------------------------------------------------------------------
# bad samples: file:line and the reason, never replaced by another sample

BAD = {
    "not JSON": ('{"conversations": [', "not valid JSON"),
    "missing image": (qa(image="nope.png"), "image file not found"),
    "unreadable image": (qa(image="broken.png"), "cannot read image"),
    "too few placeholders": (qa("Image-1: <image>\nCompare.", image=["a.png", "b.png"]), "1 <image> placeholder(s) for 2"),
    "too many placeholders": (qa("<image> <image>", image=["a.png"]), "2 <image> placeholder(s) for 1"),
    "image cut by truncation": (qa(image="a.png"), "image tokens are cut by truncation at max_seq_length 60"),
    "unknown role": ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "tool", "value": "x"}]},
                     "turn 2 has role 'tool'"),
    "turn without value": ({"conversations": [{"from": "human", "text": "Hi"}]}, "the original reads only 'value'"),
    "no answer": ({"conversations": [{"from": "human", "value": "Hi"}]}, "no learned token"),
    "s3 path": (qa(image="s3://bucket/a.png"), "petrel"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sample_names_file_line_and_reason(data, tok, case):
    line, reason = BAD[case]
    (data.root / "broken.png").write_bytes(b"not an image")
    meta = data([qa("Hi", "Hello."), line])
    max_len = 60 if case == "image cut by truncation" else 8192
    d = ds(meta, tok, max_seq_length=max_len)
    d[0]
    with pytest.raises(BadSample) as e:
        d[1]
    assert str(e.value).startswith(f"{meta['d']['annotation']}:2: ") and reason in str(e.value), str(e.value)
    skipping = ds(meta, tok, max_seq_length=max_len, skip_bad=True)
    assert "bad" in skipping[1] and list(skipping.bad) == [f"{meta['d']['annotation']}:2"]
    assert skipping.check() == 1  # the --check-data pass: one good sample, this one bad


def test_tokenization_mismatch_is_reported(tmp_path):
    """Hermes-2's offset walk (preprocess_mpt) counts the pad token: a literal <|endoftext|> in the text makes the
    original mask every label of the sample with a warning; nanovl reports the sample instead."""
    from nanovl.tokenizer import Tokenizer

    fx.copy_tokenizer(fx.TOKENIZERS / "InternVL2-1B", tmp_path)
    tok = Tokenizer(tmp_path)
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(qa("Say <|endoftext|>", "Done.")) + "\n")
    d = SupervisedDataset({"d": {"root": str(tmp_path), "annotation": str(path)}}, tok, template="Hermes-2")
    with pytest.raises(BadSample, match=r"t.jsonl:1: tokenization mismatch: \d+ vs. \d+"):
        d[0]


def test_check_data_on_the_command_line(data, tmp_path, make_ckpt):
    """python -m nanovl.train --check-data lists every bad sample as file:line: reason and exits 2."""
    import subprocess
    import sys

    path, _, _ = make_ckpt("qwen2", "300m", seed=60, tokenizer_dir="InternVL2_5-1B-MPO")
    meta = data([qa(image="a.png"), qa(image="nope.png"), "{oops", qa(image="b.png")])
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    r = subprocess.run([sys.executable, "-m", "nanovl.train", "--model", str(path), "--meta", str(tmp_path / "meta.json"),
                        "--output", str(tmp_path / "out"), "--check-data"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    ann = meta["d"]["annotation"]
    assert f"{ann}:2: image file not found: {data.root / 'nope.png'}" in lines
    assert any(line.startswith(f"{ann}:3: not valid JSON") for line in lines)
    assert "2 of 4 samples are good, 2 bad" in r.stderr and lines[-1].startswith("error: 2 bad sample(s)")


@pytest.mark.parametrize("template,tokdir", [("internvl2_5", "InternVL2_5-1B-MPO"), ("Hermes-2", "InternVL2-1B")])
def test_single_image_placeholder_rule(data, tmp_path, template, tokdir):
    """The original prepends '<image>\\n' to the first turn when it lacks one: an '<image>' written only in the answer
    stays text there, the image goes before the question, and no image token is ever learned. (nanovl applies the
    rule to the first human turn, so a leading system turn keeps its text.)"""
    from nanovl.tokenizer import Tokenizer

    fx.copy_tokenizer(fx.TOKENIZERS / tokdir, tmp_path)
    tok = Tokenizer(tmp_path)
    meta = data([qa("What is it?", "It is an <image> of a cat.", image="b.png"),
                 {"image": "b.png", "conversations": [{"from": "system", "value": "Be brief."},
                                                      {"from": "human", "value": "<image>\nWhat?"},
                                                      {"from": "gpt", "value": "A cat."}]}])
    d = SupervisedDataset(meta, tok, template=template, num_image_token=N_TOK, image_size=56, max_dynamic_patch=1)
    for item in (d[0], d[1]):
        text = tok.decode(item["input_ids"], skip_special_tokens=False)
        assert tok.token_to_id("<IMG_CONTEXT>") not in item["labels"].tolist()
        assert text.count("<img>") == 1
    first = tok.decode(d[0]["input_ids"], skip_special_tokens=False)
    assert first.index("<img>") < first.index("What is it?") and "an <image> of a cat" in first
    assert "Be brief.<|im_end|>" in tok.decode(d[1]["input_ids"], skip_special_tokens=False)
