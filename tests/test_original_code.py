"""Training samples against the original code itself: OpenGVLab/InternVL's own preprocess functions
(`internvl_chat/internvl/train/dataset.py`: preprocess_internvl2_5, preprocess_mpt for Hermes-2, preprocess_internlm,
preprocess_phi3) run on the same conversations, with the real tokenizers, must give nanovl's input_ids and labels,
id for id, for supervised samples and MPO pairs; and the original's PackedDataset
(`internvl_chat/internvl/train/dataset_packed.py`), fed the same samples, must give nanovl's packed rows and loss
weights.

The original code is not part of nanovl and is not copied here: this test imports it from a clone of
https://github.com/OpenGVLab/InternVL named by NANOVL_INTERNVL_CODE, and skips without one (CI cannot reach GitHub;
its oracle is tests/test_labels.py, worked examples written from the same code):

    git clone https://github.com/OpenGVLab/InternVL /tmp/InternVL
    NANOVL_INTERNVL_CODE=/tmp/InternVL python -m pytest tests/test_original_code.py

Only those functions and classes run. The modules dataset.py imports for reading images and videos (cv2, imageio,
decord, torchvision, petrel_client) are replaced by empty stand-ins, since they never use them. The original loads the
slow transformers 4.x tokenizers (use_fast=False); the stand-ins for them here give the same ids (test_tokenizer.py
checks each on its own): transformers' Qwen2Tokenizer from vocab.json + merges.txt, InternLM2's tokenizers form
(InternLM2Tokenizer is remote code) with its BOS, and for Phi-3 test_tokenizer.SlowLlama, a port of the slow
LlamaTokenizer (transformers 5's Llama tokenizer puts no "▁" before a leading added token, the slow one does). Each
gets the original's own `add_tokens` call and `model_max_length = max_seq_length`, as internvl_chat_finetune.py does.
Where nanovl departs from the original on purpose (README "Where nanovl differs"), the sample is left out here.
"""
import copy
import importlib
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

import fixtures as fx
from nanovl.tokenizer import Tokenizer
from nanovl.train import SupervisedDataset
from nanovl.train.mpo import PreferenceDataset
from test_tokenizer import SlowLlama

CODE = os.environ.get("NANOVL_INTERNVL_CODE")
pytestmark = [
    pytest.mark.skipif(not CODE, reason="set NANOVL_INTERNVL_CODE to a clone of github.com/OpenGVLab/InternVL"),
    pytest.mark.skipif(not fx.TOKENIZERS.is_dir(), reason=f"{fx.ASSETS} not available"),
]

NIT = 4  # num_image_token (256 in the real models; the rules do not depend on it)
MAX_PATCH = 6
FOLDERS = {"qwen2.5": "InternVL2_5-1B-MPO", "qwen2": "InternVL2-1B", "internlm2": "InternVL2-2B",
           "phi3": "Phi-3-mini-128k-instruct"}
# internvl_chat_finetune.py: the tokens the original adds to every tokenizer before training
ADDED = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
# LazySupervisedDataset.get_preprocess_function of internvl_chat_finetune.py
FUNCTIONS = {"internvl2_5": "preprocess_internvl2_5", "Hermes-2": "preprocess_mpt",
             "internlm2-chat": "preprocess_internlm", "phi3-chat": "preprocess_phi3"}


@pytest.fixture(scope="module")
def original():
    """The original internvl.train.dataset module, imported from the clone with its media libraries stubbed."""
    root = Path(CODE) / "internvl_chat"
    if not (root / "internvl" / "train" / "dataset.py").is_file():
        pytest.fail(f"NANOVL_INTERNVL_CODE={CODE} has no internvl_chat/internvl/train/dataset.py")
    import transformers.trainer_pt_utils  # noqa: F401  (imported before the stand-ins: transformers probes torchvision)
    stubs = {name: types.ModuleType(name) for name in
             ("cv2", "imageio", "decord", "torchvision", "torchvision.transforms",
              "torchvision.transforms.functional", "petrel_client", "petrel_client.client",
              "petrel_client.common", "petrel_client.common.config")}
    stubs["decord"].VideoReader = None
    stubs["torchvision.transforms.functional"].InterpolationMode = None
    stubs["petrel_client.client"].Client = None
    stubs["petrel_client.common.config"].Config = None
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("internvl.train.dataset")
    finally:
        sys.path.remove(str(root))
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
        for name in [n for n in sys.modules if n == "internvl" or n.startswith("internvl.")]:
            del sys.modules[name]


def hf_tokenizer(name, max_seq_length):
    """The tokenizer as the original's training script holds it (transformers, test-only)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    with tempfile.TemporaryDirectory(prefix=f"orig-tok-{name}-") as tmp:
        d = Path(tmp)
        fx.copy_tokenizer(fx.TOKENIZERS / FOLDERS[name], d)
        if name == "phi3":  # the slow LlamaTokenizer (legacy=False) the original loads; transformers 5 has none
            return SlowTokenizer(d, max_seq_length)
        if name == "internlm2":  # InternLM2Tokenizer is remote code: its tokenizers form, with the slow one's settings
            tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), bos_token="<s>",
                                          eos_token="</s>", unk_token="<unk>", pad_token="</s>")
            tok.add_bos_token = True
        else:
            tok = AutoTokenizer.from_pretrained(d, add_eos_token=False)
    tok.model_max_length = max_seq_length
    tok.add_tokens(ADDED, special_tokens=True)
    return tok


class SlowTokenizer:
    """test_tokenizer.SlowLlama (a port of transformers 4.x's slow LlamaTokenizer, checked there against 4.44.2),
    called the way the original's preprocess functions call a transformers tokenizer."""

    def __init__(self, d, max_seq_length):
        self.slow = SlowLlama(d)
        self.legacy, self.model_max_length, self.padding_side = self.slow.legacy, max_seq_length, "right"
        self.pad_token_id = self.slow.added[json.loads((d / "tokenizer_config.json").read_text())["pad_token"]]

    def convert_tokens_to_ids(self, token):
        return self.slow.added[token]

    def __call__(self, text, return_tensors=None, padding=False, max_length=None, truncation=False):
        assert padding is False, "the test runs the original with group_by_length=True (no padding)"
        ids = [self.slow.encode(t) for t in ([text] if isinstance(text, str) else text)]
        ids = [x[:max_length] for x in ids] if truncation else ids
        if return_tensors == "pt":
            return types.SimpleNamespace(input_ids=torch.tensor(ids))
        return types.SimpleNamespace(input_ids=ids[0] if isinstance(text, str) else ids)


def nanovl_item(tmp_path, name, template, sample, max_seq_length, images=(), frames=0, dataset=SupervisedDataset):
    """nanovl's item for one JSONL sample (SupervisedDataset or PreferenceDataset; images: (file, width, height);
    frames: a video given as a folder of that many frames)."""
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    for file, w, h in images:
        Image.new("RGB", (w, h), (200, 30, 30)).save(root / file)
    if frames:
        (root / "clip").mkdir(exist_ok=True)
        for k in range(frames):
            Image.new("RGB", (320, 240), (10 * k, 90, 40)).save(root / "clip" / f"frame_{k}.jpg")
    ann = tmp_path / "data.jsonl"
    ann.write_text(json.dumps(sample, ensure_ascii=False) + "\n", encoding="utf-8")
    meta = {"d": {"root": str(root), "annotation": str(ann), "data_augment": False, "repeat_time": 1}}
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir(exist_ok=True)
    fx.copy_tokenizer(fx.TOKENIZERS / FOLDERS[name], tok_dir)
    ds = dataset(meta, Tokenizer(tok_dir), template=template, max_seq_length=max_seq_length,
                 max_dynamic_patch=MAX_PATCH, min_num_frame=frames or 8, max_num_frame=frames or 32,
                 num_image_token=NIT, seed=0)
    return ds[0]


def conv(*turns):
    return [{"from": f, "value": v} for f, v in turns]


SYSTEM = ("system", "Answer in one short sentence.")
# (id, conversations, images as (file, w, h), tiles per image, video frames, max_seq_length)
# 896x448 with max_dynamic_patch 6: a 2x1 grid plus the thumbnail, 3 tiles; two such images get max(1, 6 // 2) = 3
# tiles each, the same grid; a video frame is one tile.
CASES = [
    ("one image", conv(("human", "<image>\nWhat colour is this?"), ("gpt", "It is red.")),
     [("a.png", 896, 448)], [3], 0, 8192),
    ("two images", conv(("human", "Image-1: <image>\nImage-2: <image>\nWhat differs?"), ("gpt", "Nothing at all.")),
     [("a.png", 896, 448), ("b.png", 896, 448)], [3, 3], 0, 8192),
    ("multi-turn CJK", conv(("human", "<image>\n这是什么颜色？"), ("gpt", "红色。"), ("human", "And 2+2?"), ("gpt", "4")),
     [("a.png", 448, 448)], [1], 0, 8192),
    ("pure text", conv(("human", "Name a prime number."), ("gpt", "Seven is prime, and so is 11.")), [], [], 0, 8192),
    ("truncated answer", conv(("human", "Count to sixty."), ("gpt", " ".join(map(str, range(60))))), [], [], 0, 80),
    ("video", conv(("human", "<video>\nWhat happens?"), ("gpt", "The colour changes.")), [], [1] * 4, 4, 8192),
]
# internvl2_5 with both tokenizer families it is used with (InternVL2.5-2B/3-9B are InternLM2/3-based);
# the legacy templates with the tokenizer of their models.
PAIRS = [("internvl2_5", "qwen2.5"), ("internvl2_5", "internlm2"), ("Hermes-2", "qwen2"),
         ("internlm2-chat", "internlm2"), ("phi3-chat", "phi3")]


def params():
    for template, name in PAIRS:
        for case in CASES:
            yield pytest.param(template, name, *case[1:], id=f"{template}-{name}-{case[0]}")
        if template == "internvl2_5":  # the legacy templates raise KeyError on a system turn (nanovl: README)
            c = CASES[0]
            yield pytest.param(template, name, [dict(zip(("from", "value"), SYSTEM))] + c[1], *c[2:],
                               id=f"{template}-{name}-system turn")


@pytest.mark.parametrize("template,name,turns,images,tiles,frames,max_len", list(params()))
def test_labels_equal_the_original_preprocess(original, tmp_path, template, name, turns, images, tiles, frames,
                                              max_len):
    sample = {"conversations": turns}
    if len(images) == 1:
        sample["image"] = images[0][0]
    elif images:
        sample["image"] = [f for f, _, _ in images]
    if frames:
        sample["video"] = "clip"
    item = nanovl_item(tmp_path, name, template, sample, max_len, images, frames)
    if tiles:
        assert item["pixel_values"].shape[0] == sum(tiles), "the tile counts this case is written for"

    # what the original's get_item methods hand the preprocess function
    sources = copy.deepcopy(turns)
    if frames:  # video_get_item: '<video>\n' -> 'Frame-1: <image>\nFrame-2: <image>\n...\n'
        marks = "\n".join(f"Frame-{i + 1}: <image>" for i in range(frames))
        sources[0]["value"] = sources[0]["value"].replace("<video>\n", marks + "\n")
    fn = getattr(original, FUNCTIONS[template])
    ret = fn(template, [sources], hf_tokenizer(name, max_len), [NIT * t for t in tiles] or [NIT],
             text_only=not tiles, group_by_length=True, ds_name="d", num_image=max(1, len(tiles)))
    want_ids, want_labels = ret["input_ids"][0].tolist(), ret["labels"][0].tolist()
    assert any(x != -100 for x in want_labels), "the original masked the whole sample"
    assert item["input_ids"].tolist() == want_ids
    assert item["labels"].tolist() == want_labels
    assert item["position_ids"].tolist() == list(range(len(want_ids)))


@pytest.mark.parametrize("template,name", PAIRS, ids=[f"{t}-{n}" for t, n in PAIRS])
def test_preference_pairs_equal_the_original(original, tmp_path, template, name):
    """internvl_chat_mpo.py's multi_modal_get_item: the question with the chosen answer, then with the rejected one,
    each through the template's preprocess function (group_by_length=True), the image's tiles shared."""
    sample = {"image": "a.png", "question": "<image>\nHow many red squares?", "chosen": "There is one red square.",
              "rejected": "There are three."}
    item = nanovl_item(tmp_path, name, template, sample, 8192, [("a.png", 896, 448)], dataset=PreferenceDataset)
    assert item["pixel_values"].shape[0] == 3
    tok = hf_tokenizer(name, 8192)
    for answer in ("chosen", "rejected"):
        turns = [{"from": "human", "value": sample["question"]}, {"from": "gpt", "value": sample[answer]}]
        ret = getattr(original, FUNCTIONS[template])(template, [turns], tok, [NIT * 3], group_by_length=True,
                                                     ds_name="d")
        assert item[f"{answer}_input_ids"].tolist() == ret["input_ids"][0].tolist()
        assert item[f"{answer}_labels"].tolist() == ret["labels"][0].tolist()


# ------------------------------------------------------------------------------------------------ packed sequences

@pytest.fixture(scope="module")
def original_packed(original):
    return importlib.import_module("internvl.train.dataset_packed")


class Stream:
    """What the original's PackedDataset reads: an iterable dataset with the attributes it sets and checks."""

    def __init__(self, samples, max_num_images, max_tokens):
        self.samples, self.ds_name, self.dataset_type = samples, "d", "pair"
        self.max_num_images, self.max_tokens = max_num_images, max_tokens

    def __iter__(self):
        return iter(copy.deepcopy(self.samples))

    def load_state_dict(self, state):
        pass


def synthetic_samples(tok, n, seed, tiles_per_image=(1,), max_len=60, text_only=0.0):
    """n samples as SupervisedDataset gives them: random text ids around image blocks (<img> + NIT <IMG_CONTEXT> a
    tile + </img>), the answer's ids learned; a pure-text sample carries one dummy tile (image_flags 0)."""
    g = torch.Generator().manual_seed(seed)
    img, ctx, end = (tok.token_to_id(t) for t in ("<img>", "<IMG_CONTEXT>", "</img>"))
    out = []
    for k in range(n):
        text = lambda m: torch.randint(100, 5000, (m,), generator=g).tolist()  # noqa: E731
        ids, tiles = text(int(torch.randint(2, 8, (1,), generator=g))), 0
        pure = float(torch.rand(1, generator=g)) < text_only
        for _ in range(0 if pure else int(torch.randint(1, 3, (1,), generator=g))):
            t = tiles_per_image[int(torch.randint(len(tiles_per_image), (1,), generator=g))]
            ids += [img] + [ctx] * (NIT * t) + [end] + text(int(torch.randint(1, 6, (1,), generator=g)))
            tiles += t
        prompt = len(ids)
        ids += text(int(torch.randint(3, max_len, (1,), generator=g)))
        labels = [-100] * prompt + ids[prompt:]
        n_tiles = max(tiles, 1)
        out.append(dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels), position_ids=torch.arange(len(ids)),
                        pixel_values=torch.arange(n_tiles, dtype=torch.float32)[:, None] + 100 * k,
                        image_flags=torch.full((n_tiles,), 0 if pure else 1)))
    return out


PACKING = [  # (id, Packer options, sample options): no cut first (any tiles, pure text), then cuts (1 tile an image:
    # the original's split_buffer asserts one tile per image block, see the README)
    ("fill by tiles", dict(max_packed_tokens=400, num_images_expected=6, max_buffer_size=4, strict_mode=True,
                           allow_overflow=False), dict(tiles_per_image=(1, 2, 3), text_only=0.2)),
    ("fill by tokens, not strict", dict(max_packed_tokens=160, num_images_expected=12, max_buffer_size=3,
                                        strict_mode=False, allow_overflow=False), dict(tiles_per_image=(1, 2))),
    ("overflow", dict(max_packed_tokens=160, num_images_expected=8, max_buffer_size=4, strict_mode=True,
                      allow_overflow=True), dict(tiles_per_image=(1,), max_len=100)),
    ("cuts", dict(max_packed_tokens=64, num_images_expected=8, max_buffer_size=4, strict_mode=True,
                  allow_overflow=False), dict(tiles_per_image=(1,), max_len=120)),
]


@pytest.mark.parametrize("opts,sample_opts", [p[1:] for p in PACKING], ids=[p[0] for p in PACKING])
def test_packed_rows_equal_the_original(original_packed, tmp_path, opts, sample_opts):
    from nanovl.train.loss import token_weights
    from nanovl.train.packing import Packer
    fx.copy_tokenizer(fx.TOKENIZERS / FOLDERS["qwen2.5"], tmp_path)
    tok = Tokenizer(tmp_path)
    samples = synthetic_samples(tok, 40, seed=len(str(opts)), **sample_opts)

    packer = Packer(tok, num_image_token=NIT, **opts)
    mine = [row for s in copy.deepcopy(samples) for row in packer.add(s)] + packer.flush()
    ref = original_packed.PackedDataset(
        hf_tokenizer("qwen2.5", 8192), data_rank=0, data_world_size=1,
        datasets=[Stream(samples, opts["num_images_expected"], opts["max_packed_tokens"])],
        num_images_expected=opts["num_images_expected"], max_packed_tokens=opts["max_packed_tokens"],
        max_buffer_size=opts["max_buffer_size"], strict_mode=opts["strict_mode"],
        allow_overflow=opts["allow_overflow"], replacement=False)
    theirs = list(ref)

    assert len(mine) > 3 and len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        for key in ("input_ids", "labels", "position_ids", "pixel_values", "image_flags"):
            assert torch.equal(a[key], b[key]), key
        assert torch.equal(a["segment_ids"], b["data_index"])  # which packed sample each token belongs to
        # the loss weights of each packed sample (get_cu_seqlens_and_indexes with len2weight, whose three lines in
        # internvl_chat_finetune.py are restated in `len2weight` below), zero where not learned as packed_collate_fn
        for reduction in ("token", "sample", "square"):
            _, _, weight = original_packed.PackedDataset.get_cu_seqlens_and_indexes(
                b["data_index"], b["input_ids"], b["labels"], lambda x: len2weight(x, reduction))
            want = torch.where(b["labels"] == -100, 0, weight)
            assert torch.allclose(token_weights(a["labels"][None], reduction, a["segment_ids"][None])[0], want)


def len2weight(x, loss_reduction):
    """internvl_chat_finetune.py's len2weight: 0 for a sample with nothing learned, else 1, 1/x or 1/sqrt(x)."""
    return x if x == 0 else {"token": 1, "sample": 1 / x, "square": 1 / x ** 0.5}[loss_reduction]
