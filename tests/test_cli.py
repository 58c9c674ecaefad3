"""`python -m nanovl.generate` end to end, as a subprocess, on tiny checkpoints with a real tokenizer.

Each run's answer must equal the Python API called with the prompt the reference would build for it (several
images, video frames, history, system message), so the CLI is checked against the spec, not against itself.
Every bad input exits with status 2 and one `error:` line on stderr, no traceback (the core issue's cases as
subprocesses, the others through main() in-process to keep the run short).
"""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import fixtures as fx

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
EXAMPLES = ASSETS / "media" / "internvl_examples"
if not fx.TOKENIZERS.is_dir() or not EXAMPLES.is_dir():
    pytest.skip(f"shared assets not available: {ASSETS}", allow_module_level=True)
IMG1, IMG2, VIDEO = EXAMPLES / "image1.jpg", EXAMPLES / "image2.jpg", EXAMPLES / "red-panda.mp4"
S = 56  # the tiny checkpoints' image_size


def cli(*args, stdin=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOVL_WEIGHTS": "/nonexistent-weights"}
    return subprocess.run([sys.executable, "-m", "nanovl.generate", *map(str, args)], input=stdin, env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    """A tiny Qwen2 checkpoint with the InternVL2.5 tokenizer (template internvl2_5), and the same model in-process."""
    import nanovl

    path, _, _ = make_ckpt("qwen2", "300m", seed=60, tokenizer_dir="InternVL2_5-1B-MPO")
    return path, nanovl.load(path, dtype=torch.float32, device="cpu")


def stat_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("[") and "decode" in line]


# ---------------------------------------------------------------------------------------------
# end to end


def test_chat_two_images_system_verbose(ckpt, runs):
    """--image a b --chat --system --verbose --max-tokens, two turns on stdin: each answer equals chat() with the
    reference's separate-images prompt ('Image-1: <image>\\nImage-2: <image>\\n' + question) and the history."""
    import nanovl

    path, model = ckpt
    r = runs["chat"].result()
    assert r.returncode == 0, r.stderr
    a, b = nanovl.load_image(IMG1, max_num=12, input_size=S), nanovl.load_image(IMG2, max_num=12, input_size=S)
    pv, patches = torch.cat([a, b]), [len(a), len(b)]
    q1 = "Image-1: <image>\nImage-2: <image>\nWhat differs?"
    kw = dict(num_patches_list=patches, system_message="Answer briefly.", max_new_tokens=5)
    raw1 = "".join(model.stream(q1, pv, **kw))
    history = [(q1, raw1.strip())]
    raw2 = "".join(model.stream("And the colours?", pv, history, **kw))
    # input() writes its "> " prompt to stdout; the empty line is skipped; streamed answers end with a newline
    assert r.stdout == f"> {raw1}\n> > {raw2}\n> "
    stats = stat_lines(r.stderr)
    assert len(stats) == 2, r.stderr  # one statistics line per turn
    for line in stats:
        assert f"{sum(patches)} tiles {patches}" in line and "decode 5 tokens" in line and "peak memory" in line
    assert "Traceback" not in r.stderr


def test_video_frames_no_stream(ckpt, runs):
    """--video --frames 3: the reference's 'Frame1: <image>\\n...' prompt, one tile per frame."""
    import nanovl

    path, model = ckpt
    r = runs["video"].result()
    assert r.returncode == 0, r.stderr
    pv, patches = nanovl.load_video(VIDEO, num_segments=3, input_size=S)
    expected = model.chat("Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nWhat is happening?", pv,
                          num_patches_list=patches, max_new_tokens=4)
    assert r.stdout == expected + "\n"
    assert "3 tiles [1, 1, 1]" in stat_lines(r.stderr)[0]


def test_single_image_no_thumbnail_max_tiles(ckpt, runs):
    """--max-tiles 4 --no-thumbnail: a 1000x747 image becomes a 2x2 grid and no thumbnail; the default question."""
    import nanovl

    path, model = ckpt
    r = runs["image"].result()
    assert r.returncode == 0, r.stderr
    pv = nanovl.load_image(IMG1, max_num=4, input_size=S, use_thumbnail=False)
    assert len(pv) == 4
    assert r.stdout == "".join(model.stream("<image>\nDescribe this image.", pv, max_new_tokens=3)) + "\n"
    assert "4 tiles [4]" in stat_lines(r.stderr)[0]


# ---------------------------------------------------------------------------------------------
# bad input: status 2, one clear line, no traceback

# name -> (arguments, text the error line must contain); paths are formatted with the fixture's dirs
BAD = {
    "missing image": (["--model", "{bare}", "--image", "{d}/nope.jpg"], "image file not found"),
    "unreadable image": (["--model", "{bare}", "--image", "{d}/not-an-image.jpg"], "cannot read image"),
    "missing model dir": (["--model", "{d}/no-such-dir"], "no such checkpoint directory"),
    "mistyped local dir (no hub id)": (["--model", "{d}/empty-dir/../no-such-dir"], "no such checkpoint directory"),
    "unknown hub id, offline": (["--model", "NoSuchOwner-nanovl/NoSuchModel"],
                                "NoSuchOwner-nanovl/NoSuchModel is not a local directory, and downloading it"),
    "model dir without config": (["--model", "{d}/empty-dir"], "no config.json"),
    "unknown architecture": (["--model", "{d}/gpt2"], "unsupported language model architecture 'GPT2LMHeadModel'"),
    "no tokenizer": (["--model", "{bare}", "--prompt", "Hi"], "no tokenizer files"),
    "missing video": (["--model", "{bare}", "--video", "{d}/nope.mp4"], "video file not found"),
    "unreadable video": (["--model", "{bare}", "--video", "{d}/garbage.mp4"], "cannot read video"),
    "empty video": (["--model", "{bare}", "--video", "{d}/empty.mp4"], "video"),
    "image and video": (["--model", "{bare}", "--image", str(IMG1), "--video", str(VIDEO)], "not both"),
    "zero frames": (["--model", "{bare}", "--video", str(VIDEO), "--frames", "0"], "--frames must be >= 1, got 0"),
    "too many tiles": (["--model", "{bare}", "--image", str(IMG1), "--max-tiles", "100"],
                       "--max-tiles is 100 tiles, over the limit of 40"),
    "more placeholders than images": (["--model", "{tok}", "--image", str(IMG1), "--prompt", "Compare <image> and <image>"],
                                      "3 <image> placeholder(s) but 1 image(s)"),
    "prompt longer than the context": (["--model", "{small}", "--prompt", "word " * 200], "but the model's context is 96"),
    "image tokens overflow the context": (["--model", "{small}", "--image", str(IMG1)],
                                          "(52 of them image tokens) but the model's context is 96"),
}
# run as real processes (the core issue's list, plus the context check); the rest call main() in-process, where an
# exception other than SystemExit would fail the test just as a traceback would
SUBPROCESS = {"missing image", "unreadable image", "missing model dir", "unknown architecture",
              "prompt longer than the context"}


@pytest.fixture(scope="module")
def dirs(ckpt, make_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "not-an-image.jpg").write_text("hello")
    (d / "garbage.mp4").write_bytes(os.urandom(4096))
    (d / "empty.mp4").write_bytes(b"")
    (d / "empty-dir").mkdir()
    fx.write_checkpoint(d / "gpt2", "qwen2", "300m")
    cfg = fx.read_config(d / "gpt2")
    cfg["llm_config"]["architectures"] = ["GPT2LMHeadModel"]
    fx.write_config(cfg, d / "gpt2")
    return dict(d=d, tok=ckpt[0],
                bare=make_ckpt("qwen2", "300m", seed=61)[0],  # no tokenizer files: fast to load for the media errors
                small=make_ckpt("qwen2", "300m", seed=62, tokenizer_dir="InternVL2_5-1B-MPO",
                                llm_config={"max_position_embeddings": 96})[0])


def bad_args(case, dirs):
    return [a.format(**dirs) for a in BAD[case][0]]


@pytest.fixture(scope="module")
def runs(ckpt, dirs):
    """Every subprocess run of this module, started at once, 4 at a time (independent, and they mostly wait on
    imports and disk): name -> Future of the CompletedProcess."""
    path = ckpt[0]
    good = {
        "chat": (["--model", path, "--image", IMG1, IMG2, "--chat", "--system", "Answer briefly.", "--verbose",
                  "--max-tokens", 5], "What differs?\n\nAnd the colours?\n"),
        "video": (["--model", path, "--video", VIDEO, "--frames", 3, "--prompt", "What is happening?", "--max-tokens", 4,
                   "--no-stream", "--verbose"], None),
        "image": (["--model", path, "--image", IMG1, "--max-tiles", 4, "--no-thumbnail", "--max-tokens", 3,
                   "--verbose"], None),
        **{case: (bad_args(case, dirs), None) for case in sorted(SUBPROCESS)},
    }
    with ThreadPoolExecutor(4) as pool:
        yield {name: pool.submit(cli, *args, stdin=stdin) for name, (args, stdin) in good.items()}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line(case, runs, dirs, capsys):
    if case in SUBPROCESS:
        r = runs[case].result()
        code, out, err = r.returncode, r.stdout, r.stderr
    else:
        from nanovl.cli import main

        with pytest.raises(SystemExit) as e:
            main(bad_args(case, dirs))
        code, (out, err) = e.value.code, capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("downloading ")]  # progress
    assert code == 2, f"exit {code}\n{err}"
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: ") and BAD[case][1] in lines[0], lines[0]
    assert out == ""


def test_int8_flag_runs_the_quantized_decoder(ckpt):
    """--int8 swaps the decoder's linears for int8 weight-only ones (the ViT stays): the CLI answers with the
    same tokens as quantize_int8() applied in-process."""
    import nanovl
    from nanovl.quantize import quantize_int8

    path, _ = ckpt
    r = cli("--model", path, "--image", IMG1, "--prompt", "Hi", "--max-tokens", "4", "--int8", "--no-stream",
            "--dtype", "fp32")  # the in-process model below is fp32 (the CLI default depends on the CPU)
    assert r.returncode == 0, r.stderr
    model = nanovl.load(path, dtype=torch.float32)
    quantize_int8(model.language_model)
    pv = nanovl.load_image(IMG1, max_num=model.config.max_dynamic_patch, input_size=S)
    assert r.stdout == model.chat("<image>\nHi", pv, max_new_tokens=4) + "\n"
