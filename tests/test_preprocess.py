"""Preprocessing tests: tiling rule (spec section 4.1), bit-exact pixels (4.2, golden bins), video sampling (4.4), errors.

Expected values are computed here from the SPEC TEXT (shared/reference/vision-and-chat.md section 4),
independently of nanovl.preprocess.
"""
import io
import math
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from nanovl.errors import NanovlError
from nanovl.preprocess import (IMAGENET_MEAN, IMAGENET_STD, closest_grid, dynamic_preprocess, find_closest_aspect_ratio,
                               get_index, load_image, load_video, to_tensor)

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
EXAMPLES = ASSETS / "media" / "internvl_examples"
GOLDEN = ASSETS / "reference_outputs" / "internvl3_5_1b_vit_projector"
VIDEO = EXAMPLES / "red-panda.mp4"
S = 448


def asset(path):
    if not path.exists():
        pytest.skip(f"asset not available: {path}")
    return path

# -----------------------------------------------------------------------------
# spec oracles (written from the spec text, not from the module)

def spec_candidates(max_num, min_num=1, width_major=False):
    if width_major:  # the HF `get_optimal_tiled_canvas` order (spec 8.5): loops, then a stable sort by area
        grids = [(i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1) if min_num <= i * j <= max_num]
    else:  # spec 4.1 step 2: a set, then sorted by area (stable sort; set order within one area)
        grids = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                    if min_num <= i * j <= max_num)
    return sorted(grids, key=lambda g: g[0] * g[1])

def spec_grid(W, H, cands):
    aspect, best, best_diff = W / H, (1, 1), math.inf
    for i, j in cands:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and W * H > 0.5 * S * S * i * j:
            best = (i, j)
    return best

def spec_tensor(img):  # torchvision ToTensor() + Normalize(ImageNet), as stated in the brief
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean[:, None, None]) / std[:, None, None]

def noise_image(W, H, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8))

# -----------------------------------------------------------------------------
# tiling

MAX_NUMS = (1, 6, 12, 24, 40)
SIDES = sorted(set(range(1, 5001, 97)) | {2, 3, 224, 447, 448, 449, 500, 747, 896, 1000, 1344, 1792, 2000, 4999, 5000})
EXTREME = [(1, 5000), (5000, 1), (2, 5000), (5000, 3), (40, 1), (1, 40), (100, 4000), (4000, 100), (12000, 1000)]

def test_constants():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)

@pytest.mark.parametrize("max_num", MAX_NUMS)
def test_grid_sweep_matches_spec(max_num):
    cands, cands_hf = spec_candidates(max_num), spec_candidates(max_num, width_major=True)
    sizes = [(w, h) for w in SIDES for h in SIDES] + EXTREME
    for W, H in sizes:
        want = spec_grid(W, H, cands)
        assert closest_grid(W, H, 1, max_num, S) == want, (W, H, max_num)
        assert find_closest_aspect_ratio(W / H, cands, W, H, S) == want, (W, H, max_num)
        assert want[0] * want[1] <= max_num
        assert spec_grid(W, H, cands_hf) == want, (W, H, max_num)  # spec 8.5: HF order agrees on this sweep

def test_worked_example_and_tie_breaks():
    assert spec_grid(1000, 1000, spec_candidates(12)) == (3, 3)  # spec 4.1 worked example
    assert closest_grid(1000, 1000, max_num=12) == (3, 3)
    assert closest_grid(1000, 1000, max_num=6) == (2, 2)   # 3x3 not allowed; 1e6 > 401408 -> 2x2 over 1x1
    assert closest_grid(633, 633, max_num=12) == (1, 1)    # 400689 < 401408: tie keeps 1x1
    assert closest_grid(634, 634, max_num=12) == (2, 2)    # 401956 > 401408: tie goes to 2x2
    assert closest_grid(1800, 900, max_num=12) == (4, 2)   # 1.62e6 > 802816
    assert closest_grid(896, 448, max_num=12) == (2, 1)    # 401408 < 802816: keeps 2x1
    assert closest_grid(448, 448, max_num=1) == (1, 1) and closest_grid(5000, 1, max_num=1) == (1, 1)

@pytest.mark.parametrize("W,H,max_num", [(1000, 1000, 12), (1000, 747, 12), (1800, 900, 12), (300, 200, 6),
                                         (5000, 1, 40), (1, 3000, 24), (900, 700, 1), (640, 480, 40)])
def test_tiles_row_major_and_thumbnail(W, H, max_num):
    img = noise_image(W, H)
    c, r = spec_grid(W, H, spec_candidates(max_num))
    tiles = dynamic_preprocess(img, max_num=max_num, image_size=S, use_thumbnail=True)
    assert len(tiles) == c * r + (1 if c * r > 1 else 0)
    assert all(t.size == (S, S) for t in tiles)
    big = np.array(img.resize((S * c, S * r), Image.BICUBIC))  # (448r, 448c, 3)
    for k in range(c * r):
        row, col = divmod(k, c)
        assert np.array_equal(np.array(tiles[k]), big[row * S:(row + 1) * S, col * S:(col + 1) * S]), k
    if c * r > 1:
        assert np.array_equal(np.array(tiles[-1]), np.array(img.resize((S, S), Image.BICUBIC)))
    assert len(dynamic_preprocess(img, max_num=max_num, use_thumbnail=False)) == c * r

def test_example_image_tile_count():
    path = asset(EXAMPLES / "image1.jpg")
    with Image.open(path) as im:
        assert im.size == (1000, 747)
    c, r = spec_grid(1000, 747, spec_candidates(12))
    assert (c, r) == (4, 3)  # 1000/747 = 1.3387, closest to 4/3
    pv = load_image(path, max_num=12)
    assert pv.shape == (c * r + 1, 3, S, S) == (13, 3, S, S) and pv.dtype == torch.float32

# -----------------------------------------------------------------------------
# pixels

@pytest.mark.parametrize("name", ["cat", "dog"])
def test_pixel_values_bit_exact_golden(name):
    golden = torch.from_numpy(np.fromfile(asset(GOLDEN / f"{name}_pixel_values_fp32.bin"), dtype=np.float32))
    golden = golden.reshape(1, 3, S, S)
    pv = load_image(asset(GOLDEN / f"{name}.jpg"), max_num=1)
    assert pv.shape == (1, 3, S, S) and pv.dtype == torch.float32
    assert torch.equal(pv, golden)
    with Image.open(GOLDEN / f"{name}.jpg") as im:  # a PIL image in gives the same result as a path
        assert torch.equal(load_image(im, max_num=1), golden)

def test_to_tensor_matches_torchvision_formula():
    img = noise_image(S, S, seed=1)
    assert torch.equal(to_tensor(img), spec_tensor(img))
    img = noise_image(613, 301, seed=2)
    assert torch.equal(to_tensor(img), spec_tensor(img.resize((S, S), Image.BICUBIC)))
    gray = noise_image(S, S, seed=3).convert("L")
    assert torch.equal(to_tensor(gray), spec_tensor(gray.convert("RGB")))

# -----------------------------------------------------------------------------
# video

def spec_index(bound, fps, max_frame, n):
    start, end = bound if bound else (-100000, 100000)
    s, e = max(0, round(start * fps)), min(round(end * fps), max_frame)
    seg = (e - s) / n
    return [int(s + seg / 2 + np.round(seg * k)) for k in range(n)]

def test_get_index_red_panda():
    with av.open(str(asset(VIDEO))) as c:
        st = c.streams.video[0]
        n_frames, avg_fps = st.frames, float(st.average_rate)
    assert n_frames == 895 and abs(avg_fps - 30) < 1e-3
    # by hand: seg = 894/8 = 111.75; k=6 -> 55.875 + np.round(670.5) = 55.875 + 670 (half-to-even) -> 725
    assert get_index(None, 30, 894, num_segments=8) == [55, 167, 279, 390, 502, 614, 725, 837]
    for fps in (30, avg_fps):
        for n in (8, 32):
            for bound in (None, (2.0, 20.0), (0.5, 29.9), (10, 1000)):
                got = get_index(bound, fps, n_frames - 1, first_idx=0, num_segments=n)
                assert got == spec_index(bound, fps, n_frames - 1, n), (fps, n, bound)
                assert len(got) == n and all(0 <= i <= 894 for i in got)

def decode_frame(path, index):  # independent PyAV decode of one frame, straight to the reference transform
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i == index:
                img = Image.fromarray(frame.to_ndarray(format="rgb24")).convert("RGB")
                return spec_tensor(img.resize((S, S), Image.BICUBIC))

def test_load_video_red_panda():
    pv, num_patches = load_video(asset(VIDEO), num_segments=8)
    assert pv.shape == (8, 3, S, S) and pv.dtype == torch.float32 and num_patches == [1] * 8
    # frame k=3 is index 390; its neighbours must not match
    assert torch.equal(pv[3], decode_frame(VIDEO, 390))
    assert not torch.equal(pv[3], decode_frame(VIDEO, 389)) and not torch.equal(pv[3], decode_frame(VIDEO, 391))

def test_load_video_without_frame_count(tmp_path):
    # remux to Matroska, which stores no frame count: len(vr) falls back to counting the video packets
    src = av.open(str(asset(VIDEO)))
    out = av.open(str(tmp_path / "rp.mkv"), "w")
    ost = out.add_stream_from_template(src.streams.video[0])
    for pkt in src.demux(src.streams.video[0]):
        if pkt.dts is not None:
            pkt.stream = ost
            out.mux(pkt)
    out.close()
    src.close()
    with av.open(str(tmp_path / "rp.mkv")) as c:
        assert c.streams.video[0].frames == 0
    pv, num_patches = load_video(tmp_path / "rp.mkv", num_segments=4)
    assert torch.equal(pv, load_video(VIDEO, num_segments=4)[0]) and num_patches == [1] * 4

def test_load_video_tiled_and_bound():
    pv, num_patches = load_video(asset(VIDEO), num_segments=2, max_num=6, bound=(0, 5))
    # 360x640 portrait (0.5625) with max 6 -> 1x2 grid + thumbnail per frame
    assert spec_grid(360, 640, spec_candidates(6)) == (1, 2)
    assert num_patches == [3, 3] and pv.shape == (6, 3, S, S)

# -----------------------------------------------------------------------------
# errors

def _jpeg_bytes():
    buf = io.BytesIO()
    noise_image(300, 200).save(buf, "JPEG")
    return buf.getvalue()

def _assert_clean(excinfo):  # one line, no raw PIL/av exception chained in
    assert "\n" not in str(excinfo.value)
    assert excinfo.value.__cause__ is None
    assert excinfo.value.__context__ is None or excinfo.value.__suppress_context__

def test_image_errors(tmp_path):
    jpg = _jpeg_bytes()
    (tmp_path / "text.jpg").write_text("this is not an image")
    (tmp_path / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (tmp_path / "corrupt.jpg").write_bytes(jpg[:20] + bytes(500))
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ["missing.jpg", "text.jpg", "trunc.jpg", "corrupt.jpg", "empty.png", "."]:
        with pytest.raises(NanovlError) as e:
            load_image(tmp_path / name)
        _assert_clean(e)

def test_video_errors(tmp_path):
    (tmp_path / "text.mp4").write_text("this is not a video")
    with wave.open(str(tmp_path / "audio.wav"), "wb") as w:  # audio only: no video stream
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(16000))
    (tmp_path / "zero.y4m").write_bytes(b"YUV4MPEG2 W64 H64 F30:1 Ip A1:1 C420jpeg\n")  # video stream, 0 frames
    for name in ["missing.mp4", "text.mp4", "audio.wav", "zero.y4m"]:
        with pytest.raises(NanovlError) as e:
            load_video(tmp_path / name)
        _assert_clean(e)
    for bound in [(100, 200)]:  # starts past the end of the 30 s clip
        with pytest.raises(NanovlError) as e:
            load_video(asset(VIDEO), bound=bound)
        _assert_clean(e)
    if VIDEO.exists():
        (tmp_path / "trunc.mp4").write_bytes(VIDEO.read_bytes()[:200_000])  # header says 895 frames, data stops early
        with pytest.raises(NanovlError) as e:
            load_video(tmp_path / "trunc.mp4")
        _assert_clean(e)

def test_num_segments_errors():
    for n in (0, -1):
        with pytest.raises(NanovlError):
            get_index(None, 30, 894, num_segments=n)
        with pytest.raises(NanovlError):
            load_video(VIDEO, num_segments=n)
