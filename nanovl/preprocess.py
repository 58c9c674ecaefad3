"""Image and video preprocessing, bit-exact with InternVL's PIL + torchvision path: `dynamic_preprocess`, `load_image`
and `load_video` of the InternVL model cards (https://huggingface.co/OpenGVLab/InternVL3-1B, "Inference with
Transformers"), and `dynamic_preprocess` / `build_transform` of internvl_chat/internvl/train/dataset.py.

A "tile" is one 448x448 crop (what the reference calls a patch in num_patches_list / max_num); a "patch" elsewhere in
nanovl is one 14x14-pixel square of a tile.
"""
import os
import re
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nanovl import limits
from nanovl.errors import NanovlError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# -----------------------------------------------------------------------------
# dynamic tiling: the grid of 448 tiles whose aspect ratio is closest to the image's

@lru_cache(maxsize=None)
def target_ratios(min_num=1, max_num=12):
    # built exactly like the reference: a set (CPython iteration order is deterministic for small int tuples),
    # then a stable sort by area, so the order within one area matches the reference and the tie-break agrees
    ratios = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                 if min_num <= i * j <= max_num)
    return tuple(sorted(ratios, key=lambda x: x[0] * x[1]))

def find_closest_aspect_ratio(aspect_ratio, ratios, width, height, image_size):
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in ratios:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        # exact float tie: the later (larger-area) grid wins if the image has > half its pixels
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best  # (cols, rows)

def closest_grid(width, height, min_num=1, max_num=12, image_size=448):
    """(cols, rows) of the tile grid the reference picks for a width x height image."""
    return find_closest_aspect_ratio(width / height, target_ratios(min_num, max_num), width, height, image_size)

def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=True):
    """PIL image -> list of PIL tiles: the closest (cols, rows) grid with min_num <= cols*rows <= max_num, row-major
    crops of the image resized to it, and a thumbnail of the whole image last when there is more than one tile.
    max_num is bounded by limits.MAX_TILES (the grid search grows as max_num cubed), the resized image by
    limits.MAX_IMAGE_PIXELS."""
    limits.within("MAX_TILES", limits.whole(max_num, "max_num", 1), "max_num", "use fewer tiles")
    limits.whole(min_num, "min_num", 1, max_num)
    limits.whole(image_size, "input_size", 1)
    if min(image.size) < 1:
        raise NanovlError(f"the image is {image.size[0]}x{image.size[1]} pixels: there is nothing to see")
    cols, rows = closest_grid(*image.size, min_num, max_num, image_size)
    limits.within("MAX_IMAGE_PIXELS", image_size ** 2 * cols * rows, f"a {cols}x{rows} grid of {image_size}-pixel "
                  "tiles", "use a smaller input_size or max_num")
    resized = image.resize((image_size * cols, image_size * rows))  # PIL default filter = BICUBIC for RGB
    tiles = [resized.crop(((k % cols) * image_size, (k // cols) * image_size,
                           (k % cols + 1) * image_size, (k // cols + 1) * image_size))
             for k in range(cols * rows)]  # row-major
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))  # thumbnail last
    return tiles

# -----------------------------------------------------------------------------
# per-tile transform and image loading

def to_tensor(image, image_size=448):
    """One tile -> (3, 448, 448) float32: RGB, Resize((448, 448), BICUBIC), ToTensor, Normalize(ImageNet mean/std)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (image_size, image_size):  # T.Resize((448,448), BICUBIC); same-size is a copy in PIL
        image = image.resize((image_size, image_size), Image.BICUBIC)
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)  # (3, H, W) ToTensor
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return (x - mean) / std  # Normalize, float32


def to_image(x: torch.Tensor):
    """The inverse of to_tensor, for pictures: (3, H, W) normalized -> PIL RGB image."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    rgb = (x.float().cpu() * std + mean).clamp(0, 1).mul(255).round().byte()  # (3, H, W)
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())

def _path(path, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a file path (str or Path){' or a PIL image' * (what == 'image')}, "
                        f"got {type(path).__name__}")
    return Path(path)

def open_image(path):
    """An image file -> RGB PIL image. PIL's decompression-bomb check stays on; above its limit nanovl refuses the
    image (where PIL would only warn) before decoding it."""
    path = _path(path, "image")
    if not path.is_file():
        raise NanovlError(f"image file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.convert("RGB")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:  # checked below, unchained
        pixels = re.search(r"\((\d+) pixels\)", str(e))
    except Exception as e:  # UnidentifiedImageError, truncated file, ...
        raise NanovlError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    limits.within("MAX_IMAGE_PIXELS", int(pixels[1]) if pixels else 0, f"image {path}", "use a smaller image")
    raise NanovlError(f"image {path} is over PIL's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS)")

def load_image(image, max_num=12, input_size=448, use_thumbnail=True, min_num=1):
    """An image file (or PIL image) -> (tiles, 3, 448, 448), with the reference's defaults (max_num=12, thumbnail).
    `model.load_image(path)` uses the checkpoint's own settings instead (InternVL-Chat-V1-2: a single tile)."""
    image = image.convert("RGB") if isinstance(image, Image.Image) else open_image(image)  # (type checked there)
    tiles = dynamic_preprocess(image, min_num, max_num, input_size, use_thumbnail)
    return torch.stack([to_tensor(t, input_size) for t in tiles])  # (tiles, 3, 448, 448)

# -----------------------------------------------------------------------------
# video: PyAV in place of the reference's decord

def get_index(bound, fps, max_frame, first_idx=0, num_segments=32):
    """The frame indices the reference samples: the middle of num_segments equal segments of [bound] (seconds)."""
    if num_segments < 1:
        raise NanovlError(f"num_segments must be >= 1, got {num_segments}")
    start, end = (bound[0], bound[1]) if bound else (-100000, 100000)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg = float(end_idx - start_idx) / num_segments
    return [int(start_idx + seg / 2 + np.round(seg * k)) for k in range(num_segments)]  # np.round: half-to-even

def read_frames(path, pick) -> list:
    """The frames of a video file chosen by pick(n_frames, fps) -> frame indices, as RGB PIL images in that order."""
    import av  # imported here: nanovl needs PyAV only for video

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise NanovlError(f"no video stream in {path}")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            n = stream.frames  # len(vr): the container's frame count ...
            if not n:  # ... else count the video packets and rewind
                n = sum(p.size > 0 for p in container.demux(stream))
                container.seek(0, stream=stream)
            if n == 0:
                raise NanovlError(f"video has no frames: {path}")
            indices = list(pick(n, float(stream.average_rate or stream.guessed_rate or 0)))
            if not indices or not 0 <= min(indices) <= max(indices) < n:
                raise NanovlError(f"frames {indices[:3]}... are outside the video's 0..{n - 1}: {path}")
            wanted, last, frames = set(indices), max(indices), {}
            for i, frame in enumerate(container.decode(stream)):  # decode order = presentation order, like decord
                if i in wanted:
                    frames[i] = frame.to_image()  # RGB PIL image; only the selected frames stay in memory
                if i == last:
                    break
    except av.error.FFmpegError as e:
        raise NanovlError(f"cannot read video {path}: {e}") from None
    missing = [i for i in indices if i not in frames]
    if missing:
        raise NanovlError(f"video {path} ended before frame {missing[0]} ({n} frames declared)")
    return [frames[i] for i in indices]


def load_video(path, num_segments=8, max_num=1, bound=None, input_size=448):
    """A video file -> (pixel_values (frames x tiles, 3, 448, 448), tiles of each frame): num_segments frames sampled
    as the reference does, each tiled with max_num (1: one 448 tile per frame, as in the model cards); bound: (start,
    end) in seconds. num_segments is bounded by limits.MAX_FRAMES, checked before anything is decoded."""
    limits.within("MAX_FRAMES", limits.whole(num_segments, "num_segments", 1), "num_segments", "sample fewer frames")
    limits.within("MAX_TILES", limits.whole(max_num, "max_num", 1), "max_num", "use fewer tiles")
    if bound is not None:
        if not isinstance(bound, (tuple, list)) or len(bound) != 2:
            raise TypeError(f"bound must be (start, end) in seconds, got {bound!r}")
        start, end = limits.number(bound[0], "bound start"), limits.number(bound[1], "bound end")
        if start >= end:
            raise NanovlError(f"bound {tuple(bound)} is empty: give (start, end) seconds with start < end")
    if not _path(path, "video").is_file():
        raise NanovlError(f"video file not found: {path}")
    pixel_values, num_patches_list = [], []
    def pick(n, fps):
        if not fps and bound is not None:
            raise NanovlError(f"video {path} declares no frame rate: it cannot be cut at seconds (bound)")
        return get_index(bound, fps or 1.0, n - 1, first_idx=0, num_segments=num_segments)  # no rate: every frame
    for frame in read_frames(path, pick):
        tiles = load_image(frame, max_num=max_num, input_size=input_size, use_thumbnail=True)
        pixel_values.append(tiles)
        num_patches_list.append(tiles.shape[0])
    return torch.cat(pixel_values), num_patches_list  # (sum tiles, 3, 448, 448), tiles per frame
