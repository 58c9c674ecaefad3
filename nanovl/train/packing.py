"""Packed sequences (--use-packed-ds), as the original's PackedDataset (internvl/train/dataset_packed.py): samples are
put into buffers of at most --max-packed-tokens tokens and --num-images-expected tiles, and a buffer becomes one
training row when it is full. Each sample keeps its own positions (0, 1, ...) and attends only to itself
(block-diagonal causal attention); an over-long buffer is cut at the token limit but never inside an
<img>...</img> block; the loss weights of --loss-reduction count each packed sample's own learned tokens.
"""
import bisect

import torch

from nanovl.template import IGNORE, IMG_CONTEXT, IMG_END, IMG_START

TOKEN_KEYS = ("input_ids", "labels", "position_ids", "segment_ids", "tiles_before")
TILE_KEYS = ("pixel_values", "image_flags")


class Packer:
    """Feed samples with add(); full buffers come out as packed rows {"input_ids", "labels", "position_ids",
    "segment_ids" (L,), "pixel_values" (tiles, 3, H, W), "image_flags" (tiles,)}; flush() empties the buffers at the
    end of the data. The rules are the original's find_buffer / split_buffer / update_buffer_list / __iter__."""

    def __init__(self, tokenizer, num_image_token=256, max_packed_tokens=8192, num_images_expected=40,
                 max_buffer_size=20, strict_mode=True, allow_overflow=False):
        self.num_image_token, self.max_tokens, self.max_tiles = num_image_token, max_packed_tokens, num_images_expected
        self.max_buffer_size, self.strict_mode, self.allow_overflow = max_buffer_size, strict_mode, allow_overflow
        self.img_start, self.img_context, self.img_end = (tokenizer.token_to_id(t) for t in (IMG_START, IMG_CONTEXT,
                                                                                               IMG_END))
        self.buffers = []  # sorted by number of tiles, most first

    def add(self, sample: dict) -> list:
        """A sample from SupervisedDataset -> the rows it completes (often none)."""
        sample = {**{k: sample[k] for k in TOKEN_KEYS[:3] + TILE_KEYS},
                  "segment_ids": torch.zeros_like(sample["input_ids"]), "tiles_before": self._tiles_before(sample)}
        buffer = self._take(sample)
        if buffer is not None:  # sample goes after the buffer's samples, as the next segment
            sample["segment_ids"] += int(buffer["segment_ids"][-1]) + 1
            sample["tiles_before"] += len(buffer["pixel_values"])
            sample = {k: torch.cat([buffer[k], sample[k]]) for k in buffer}
        full = []
        for piece in self._split(sample):
            if len(piece["pixel_values"]) > self.max_tiles:
                continue  # more tiles than a row may hold: the original drops it (with an error log)
            if len(piece["input_ids"]) >= self.max_tokens:
                full.append(piece)
                continue
            at = next((i for i, b in enumerate(self.buffers) if len(b["pixel_values"]) < len(piece["pixel_values"])),
                      len(self.buffers))
            self.buffers.insert(at, piece)
        while self.buffers and len(self.buffers[0]["pixel_values"]) == self.max_tiles:
            full.append(self.buffers.pop(0))
        while len(self.buffers) > self.max_buffer_size:  # the one with most tiles
            full.append(self.buffers.pop(0))
        return [self._finish(b) for b in full]

    def flush(self) -> list:
        rows, self.buffers = [self._finish(b) for b in self.buffers], []
        return rows

    def _take(self, sample):
        """find_buffer: the first buffer (most tiles first) with room for the sample's tiles and tokens."""
        found = None
        for i, b in enumerate(self.buffers):
            if len(b["pixel_values"]) + len(sample["pixel_values"]) <= self.max_tiles:
                if len(b["input_ids"]) + len(sample["input_ids"]) <= self.max_tokens:
                    found = i
                    break
                if self.allow_overflow and len(self.buffers) >= self.max_buffer_size // 2:
                    found = i
        return None if found is None else self.buffers.pop(found)

    def _split(self, buf):
        """split_buffer: cut a buffer longer than max_tokens at max_tokens, or before the image block that straddles
        it; the rest restarts at the next <img> (the text between is dropped). Pieces without a tile or with <= 1/256
        learned tokens are dropped."""
        if len(buf["input_ids"]) <= self.max_tokens:
            return [buf]
        pieces, n = [], self.max_tokens
        while len(buf["input_ids"]) > n:
            ids, before = buf["input_ids"], buf["tiles_before"]
            starts = (ids == self.img_start).nonzero().squeeze(1).tolist()
            if int(ids[n]) in (self.img_start, self.img_context, self.img_end):  # n is inside an image block
                left = right = starts[bisect.bisect_left(starts, n) - (int(ids[n]) != self.img_start)]
            else:
                k = bisect.bisect(starts, n)
                left, right = n, (starts[k] if k < len(starts) else None)
            piece = self._cut(buf, 0, left, 0, len(buf["pixel_values"]) if right is None else int(before[left]))
            if len(piece["pixel_values"]) and self._valid(piece):
                pieces.append(piece)
            if right is None:
                break
            tiles = int(before[right])
            buf = self._cut(buf, right, None, tiles, None)
            buf["tiles_before"] = buf["tiles_before"] - tiles
            if not len(buf["pixel_values"]):
                break
            if len(buf["input_ids"]) <= n:
                if self._valid(buf):
                    pieces.append(buf)
                break
        return pieces

    def _tiles_before(self, sample) -> torch.Tensor:
        """(T,) the number of the sample's tiles that belong before each token: an image block's tiles count from
        its <img> on (num_image_token <IMG_CONTEXT> a tile), a pure-text sample's dummy tile from its second token."""
        ids, before = sample["input_ids"], torch.zeros_like(sample["input_ids"])
        if not int(sample["image_flags"].sum()):
            before[1:] = len(sample["pixel_values"])
            return before
        starts, ends = (ids == self.img_start).nonzero().squeeze(1), (ids == self.img_end).nonzero().squeeze(1)
        for s, e in zip(starts.tolist(), ends.tolist()):
            before[s + 1:] += (e - s - 1) // self.num_image_token
        return before

    @staticmethod
    def _cut(buf, a, b, ta, tb):
        return {k: (v[a:b] if k in TOKEN_KEYS else v[ta:tb]) for k, v in buf.items()}

    @staticmethod
    def _valid(piece, min_learned=1 / 256):
        return float((piece["labels"] != IGNORE).float().mean()) > min_learned

    def _finish(self, buf):
        """strict_mode: pad the tiles with black ones (image_flags 0) up to num_images_expected (pad_buffer)."""
        buf = {k: v for k, v in buf.items() if k != "tiles_before"}
        pad = self.max_tiles - len(buf["pixel_values"])
        if self.strict_mode and pad > 0:
            buf = dict(buf, pixel_values=torch.cat([buf["pixel_values"], buf["pixel_values"].new_zeros(
                pad, *buf["pixel_values"].shape[1:])]), image_flags=torch.cat([buf["image_flags"],
                                                                                buf["image_flags"].new_zeros(pad)]))
        return buf


def packed_collate(rows: list, max_packed_tokens: int = 0) -> dict:
    """One packed row per micro-batch (the original's rule) -> a (1, L) batch with segment_ids; with max_packed_tokens
    (the original's strict_mode) the row is padded to that length as one more, unlearned segment."""
    bad = {k: v for r in rows if "bad" in r for k, v in r["bad"].items()}
    rows = [r for r in rows if "bad" not in r]
    if not rows:
        return {"bad": bad} if bad else {}
    assert len(rows) == 1, "packed data takes one row per micro-batch (--per-device-batch-size 1)"
    r = rows[0]
    pad = max(0, max_packed_tokens - len(r["input_ids"]))
    seg = torch.cat([r["segment_ids"], r["segment_ids"].new_full((pad,), int(r["segment_ids"][-1]) + 1)])
    return dict(input_ids=torch.cat([r["input_ids"], r["input_ids"].new_zeros(pad)])[None],
                labels=torch.cat([r["labels"], r["labels"].new_full((pad,), IGNORE)])[None],
                position_ids=torch.cat([r["position_ids"], torch.arange(pad)])[None], segment_ids=seg[None],
                attention_mask=(torch.arange(len(seg)) < len(r["input_ids"]))[None],
                pixel_values=r["pixel_values"], image_flags=r["image_flags"], **({"bad": bad} if bad else {}))
