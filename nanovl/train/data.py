"""Training data in the original InternVL format: a meta JSON naming JSONL files, each line one conversation with an
image, several images, a video or none; also ms-swift's `messages` / `images` JSONL. Every sample becomes the original
preprocess's input_ids, labels and position_ids (nanovl.template) and its image tiles.

    meta.json   {"my_data": {"root": "images/", "annotation": "train.jsonl", "data_augment": false, "repeat_time": 1}}
    train.jsonl {"image": "cat.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                                                      {"from": "gpt", "value": "A cat."}]}

Where the original replaces a bad sample by a random other one, nanovl raises BadSample("file:line: reason"), or
with skip_bad=True returns {"bad": {"file:line": reason}} for it, which collate() passes on to be counted.
"""
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nanovl import limits
from nanovl.errors import NanovlError
from nanovl.preprocess import dynamic_preprocess, open_image, read_frames, to_tensor
from nanovl.template import IGNORE, IMG_CONTEXT, IMG_END, TEMPLATES, tokenize_conversation


class BadSample(NanovlError):
    """One sample that cannot be trained on: the message starts with file:line."""


@dataclass
class Source:
    """One entry of the meta JSON."""
    name: str
    root: str
    annotation: Path
    data_augment: bool
    max_dynamic_patch: int | None
    lines: list  # [(line number, text)], after repeat_time


def read_meta(meta, data_augment: bool = False) -> list[Source]:
    """A meta JSON path or dict -> its datasets, each with its JSONL lines (repeat_time applied as the original:
    r < 1 keeps the first int(N*r) lines, an integer r > 1 repeats them)."""
    where = str(meta) if not isinstance(meta, dict) else "meta"
    if not isinstance(meta, dict):
        try:
            meta = json.loads(Path(meta).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise NanovlError(f"cannot read the meta file {where}: {e}") from None
    if not isinstance(meta, dict) or not meta:
        raise NanovlError(f"{where}: a meta file is a JSON object {{name: {{root, annotation, ...}}}}")
    sources = []
    for name, d in meta.items():
        if not isinstance(d, dict) or not isinstance(d.get("annotation"), str) or "root" not in d:
            raise NanovlError(f"{where}: dataset {name!r} needs 'root' and 'annotation' (a .jsonl path)")
        annotation = Path(d["annotation"])
        if not annotation.is_absolute() and where != "meta" and not annotation.exists():
            annotation = Path(where).parent / annotation  # relative to the meta file, when not to the cwd
        r = d.get("repeat_time", 1)
        if not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0 or (r > 1 and r != int(r)):
            raise NanovlError(f"{where}: dataset {name!r}: repeat_time must be in (0, 1] or an integer, got {r!r}")
        try:
            text = annotation.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise NanovlError(f"{where}: dataset {name!r}: cannot read {annotation}: {e}") from None
        lines = [(k + 1, line) for k, line in enumerate(text.split("\n")) if line.strip()]
        limits.within("MAX_SAMPLES", len(lines) * int(max(r, 1)), f"{where}: dataset {name!r} ({len(lines):,} lines, "
                      f"repeat_time {r})", "use a smaller repeat_time")
        lines = lines[:int(len(lines) * r)] if r < 1 else lines * int(r)
        tiles = d.get("max_dynamic_patch")
        if tiles is not None and (not isinstance(tiles, int) or tiles < 1):
            raise NanovlError(f"{where}: dataset {name!r}: max_dynamic_patch must be a positive integer, got {tiles!r}")
        sources.append(Source(str(name), str(d["root"]), annotation, bool(d.get("data_augment", data_augment)),
                              tiles, lines))
    return sources


# -----------------------------------------------------------------------------
# one JSONL line -> turns and media

def _turns_from_messages(d: dict) -> tuple[list, list, list]:
    """ms-swift's {"messages": [{"role", "content"}], "images": [...], "videos": [...]} -> the original schema.
    Images without any <image> tag go before the first user message (ms-swift does the same)."""
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    turns = []
    for k, m in enumerate(d["messages"]):
        if not isinstance(m, dict) or m.get("role") not in roles or not isinstance(m.get("content"), str):
            raise ValueError(f"message {k + 1} must be {{'role': system|user|assistant, 'content': str}}, got {m!r}")
        turns.append({"from": roles[m["role"]], "value": m["content"]})
    images = [i["path"] if isinstance(i, dict) else i for i in d.get("images") or []]
    videos = [v["path"] if isinstance(v, dict) else v for v in d.get("videos") or []]
    text = "".join(t["value"] for t in turns)
    first_user = next((t for t in turns if t["from"] == "human"), None)
    if images and "<image>" not in text and first_user is not None:
        first_user["value"] = "<image>\n" * len(images) + first_user["value"]
    if videos and "<video>" not in text and first_user is not None:
        first_user["value"] = "<video>\n" + first_user["value"]
    return turns, images, videos


def parse_line(text: str) -> tuple[list, list, str | None, list | None, bool]:
    """A JSONL line -> (turns, image paths, video path or None, clip or None, whether 'image' was one path).
    Raises ValueError."""
    d = json.loads(text)
    if not isinstance(d, dict):
        raise ValueError("a sample must be a JSON object")
    if "messages" in d:
        turns, images, videos = _turns_from_messages(d)
        if len(videos) > 1:
            raise ValueError("more than one video in a sample")
        return turns, images, (videos[0] if videos else None), None, len(images) == 1
    turns = d.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("no 'conversations' list (or ms-swift 'messages')")
    for k, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str) or "from" not in t:
            raise ValueError(f"turn {k + 1} must be {{'from': ..., 'value': str}} (the original reads only 'value'), "
                             f"got {t!r}")
    image = d.get("image")
    images = [] if not image else [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ValueError(f"'image' must be a path or a list of paths, got {image!r}")
    video = d.get("video") or None
    if images:
        video = None  # the original reads the images and ignores the video
    return [dict(t) for t in turns], images, video, d.get("clip"), isinstance(image, str)


def _placeholder(turns: list, tag: str) -> None:
    """The original prepends '<image>\n' (or '<video>\n') to the first turn when it lacks the tag. nanovl does so for
    the first human turn: the same whenever the data starts with the user (the usual case); a leading system turn
    would otherwise get the placeholder, which breaks the sample (or leaves the tag as text in the system prompt)."""
    first = next((t for t in turns if t["from"] == "human"), turns[0])
    if tag not in first["value"]:
        first["value"] = tag + "\n" + first["value"]


# -----------------------------------------------------------------------------
# frames, as the original's get_frame_indices / read_frames_* (with a seeded generator)

def frame_indices(num_frames: int, vlen: int, sample: str, rng: np.random.Generator) -> list:
    """'rand': one uniformly random frame from each of num_frames equal intervals of [0, vlen) (a sorted random
    subset if an interval is empty); 'middle': the middle of each. Padded with the last index to num_frames."""
    n = min(num_frames, vlen)
    edges = np.linspace(0, vlen, n + 1).astype(int)
    ranges = [(edges[k], edges[k + 1] - 1) for k in range(n)]
    if sample == "rand":
        if all(a < b for a, b in ranges):  # random.choice(range(a, b)) for each interval
            idx = [int(rng.integers(a, b)) for a, b in ranges]
        else:
            idx = sorted(int(x) for x in rng.permutation(vlen)[:n])
    elif sample == "middle":
        idx = [(a + b) // 2 for a, b in ranges]
    else:
        raise NanovlError(f"unknown frame sampling {sample!r}: use rand or middle")
    return idx + [idx[-1]] * (num_frames - len(idx))


def read_video(path: str, num_frames: int, sample: str, rng, clip=None) -> list:
    """A video file, a folder of frames ('name/', frames sorted by their _N.jpg number) or a .gif -> PIL frames."""
    if path.endswith("/") or os.path.isdir(path):
        names = sorted(os.listdir(path), key=lambda f: int(m[1]) if (m := re.search(r"_(\d+).jpg$", f)) else -1)
        frames = [open_image(os.path.join(path, f)) for f in names]
        if not frames:
            raise NanovlError(f"no frames in the folder {path}")
        return [frames[k] for k in frame_indices(num_frames, len(frames), sample, rng)] \
            if len(frames) > num_frames else frames
    if path.lower().endswith(".gif"):
        with Image.open(path) as gif:
            frames = []
            for k in range(getattr(gif, "n_frames", 1)):
                gif.seek(k)
                frames.append(gif.convert("RGB"))
        return [frames[k] for k in frame_indices(num_frames, len(frames), sample, rng)]

    def pick(vlen, fps):
        start = 0
        if clip:
            vlen, start = int((clip[1] - clip[0]) * fps), int(clip[0] * fps)
        return [start + k for k in frame_indices(num_frames, max(vlen, 1), sample, rng)]
    return read_frames(path, pick)


def jpeg_degrade(image: Image.Image, quality: int) -> Image.Image:
    """data_augment: re-encode as JPEG at `quality` (the original's simulate_jpeg_degradation)."""
    with io.BytesIO() as buf:
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        return Image.open(buf).copy()


# -----------------------------------------------------------------------------

class SupervisedDataset(torch.utils.data.Dataset):
    """The samples of a meta JSON (or dict), preprocessed as the original LazySupervisedDataset does. Options are
    named and defaulted as the original's flags. ds[i] -> {"input_ids", "labels", "position_ids" (T,),
    "pixel_values" (tiles, 3, 448, 448), "image_flags" (tiles,)} (a pure-text sample carries one white tile with
    flag 0, as the original); a bad sample raises BadSample, or with skip_bad gives {"bad": {"file:line": reason}}
    (also kept in self.bad of this process)."""

    def __init__(self, meta, tokenizer, template="internvl2_5", max_seq_length=8192, dynamic_image_size=True,
                 use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=6, min_num_frame=8, max_num_frame=32,
                 num_image_token=256, data_augment=False, seed=0, image_size=448, sampling_method="rand",
                 skip_bad=False):
        if template not in TEMPLATES:
            raise NanovlError(f"unknown template {template!r}; nanovl knows {', '.join(TEMPLATES)}")
        if not 1 <= min_num_frame <= max_num_frame:
            raise NanovlError(f"need 1 <= min_num_frame <= max_num_frame, got {min_num_frame} and {max_num_frame}")
        self.sources = read_meta(meta, data_augment)
        self.index = [(s, line, text) for s in self.sources for line, text in s.lines]
        if not self.index:  # an epoch of no samples never ends
            raise NanovlError(f"no samples: {', '.join(str(s.annotation) for s in self.sources)} hold(s) no lines")
        self.tokenizer, self.template, self.max_seq_length = tokenizer, template, max_seq_length
        self.dynamic_image_size, self.use_thumbnail = dynamic_image_size, use_thumbnail
        self.min_dynamic_patch, self.max_dynamic_patch = min_dynamic_patch, max_dynamic_patch
        self.min_num_frame, self.max_num_frame, self.sampling_method = min_num_frame, max_num_frame, sampling_method
        self.num_image_token, self.image_size, self.seed, self.epoch = num_image_token, image_size, seed, 0
        self.skip_bad, self.bad = skip_bad, {}  # bad: "file:line" -> reason
        self.img_end_id, self.img_context_id = tokenizer.token_to_id(IMG_END), tokenizer.token_to_id(IMG_CONTEXT)

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        """Random frame choices and JPEG qualities depend on (seed, epoch, index) only: a resumed run sees the same."""
        self.epoch = epoch

    def where(self, i: int) -> str:
        source, line, _ = self.index[i]
        return f"{source.annotation}:{line}"

    def __getitem__(self, i: int):
        try:
            return self.item(i)
        except (NanovlError, ValueError, OSError, KeyError, TypeError) as e:
            reason = str(e)
            if isinstance(e, json.JSONDecodeError):
                reason = f"not valid JSON ({e})"
            if not self.skip_bad:
                raise BadSample(f"{self.where(i)}: {reason}") from None
            self.bad[self.where(i)] = reason
            return {"bad": {self.where(i): reason}}

    def item(self, i: int) -> dict:
        turns, images, video, clip, single = parse_line(self.index[i][2])
        pixel_values, counts, flags = self.media(i, turns, images, video, clip, single)
        ids, labels = self.tokens(turns, counts)
        return dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels), position_ids=torch.arange(len(ids)),
                    pixel_values=pixel_values, image_flags=torch.full((len(pixel_values),), flags))

    @staticmethod
    def frame_prompt(n: int) -> str:
        """What '<video>\\n' becomes: 'Frame-1: <image>\\n' ... (internvl_chat_finetune.py video_get_item)."""
        return "".join(f"Frame-{k + 1}: <image>\n" for k in range(n))

    def media(self, i, turns, images, video, clip, single):
        """Sample i's tiles, with its placeholders expanded in `turns` (in place) for the video frames.
        -> (pixel_values (tiles, 3, 448, 448), <IMG_CONTEXT> count of each image, image_flags value)."""
        source = self.index[i][0]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        augment = source.data_augment
        max_tiles = source.max_dynamic_patch or self.max_dynamic_patch

        def tiles_of(image, max_num):
            tiles = dynamic_preprocess(image, min(self.min_dynamic_patch, max_num), max_num, self.image_size,
                                       self.use_thumbnail) if self.dynamic_image_size else [image]
            return [to_tensor(jpeg_degrade(t, int(rng.integers(75, 101))) if augment else t, self.image_size)
                    for t in tiles]  # the augmentation draws a quality for each tile

        def path(p):
            if p.startswith("s3://"):
                raise BadSample(f"{p}: s3:// paths need the original's petrel loader")
            return os.path.join(source.root, p)

        if images:
            if single:
                _placeholder(turns, "<image>")  # a single image: the original adds the placeholder if missing
            max_num = max_tiles if len(images) == 1 else max(1, max_tiles // len(images))
            per_image = [tiles_of(open_image(path(p)), max_num) for p in images]
            return torch.stack([t for tiles in per_image for t in tiles]), \
                [self.num_image_token * len(t) for t in per_image], 1
        if video:
            _placeholder(turns, "<video>")
            n = int(rng.integers(self.min_num_frame, self.max_num_frame + 1))
            frames = read_video(path(video), n, self.sampling_method, rng, clip)
            first = next(t for t in turns if "<video>" in t["value"])
            if "<video>\n" not in first["value"]:
                raise BadSample("the <video> placeholder must be followed by a newline (the original replaces "
                                "'<video>\\n')")
            first["value"] = first["value"].replace("<video>\n", self.frame_prompt(len(frames)), 1)
            pixel_values = torch.stack([to_tensor(jpeg_degrade(f, int(rng.integers(75, 101))) if augment else f,
                                                  self.image_size) for f in frames])  # one tile a frame
            return pixel_values, [self.num_image_token] * len(frames), 1
        white = Image.new("RGB", (224, 224), (255, 255, 255))  # pure text: a dummy tile the model drops (flag 0)
        return torch.stack(tiles_of(white, 1)), [], 0

    def tokens(self, turns, counts) -> tuple[list, list]:
        """The template's input_ids and labels of `turns`, with every check of a trainable sample."""
        placeholders = sum(t["value"].count("<image>") for t in turns if t["from"] != "gpt")  # an answer's is text
        if counts and placeholders != len(counts):  # the original drops too few, and keeps extra ones as text
            raise BadSample(f"{placeholders} <image> placeholder(s) for {len(counts)} image(s)")
        ids, labels, warning = tokenize_conversation(self.template, self.tokenizer, turns, counts,
                                                     self.max_seq_length, text_only=not counts)
        if warning:
            raise BadSample(f"{warning}: the original would train on this sample with no learned token")
        if counts and ids.count(self.img_end_id) != len(counts):
            raise BadSample(f"image tokens are cut by truncation at max_seq_length {self.max_seq_length} "
                            f"({sum(counts)} image tokens in {len(counts)} image(s))")
        if self.img_context_id in labels:  # e.g. a legacy template expanding an <image> written in an answer
            raise BadSample("image tokens would be learned: an <image> placeholder sits where an answer is")
        if all(label == IGNORE for label in labels):
            raise BadSample("no learned token (no answer, or every answer is cut by truncation)")
        return ids, labels

    def check(self, progress=None) -> int:
        """The --check-data pass: preprocess every sample (nothing trains). -> the number of good samples; the bad
        ones are in self.bad ("file:line" -> reason)."""
        skip, self.skip_bad = self.skip_bad, True
        good = 0
        try:
            for i in range(len(self)):
                good += "bad" not in self[i]
                if progress:
                    progress(i + 1)
        finally:
            self.skip_bad = skip
        return good


def collate(items: list, pad_token_id: int = 0) -> dict:
    """Right-padded (B, T) input_ids / labels (IGNORE) / position_ids, attention_mask (True on real tokens), and the
    tiles of all samples concatenated: pixel_values (sum tiles, 3, 448, 448), image_flags (sum tiles,).
    Skipped bad samples are dropped, their reasons passed on in "bad". The pad id only fills space: right padding under causal attention is never
    seen by a real token, so nanovl does not mask by id (the original's collator pads with 0 and then masks every
    token whose id is 0, a real token included: Qwen2's '!')."""
    bad = {k: v for x in items if "bad" in x for k, v in x["bad"].items()}
    items = [x for x in items if "bad" not in x]
    if not items:
        return {"bad": bad} if bad else {}
    T = max(len(x["input_ids"]) for x in items)

    def pad(key, value):
        return torch.stack([torch.cat([x[key], x[key].new_full((T - len(x[key]),), value)]) for x in items])

    return dict(input_ids=pad("input_ids", pad_token_id), labels=pad("labels", IGNORE), position_ids=pad("position_ids", 0),
                attention_mask=torch.stack([torch.arange(T) < len(x["input_ids"]) for x in items]),
                pixel_values=torch.cat([x["pixel_values"] for x in items]),
                image_flags=torch.cat([x["image_flags"] for x in items]), **({"bad": bad} if bad else {}))
