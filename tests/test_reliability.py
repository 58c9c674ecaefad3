"""Every bad input, hostile checkpoint and out-of-range option gives one clear error (issue 11), and the valid but
unusual inputs still work.

The bad inputs are one table (BAD): each case names the checkpoint it starts from ("bare": no tokenizer files, fast
to load; "tok": the InternVL2.5 tokenizer), what it breaks in a copy of it (a function of the copied folder), the
command line, and the phrase the one error line must contain. Each case runs through the command line (main() in
process: exit 2, ONE `error:` line, no traceback) and, where the case is a file or a checkpoint, through
nanovl.load() too (NanovlError with the same phrase). API cases are a second table (API_BAD), the training command
a third (TRAIN_BAD), and a few cases need a real process (Ctrl-C, closed pipes, bytes in argv and stdin).

Damaged files are written here from the safetensors format itself (8-byte little-endian header length, JSON header,
data), not with nanovl, so a bug in nanovl's reader cannot be mirrored by the test.
"""
import builtins
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fixtures as fx

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = fx.ASSETS / "media" / "internvl_examples"
if not fx.TOKENIZERS.is_dir() or not EXAMPLES.is_dir():
    pytest.skip(f"shared assets not available: {fx.ASSETS}", allow_module_level=True)
IMG, VIDEO = EXAMPLES / "image1.jpg", EXAMPLES / "red-panda.mp4"
S = fx.IMAGE_SIZE  # 56: the tiny checkpoints' tile size
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # ImageNet, as the model cards


def cli(*args, stdin=None, module="nanovl.generate", shell_suffix=None, timeout=120):
    """A real process; shell_suffix (e.g. '<&-') runs it through bash to close or redirect its standard streams."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOVL_WEIGHTS": "/nonexistent-weights"}
    cmd = [sys.executable, "-m", module, *map(str, args)]
    if shell_suffix:
        cmd = ["bash", "-c", " ".join(f"'{c}'" for c in cmd) + " " + shell_suffix]
    return subprocess.run(cmd, input=stdin, env=env, cwd=ROOT, capture_output=True, timeout=timeout)


def one_line(code, err, expected_code=2) -> str:
    """The rules of a refusal: the exit status, one line on stderr (no traceback) -> that line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code, f"exit {code}\n{err}"
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def run_main(argv, capsys, main=None):
    """main(argv) in this process -> (exit status, stdout, stderr). An exception other than SystemExit fails the test,
    as a traceback would."""
    if main is None:
        from nanovl.cli import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


# ---------------------------------------------------------------------------------------------
# checkpoints: one of each kind, shared by the module; a case that breaks files works on a copy


@pytest.fixture(scope="module")
def base(make_ckpt):
    """'bare': a tiny checkpoint without tokenizer files (vocab 512); 'tok': the same with the InternVL2.5 tokenizer
    (the checkpoint test_cli.py uses, so the session cache shares it)."""
    return {"bare": make_ckpt("qwen2", "300m", seed=70)[0],
            "tok": make_ckpt("qwen2", "300m", seed=60, tokenizer_dir="InternVL2_5-1B-MPO")[0]}


def read_st(file: Path) -> tuple[dict, bytes]:
    """A safetensors file -> (header dict, data bytes), from the format: u64 LE header length, JSON, data."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(file: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    file.write_bytes(len(h).to_bytes(8, "little") + h + data)


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def cut(fraction=None, keep=None):
    def f(d, tmp):
        st = d / "model.safetensors"
        raw = st.read_bytes()
        st.write_bytes(raw[:keep(raw) if keep else int(len(raw) * fraction)])
    return f


def header_length(n_of):
    def f(d, tmp):
        st = d / "model.safetensors"
        raw = st.read_bytes()
        st.write_bytes(n_of(len(raw)).to_bytes(8, "little") + raw[8:])
    return f


def edit_header(change):
    def f(d, tmp):
        header, data = read_st(d / "model.safetensors")
        change(header[first_tensor(header)], len(data))
        write_st(d / "model.safetensors", header, data)
    return f


def edit_named(name, change):
    def f(d, tmp):
        header, data = read_st(d / "model.safetensors")
        change(header[name], len(data))
        write_st(d / "model.safetensors", header, data)
    return f


def dtype_i32(t, size):
    assert t["dtype"] == "F32"  # the same bytes, read as integers: loaded as is, they broke load_state_dict
    t["dtype"] = "I32"


def offsets_past_end(t, size):
    t["data_offsets"] = [t["data_offsets"][0], size + 10 ** 12]  # a 1 TB tensor


def dtype_f64(t, size):
    assert t["dtype"] == "F32"  # the fixtures write fp32: as F64 the same bytes hold half the elements
    t["dtype"] = "F64"


def index(weight_map, text=None):
    def f(d, tmp):
        body = text if text is not None else json.dumps({"metadata": {}, "weight_map": weight_map(d, tmp)})
        (d / "model.safetensors.index.json").write_text(body)
    return f


def outside_checkpoint(d: Path, tmp: Path) -> Path:
    """A valid checkpoint at <tmp>/other/model.safetensors, i.e. ../../other/ seen from the case folder
    <tmp>/cases/<name>: nanovl would load it without complaint if it followed the path."""
    other = tmp / "other"
    other.mkdir(exist_ok=True)
    shutil.copy(d / "model.safetensors", other / "model.safetensors")
    return other / "model.safetensors"


def escape_relative(d, tmp):
    outside_checkpoint(d, tmp)
    keys = list(read_st(d / "model.safetensors")[0])
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../../other/model.safetensors" for k in keys if k != "__metadata__"}}))


def escape_absolute(d, tmp):
    target = outside_checkpoint(d, tmp)
    keys = list(read_st(d / "model.safetensors")[0])
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: str(target) for k in keys if k != "__metadata__"}}))


def escape_symlink(d, tmp):
    target = outside_checkpoint(d, tmp)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to(target)


class Unpickled:  # unpickling this (torch.load, pickle.load) writes the marker file next to the checkpoint
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def pickle_checkpoint(d, tmp):
    import pickle

    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Unpickled(d / "UNPICKLED")}))


def config(change=None, raw=None):
    def f(d, tmp):
        if raw is not None:
            (d / "config.json").write_bytes(raw)
            return
        cfg = json.loads((d / "config.json").read_text())
        change(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return f


def tokenizer_file(name, content, drop_json=False):
    """Replace one tokenizer file; drop_json: remove tokenizer.json so that vocab.json + merges.txt are used."""
    def f(d, tmp):
        if drop_json:
            (d / "tokenizer.json").unlink()
        (d / name).write_bytes(content)
    return f


def with_tokenizer_only(d, tmp):
    """The bare checkpoint's weights with the tokenizer files (a small copy to damage a tokenizer in)."""
    fx.copy_tokenizer(fx.TOKENIZERS / "InternVL2_5-1B-MPO", d)


NO_CUDA_DEVICE = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"

# name -> (base checkpoint, break(folder, tmp) or None, extra arguments, phrase the error line must contain, API too)
# "{d}" in the arguments is the case's checkpoint folder; --model {d} is added in front.
BAD = {
    # --- the safetensors file
    "safetensors cut in half": ("bare", cut(0.5), [], "model.safetensors: tensor", True),
    "safetensors cut inside its header": ("bare", cut(keep=lambda raw: 8 + int.from_bytes(raw[:8], "little") // 2),
                                          [], "is not a safetensors file (or is truncated)", True),
    "safetensors of zero bytes": ("bare", cut(keep=lambda raw: 0), [],
                                  "model.safetensors is not a safetensors file (or is truncated): header of 0 bytes in "
                                  "a 0-byte file", True),
    "header length 2**62": ("bare", header_length(lambda size: 2 ** 62), [], f"header of {2 ** 62} bytes", True),
    "header length larger than the file": ("bare", header_length(lambda size: size), [], "is not a safetensors file",
                                           True),
    "data offsets past the end (1 TB)": ("bare", edit_header(offsets_past_end), [],
                                         "outside the file or of the wrong size", True),
    "dtype whose size does not match the shape": ("bare", edit_header(dtype_f64), [],
                                                  "outside the file or of the wrong size", True),
    "header that is not JSON": ("bare", header_length(lambda size: 3), [], "corrupt safetensors header", True),
    "a weight stored as integers (mapped ViT tensor)": ("bare", edit_named("vision_model.embeddings.position_embedding",
                                                                         dtype_i32), [], "is stored as I32", True),
    "a weight stored as integers (decoder tensor)": ("bare", edit_named("language_model.lm_head.weight", dtype_i32), [],
                                                     "tensor language_model.lm_head.weight is stored as I32", True),
    # --- model.safetensors.index.json
    "index.json garbage": ("bare", index(None, text="this is { not JSON"), [],
                           "model.safetensors.index.json: not valid JSON", True),
    "index.json without weight_map": ("bare", index(None, text='{"metadata": {}}'), [], "has no weight_map", True),
    "weight_map names /etc/passwd": ("bare", index(lambda d, tmp: {"x": "/etc/passwd"}), [],
                                     "names '/etc/passwd' as a shard", True),
    "weight_map names ../../other/model.safetensors": ("bare", escape_relative, [],
                                                       "names '../../other/model.safetensors' as a shard", True),
    "weight_map names an absolute path to a valid file": ("bare", escape_absolute, [],
                                                          "other/model.safetensors' as a shard", True),
    "model.safetensors a symlink out of the folder": ("bare", escape_symlink, [], "outside the checkpoint folder", True),
    "pickle .bin checkpoint": ("bare", pickle_checkpoint, [], "has no *.safetensors files", True),
    # --- config.json
    "config.json invalid UTF-8": ("bare", config(raw=b'{"template": "\xff\xfe"}'), [],
                                  "config.json: not UTF-8 text (byte 0xff", True),
    "config.json a JSON list": ("bare", config(raw=b"[1, 2, 3]"), [], "config.json must hold a JSON object", True),
    "config.json missing hidden_size": ("bare", config(lambda c: c["llm_config"].pop("hidden_size")), [],
                                        "llm_config lacks hidden_size", True),
    "config.json number as a string": ("bare", config(lambda c: c["llm_config"].update(num_hidden_layers="2")), [],
                                       "llm_config.num_hidden_layers must be an int, got '2'", True),
    "config.json zero attention heads": ("bare", config(lambda c: c["llm_config"].update(num_attention_heads=0)), [],
                                         "llm_config.num_attention_heads must be positive, got 0", True),
    "config.json head_dim 0": ("bare", config(lambda c: c["llm_config"].update(head_dim=0)), [],
                               "llm_config.head_dim must be positive, got 0", True),
    "config.json zero key-value heads": ("bare", config(lambda c: c["llm_config"].update(num_key_value_heads=0)), [],
                                         "llm_config.num_key_value_heads must be positive, got 0", True),
    "config.json vision_config a list": ("bare", config(lambda c: c.update(vision_config=[1])), [],
                                         "config.json: vision_config must be a JSON object, got list", True),
    "config.json zero ViT heads": ("bare", config(lambda c: c["vision_config"].update(num_attention_heads=0)), [],
                                   "vision_config.num_attention_heads must be positive, got 0", True),
    "config.json absent": ("bare", lambda d, tmp: (d / "config.json").unlink(), [], "has no config.json", True),
    # --- tokenizer files (on the bare weights: the tokenizer is built after them)
    "vocab.json garbage": ("bare", lambda d, tmp: (with_tokenizer_only(d, tmp), tokenizer_file(
        "vocab.json", b"garbage", drop_json=True)(d, tmp)), ["--prompt", "Hi"], "vocab.json: not valid JSON", True),
    "vocab.json a JSON list": ("bare", lambda d, tmp: (with_tokenizer_only(d, tmp), tokenizer_file(
        "vocab.json", b"[1, 2]", drop_json=True)(d, tmp)), ["--prompt", "Hi"], "vocab.json must hold a JSON object",
        True),
    "tokenizer_config.json garbage": ("bare", lambda d, tmp: (with_tokenizer_only(d, tmp), tokenizer_file(
        "tokenizer_config.json", b"\x00\x01 nonsense")(d, tmp)), ["--prompt", "Hi"],
        "tokenizer_config.json: not valid JSON", True),
    "merges.txt invalid UTF-8": ("bare", lambda d, tmp: (with_tokenizer_only(d, tmp), tokenizer_file(
        "merges.txt", b"#version: 0.2\n\xc4\xa0 t\n\xff\xfe t\n", drop_json=True)(d, tmp)), ["--prompt", "Hi"],
        "merges.txt: not UTF-8 text (byte 0xff at offset 19)", True),
    "tokenizer.json of the wrong structure": ("bare", lambda d, tmp: (with_tokenizer_only(d, tmp), tokenizer_file(
        "tokenizer.json", b'{"model": {"type": "BPE", "vocab": [1, 2]}, "added_tokens": 7}')(d, tmp)),
        ["--prompt", "Hi"], "cannot build the tokenizer from tokenizer.json", True),
    "tokenizer.json a JSON string": ("bare", lambda d, tmp: (with_tokenizer_only(d, tmp), tokenizer_file(
        "tokenizer.json", b'"hello"')(d, tmp)), ["--prompt", "Hi"], "tokenizer.json must hold a JSON object", True),
    # --- options: checked before the checkpoint loads
    "--max-tokens -1": ("bare", None, ["--max-tokens", "-1"], "--max-tokens must be >= 0, got -1", False),
    "--top-p 0": ("bare", None, ["--top-p", "0"], "--top-p must be a finite number in (0, 1], got 0.0", False),
    "--top-p negative": ("bare", None, ["--top-p", "-0.5"], "--top-p must be a finite number in (0, 1], got -0.5",
                         False),
    "--top-p above 1": ("bare", None, ["--top-p", "1.5"], "--top-p must be a finite number in (0, 1]", False),
    "--temperature nan": ("bare", None, ["--temperature", "nan"], "--temperature must be a finite number", False),
    "--temperature inf": ("bare", None, ["--temperature", "inf"], "--temperature must be a finite number", False),
    "--temperature negative": ("bare", None, ["--temperature", "-1"], "--temperature must be a finite number >= 0",
                               False),
    "--top-k negative": ("bare", None, ["--top-k", "-3"], "--top-k must be >= 0, got -3", False),
    "--seed 2**70": ("bare", None, ["--seed", str(2 ** 70)], "--seed must be between 0 and", False),
    "--seed negative": ("bare", None, ["--seed", "-1"], "--seed must be between 0 and", False),
    "--device cuda without CUDA": ("bare", None, ["--device", NO_CUDA_DEVICE],
                                   f"--device {NO_CUDA_DEVICE} is not available on this machine", False),
    "--device banana": ("bare", None, ["--device", "banana"], "--device 'banana' is not a device", False),
    "--device meta": ("bare", None, ["--device", "meta"], "--device meta is not available", False),
    "--max-tiles 0": ("bare", None, ["--image", IMG, "--max-tiles", "0"], "--max-tiles must be >= 1, got 0", False),
    "--max-tiles -2": ("bare", None, ["--image", IMG, "--max-tiles", "-2"], "--max-tiles must be >= 1, got -2", False),
    "--frames 100000": ("bare", None, ["--video", VIDEO, "--frames", "100000"],
                        "--frames is 100,000 frames, over the limit of 256", False),
    "--frames -1": ("bare", None, ["--video", VIDEO, "--frames", "-1"], "--frames must be >= 1, got -1", False),
    "--max-tokens not a number": ("bare", None, ["--max-tokens", "ten"], "argument --max-tokens: invalid int value",
                                  False),
    "unknown option": ("bare", None, ["--bogus"], "unrecognized arguments: --bogus", False),
    "--dtype int8": ("bare", None, ["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'", False),
    "--image and --video": ("bare", None, ["--image", IMG, "--video", VIDEO], "give --image or --video, not both",
                            False),
    # --- text
    "prompt with an undecodable byte": ("bare", None, ["--prompt", "caf\udce9"],
                                        "--prompt is not valid UTF-8 text (the byte 0xe9 at character 3)", False),
    "prompt with a lone surrogate": ("bare", None, ["--prompt", "a\ud800b"],
                                     "--prompt is not valid UTF-8 text (a lone surrogate U+D800 at character 1)", False),
    "system message with a lone surrogate": ("bare", None, ["--system", "\udfff"], "--system is not valid UTF-8 text",
                                             False),
    "prompt over the character limit": ("bare", None, ["--prompt", "x" * 1_000_001], "over the limit of 1,000,000",
                                        False),
    # --- images and videos
    "image not found": ("bare", None, ["--image", "{d}/nope.jpg"], "image file not found", False),
    "image that is text": ("bare", lambda d, tmp: (d / "x.jpg").write_text("hello"), ["--image", "{d}/x.jpg"],
                           "cannot read image", False),
    "image truncated": ("bare", lambda d, tmp: (d / "x.jpg").write_bytes(IMG.read_bytes()[:2000]),
                        ["--image", "{d}/x.jpg"], "cannot read image", False),
    "image over the pixel limit": ("bare", lambda d, tmp: Image.new("L", (12000, 8000)).save(d / "big.png"),
                                   ["--image", "{d}/big.png"], "over the limit of 89,478,485", False),
    "video that is noise": ("bare", lambda d, tmp: (d / "v.mp4").write_bytes(os.urandom(4096)),
                            ["--video", "{d}/v.mp4"], "cannot read video", False),
    "video of zero bytes": ("bare", lambda d, tmp: (d / "v.mp4").write_bytes(b""), ["--video", "{d}/v.mp4"],
                            "cannot read video", False),
}


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("reliability")


def prepare(case, base, cases_dir) -> Path:
    """The case's checkpoint folder: the shared one, or a broken copy of it under <tmp>/<case>/cases/ckpt."""
    kind, breaks, *_ = BAD[case]
    if breaks is None:
        return base[kind]
    tmp = cases_dir / case.replace("/", "_").replace(" ", "_")
    d = tmp / "cases" / "ckpt"
    if not d.exists():
        shutil.copytree(base[kind], d)
        breaks(d, tmp)
    return d


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line(case, base, cases_dir, capsys, monkeypatch):
    """The command line: exit 2, one `error:` line naming what is wrong, nothing on stdout. A file case also through
    nanovl.load(): NanovlError with the same phrase. Nothing is ever unpickled, no video frame decoded."""
    import nanovl
    import nanovl.preprocess

    _, _, extra, phrase, api = BAD[case]
    d = prepare(case, base, cases_dir)

    def no_decoding(*a, **k):  # --frames is refused before a frame is read
        raise AssertionError("a video was decoded")

    if case == "--frames 100000":
        monkeypatch.setattr(nanovl.preprocess, "read_frames", no_decoding)
    code, out, err = run_main(["--model", d, *[str(a).format(d=d) for a in extra]], capsys)
    line = one_line(code, err)
    assert phrase in line, line
    assert out == ""
    if api:
        with pytest.raises(nanovl.NanovlError) as e:
            m = nanovl.load(d)
            if "--prompt" in extra:  # the tokenizer is built by load(); a prompt is what the CLI adds
                m.chat("Hi")
        assert phrase in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (d / "UNPICKLED").exists()


# ---------------------------------------------------------------------------------------------
# nothing outside the checkpoint folder is opened


@pytest.mark.parametrize("case", ["weight_map names ../../other/model.safetensors",
                                  "weight_map names an absolute path to a valid file",
                                  "model.safetensors a symlink out of the folder", "weight_map names /etc/passwd"])
def test_nothing_outside_the_folder_is_opened(case, base, cases_dir, monkeypatch):
    """The file the index or link points at is a valid checkpoint (it would load): nanovl refuses it, and no open()
    nor safe_open() of nanovl ever touches a path outside the folder."""
    import nanovl
    import nanovl.weights

    d = prepare(case, base, cases_dir)
    root, opened = d.resolve(), []

    def spy(real):
        def wrapped(file, *a, **k):
            if isinstance(file, (str, os.PathLike)):
                opened.append(Path(os.fspath(file)))
            return real(file, *a, **k)
        return wrapped

    for mod, name in ((builtins, "open"), (io, "open"), (nanovl.weights, "safe_open")):
        monkeypatch.setattr(mod, name, spy(getattr(mod, name)))
    with pytest.raises(nanovl.NanovlError):
        nanovl.load(d)
    monkeypatch.undo()
    ckpt_files = [p for p in opened if p.suffix in (".json", ".safetensors") or p == Path("/etc/passwd")]
    assert ckpt_files, "the spy saw no file at all: it is not wired in"
    outside = [p for p in ckpt_files if not p.resolve().is_relative_to(root)]
    assert not outside, outside


def test_the_escape_target_is_a_valid_checkpoint(base, cases_dir):
    """The premise of the test above: the outside file loads when it is given as a folder of its own."""
    import nanovl

    d = prepare("weight_map names ../../other/model.safetensors", base, cases_dir)
    other = d.parent.parent / "other"
    shutil.copy(d / "config.json", other / "config.json")
    assert nanovl.load(other).config.llm_config.hidden_size == fx.LLM_HIDDEN


# ---------------------------------------------------------------------------------------------
# the Python API: NanovlError (or TypeError / ValueError for a wrong type) with a clear phrase


@pytest.fixture(scope="module")
def model(base):
    import nanovl

    return nanovl.load(base["tok"], dtype=torch.float32)


def pv(*shape):
    return torch.zeros(*shape)


def call_image(**kw):
    import nanovl

    return nanovl.load_image(IMG, **kw)


def call_video(**kw):
    import nanovl

    return nanovl.load_video(VIDEO, **kw)


def call_load(base, **kw):
    import nanovl

    return nanovl.load(base["bare"], **kw)


# name -> (call(model, base), exception type, phrase)
API_BAD = {
    "load_image(max_num=10**6)": (lambda m, b: call_image(max_num=10 ** 6), "NanovlError",
                                  "max_num is 1,000,000 tiles, over the limit of 40"),
    "load_image(max_num=0)": (lambda m, b: call_image(max_num=0), "NanovlError", "max_num must be >= 1, got 0"),
    "load_image(max_num='12')": (lambda m, b: call_image(max_num="12"), TypeError, "max_num must be an int, got str"),
    "load_image(min_num > max_num)": (lambda m, b: call_image(max_num=2, min_num=3), "NanovlError",
                                      "min_num must be between 1 and 2, got 3"),
    "load_image(a number)": (lambda m, b: __import__("nanovl").load_image(42), TypeError,
                             "image must be a file path (str or Path) or a PIL image, got int"),
    "load_image(missing file)": (lambda m, b: __import__("nanovl").load_image("/nonexistent/x.png"), "NanovlError",
                                 "image file not found: /nonexistent/x.png"),
    "load_video(bound=(5, 1))": (lambda m, b: call_video(bound=(5, 1)), "NanovlError", "bound (5, 1) is empty"),
    "load_video(bound=(nan, 1))": (lambda m, b: call_video(bound=(float("nan"), 1)), "NanovlError",
                                   "bound start must be a finite number"),
    "load_video(bound=5)": (lambda m, b: call_video(bound=5), TypeError, "bound must be (start, end) in seconds"),
    "load_video(num_segments=10**5)": (lambda m, b: call_video(num_segments=10 ** 5), "NanovlError",
                                       "num_segments is 100,000 frames, over the limit of 256"),
    "load_video(num_segments=0)": (lambda m, b: call_video(num_segments=0), "NanovlError",
                                   "num_segments must be >= 1, got 0"),
    "chat with 3-D pixel_values": (lambda m, b: m.chat("Hi", pv(3, S, S)), "NanovlError",
                                   "one tile still needs its leading dimension"),
    "chat with empty pixel_values": (lambda m, b: m.chat("Hi", pv(0, 3, S, S)), "NanovlError", "it holds no tile"),
    "chat with pixel_values of another size": (lambda m, b: m.chat("Hi", pv(1, 3, 448, 448)), "NanovlError",
                                               f"this model takes (tiles, 3, {S}, {S})"),
    "chat with NaN pixel_values": (lambda m, b: m.chat("Hi", pv(1, 3, S, S) * float("nan")), "NanovlError",
                                   "pixel_values holds NaN or infinite values"),
    "chat with int pixel_values": (lambda m, b: m.chat("Hi", torch.zeros(1, 3, S, S, dtype=torch.uint8)),
                                   "NanovlError", "pixel_values is torch.uint8"),
    "chat with a list as pixel_values": (lambda m, b: m.chat("Hi", [[0.0]]), TypeError,
                                         "pixel_values must be a torch.Tensor"),
    "chat(max_new_tokens=-1)": (lambda m, b: m.chat("Hi", max_new_tokens=-1), "NanovlError",
                                "max_new_tokens must be >= 0, got -1"),
    "chat(max_new_tokens=2.5)": (lambda m, b: m.chat("Hi", max_new_tokens=2.5), TypeError,
                                 "max_new_tokens must be an int, got float"),
    "chat(top_p=0)": (lambda m, b: m.chat("Hi", top_p=0), "NanovlError", "top_p must be a finite number in (0, 1]"),
    "chat(temperature=nan)": (lambda m, b: m.chat("Hi", temperature=float("nan")), "NanovlError",
                              "temperature must be a finite number >= 0, got nan"),
    "chat(seed=2**70)": (lambda m, b: m.chat("Hi", seed=2 ** 70), "NanovlError", "seed must be between 0 and"),
    "chat(unknown option)": (lambda m, b: m.chat("Hi", do_sample=True), TypeError,
                             "unknown generation option(s) do_sample"),
    "chat(lone surrogate)": (lambda m, b: m.chat("a\ud800"), "NanovlError", "the question is not valid UTF-8 text"),
    "chat(bytes question)": (lambda m, b: m.chat(b"Hi"), TypeError, "a question must be a str, got bytes"),
    "chat(history of strings)": (lambda m, b: m.chat("Hi", history="abc"), TypeError,
                                 "history must be a list of (question, answer) pairs"),
    "chat(num_patches_list not adding up)": (lambda m, b: m.chat("Hi", pv(2, 3, S, S), num_patches_list=[1]),
                                             "NanovlError", "num_patches_list [1] does not add up to the 2 tiles"),
    "batch_chat([])": (lambda m, b: m.batch_chat([]), "NanovlError", "batch_chat got no questions"),
    "batch_chat('abc')": (lambda m, b: m.batch_chat("abc"), TypeError, "questions"),
    "generate() with an empty prompt": (lambda m, b: m.generate(torch.zeros(1, 0, dtype=torch.long)), "NanovlError",
                                        "input_ids must be integer token ids of shape (batch, tokens) with at least "
                                        "one token"),
    "generate() with ids outside the vocabulary": (lambda m, b: m.generate(torch.tensor([[10 ** 7]])), "NanovlError",
                                                   "input_ids holds the id 10000000, outside the model's vocabulary"),
    "generate() with float ids": (lambda m, b: m.generate(torch.zeros(1, 3)), "NanovlError",
                                  "input_ids must be integer token ids"),
    "generate() with a list": (lambda m, b: m.generate([[1, 2]]), TypeError, "input_ids must be a torch.Tensor"),
    "load(dtype=torch.int8)": (lambda m, b: call_load(b, dtype=torch.int8), "NanovlError",
                               "dtype torch.int8 is not supported"),
    "load(dtype='bf16')": (lambda m, b: call_load(b, dtype="bf16"), TypeError, "dtype must be a torch.dtype"),
    "load(device='cuda') without CUDA": (lambda m, b: call_load(b, device=NO_CUDA_DEVICE), "NanovlError",
                                         f"device {NO_CUDA_DEVICE} is not available on this machine"),
    "load(device='banana')": (lambda m, b: call_load(b, device="banana"), "NanovlError",
                              "device 'banana' is not a device"),
    "load(a number)": (lambda m, b: __import__("nanovl").load(5), TypeError, "path and adapters must be folder paths"),
    "load(missing folder)": (lambda m, b: __import__("nanovl").load("/nonexistent/ckpt"), "NanovlError",
                             "no such checkpoint directory: /nonexistent/ckpt"),
    "save_pretrained(dtype=torch.int8)": (lambda m, b: m.save_pretrained(b["bare"] / "never", dtype=torch.int8),
                                          "NanovlError", "dtype torch.int8 is not supported"),
}


@pytest.mark.parametrize("case", list(API_BAD))
def test_api_refuses(case, model, base):
    import nanovl

    call, kind, phrase = API_BAD[case]
    kind = nanovl.NanovlError if kind == "NanovlError" else kind
    t0 = time.perf_counter()
    with pytest.raises(kind) as e:
        call(model, base)
    assert phrase in str(e.value) and "\n" not in str(e.value), str(e.value)
    if kind is TypeError:  # a wrong type is a TypeError, not a NanovlError: the two stay apart
        assert not isinstance(e.value, nanovl.NanovlError)
    assert time.perf_counter() - t0 < 10, "refused, but only after expensive work"
    assert not (base["bare"] / "never").exists()


def test_batch_chat_string_is_not_answered_per_character(model):
    """batch_chat('abc') once answered 'a', 'b' and 'c': it is refused, and a one-question list is answered once."""
    with pytest.raises(TypeError):
        model.batch_chat("abc", max_new_tokens=1)
    assert len(model.batch_chat(["abc"], max_new_tokens=1)) == 1


# ---------------------------------------------------------------------------------------------
# real processes: bytes in argv and stdin, closed stdin and stdout, Ctrl-C


def test_undecodable_prompt_bytes_in_argv(base):
    """A prompt that is not UTF-8 in argv (Python keeps its bytes as lone surrogates) is one line, exit 2."""
    r = subprocess.run([sys.executable, "-m", "nanovl.generate", "--model", os.fsencode(base["bare"]), "--prompt",
                        b"caf\xe9 \xff"], env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True,
                       timeout=120)
    line = one_line(r.returncode, r.stderr.decode())
    assert "--prompt is not valid UTF-8 text (the byte 0xe9 at character 3)" in line, line


def test_chat_survives_an_invalid_line_and_ends_at_eof(base):
    """--chat: a stdin line that is not UTF-8 is one error line and the conversation goes on (the next question is
    answered); end of input ends the session with status 0."""
    r = cli("--model", base["tok"], "--chat", "--max-tokens", "2", "--no-stream", stdin=b"caf\xe9\nHi\n")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        "error: that line is not valid UTF-8 text (the byte 0xe9 at character 3): give it as UTF-8"], err
    out = r.stdout.decode()
    assert out.startswith("> > ") and out.endswith("\n> ") and len(out.split("\n")) == 2, out  # one answer


def test_chat_with_closed_stdin(base):
    """--chat with stdin closed (`<&-`): one line, exit 2, before the model loads."""
    r = cli("--model", base["bare"], "--chat", shell_suffix="<&-")
    line = one_line(r.returncode, r.stderr.decode())
    assert "--chat reads the questions from stdin, which is closed" in line, line


def test_closed_stdout_pipe(base):
    """The reader of stdout is gone (`| head -c 0` exited): no traceback, no 'Exception ignored' line."""
    cmd = (f"'{sys.executable}' -m nanovl.generate --model '{base['tok']}' --prompt Hi --max-tokens 8 "
           "| (exec 0<&-; sleep 0)")  # the reader closes its end at once
    r = subprocess.run(["bash", "-c", cmd + "; echo \"status=${PIPESTATUS[0]}\" >&2"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=120)
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "status=141", r.stderr  # as Unix tools: 128 + SIGPIPE


# Ctrl-C at a chosen moment, with no timing involved: the process signals itself from an audit hook when a module
# starts to import (the command is still importing torch) or when the checkpoint's config.json is opened (it loads).
# A SIGINT at numpy.matrixlib (imported by torch) was swallowed before ctrl_c_exits: the chat went on, status 0.
CTRL_C_AT = {"numpy": "event == 'import' and args[0] == 'numpy.matrixlib'",
             "torch._C": "event == 'import' and args[0] == 'torch._C'",
             "load": "event == 'open' and str(args[0]).endswith('config.json')"}
CTRL_C_WRAPPER = """import os, runpy, signal, sys
def hook(event, args, fired=[]):
    if not fired and ({at}):
        fired.append(True)
        sys.stderr.write('SIGINT\\n')
        os.kill(os.getpid(), signal.SIGINT)
sys.addaudithook(hook)
sys.argv = [{module!r}, *sys.argv[1:]]
runpy.run_module({module!r}, run_name='__main__', alter_sys=True)
"""


@pytest.mark.parametrize("module,at", [("nanovl.generate", "numpy"), ("nanovl.generate", "torch._C"),
                                       ("nanovl.generate", "load"), ("nanovl", "numpy"), ("nanovl.train", "numpy"),
                                       ("nanovl.train", "load"), ("nanovl.convert", "numpy"),
                                       ("nanovl.convert", "load")])
def test_ctrl_c_exits_130(base, tmp_path, module, at):
    """SIGINT while torch imports or while the checkpoint loads: status 130, no traceback, nothing more done. An
    interrupt inside torch's own import used to be swallowed there (the chat went on: status 0 in CI), turn into an
    ImportError, or abort the process (pybind11's terminate: status -6); nanovl.train and nanovl.convert did not
    catch it at all (a traceback)."""
    args = {"nanovl.generate": ["--model", base["tok"], "--chat"], "nanovl": ["--model", base["tok"], "--chat"],
            "nanovl.train": ["--model", base["tok"], "--data", write_data(tmp_path, [qa(image="a.png")]),
                             "--output", tmp_path / "out"],
            "nanovl.convert": [base["tok"], tmp_path / "out", "--to", "hf"]}[module]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", CTRL_C_WRAPPER.format(at=CTRL_C_AT[at], module=module), *map(str, args)],
                       input=b"What is it?\n", env=env, cwd=ROOT, capture_output=True, timeout=120)
    err = p.stderr.decode()
    assert err.startswith("SIGINT\n"), err  # the moment came (a numpy without numpy.matrixlib: pick another module)
    assert p.returncode == 130, f"exit {p.returncode}\n{err}"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "Error" not in err, err
    assert p.stdout == b"" and not (tmp_path / "out").exists(), p.stdout  # no answer, no output folder


# ---------------------------------------------------------------------------------------------
# the training command: options and data


def write_data(d: Path, lines: list) -> Path:
    (d / "data").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (60, 40), (200, 30, 30)).save(d / "data" / "a.png")
    f = d / "data" / "train.jsonl"
    f.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return f


def qa(q="<image>\nWhat is it?", a="A red square.", **kw):
    return {**kw, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


# name -> (the lines of train.jsonl (None: one good sample), extra flags, phrase[, repeat_time of the meta file])
TRAIN_BAD = {
    "sample not JSON": (["{oops"], [], "train.jsonl:1: not valid JSON"),
    "sample with a missing image": ([qa(image="nope.png")], [], "train.jsonl:1: image file not found"),
    "sample with a bad role": ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]}],
                               [], "train.jsonl:1: turn 2 has role 'bot'"),
    "sample line 3 of 3": ([qa(image="a.png"), qa(image="a.png"), qa("<image> <image>", image="a.png")],
                           ["--max-steps", "3"],
                           "train.jsonl:3: 2 <image> placeholder(s) for 1"),
    "empty JSONL": ([], [], "no samples: {data} hold(s) no lines"),
    # a meta file: {"d": {"root", "annotation": train.jsonl, "repeat_time": ...}}, given with --meta {meta}
    "repeat_time Infinity": (None, ["--meta", "{meta}"], "dataset 'd': repeat_time must be in (0, 1] or an integer, "
                                                         "got inf", float("inf")),
    "repeat_time NaN": (None, ["--meta", "{meta}"], "repeat_time must be in (0, 1] or an integer, got nan", float("nan")),
    "repeat_time 10**9": (None, ["--meta", "{meta}"], "(1 lines, repeat_time 1000000000) is 1,000,000,000 samples, over "
                                                      "the limit of 100,000,000", 10 ** 9),
    "--seed 2**40": (None, ["--seed", str(2 ** 40)], "--seed must be between 0 and 4294967295"),
    "--max-dynamic-patch 0": (None, ["--max-dynamic-patch", "0"], "--max-dynamic-patch must be >= 1, got 0"),
    "--max-dynamic-patch 10**6": (None, ["--max-dynamic-patch", "1000000"], "over the limit of 40"),
    "--num-train-epochs nan": (None, ["--num-train-epochs", "nan"], "--num-train-epochs must be a finite number"),
    "--max-grad-norm -1": (None, ["--max-grad-norm", "-1"], "--max-grad-norm must be a finite number >= 0"),
    "--drop-path-rate 1": (None, ["--drop-path-rate", "1"], "--drop-path-rate 1 drops every ViT block"),
    "--max-num-frame 100000": (None, ["--max-num-frame", "100000"], "--max-num-frame is 100,000 frames"),
    "--min-num-frame above --max-num-frame": (None, ["--min-num-frame", "9", "--max-num-frame", "4"],
                                              "--max-num-frame must be >= 9, got 4"),
    "--sampling-method bogus": (None, ["--sampling-method", "bogus"], "--sampling-method must be rand or middle"),
    "--device banana": (None, ["--device", "banana"], "--device 'banana' is not a device"),
    "--per-device-batch-size abc": (None, ["--per-device-batch-size", "abc"],
                                    "argument --per-device-batch-size: invalid int value: 'abc'"),
    "unknown flag": (None, ["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    "--output a file": (None, ["--output", "{d}/data/a.png"], "--output"),
}


@pytest.mark.parametrize("case", list(TRAIN_BAD))
def test_training_command_refuses(case, base, tmp_path, capsys):
    """python -m nanovl.train: a bad sample is one line `error: <file>:<line>: <reason>`, a bad option one line too;
    exit 2 and no traceback."""
    from nanovl.train.cli import main

    lines, extra, phrase, *repeat = TRAIN_BAD[case]
    data = write_data(tmp_path, lines if lines is not None else [qa(image="a.png")])
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"d": {"root": str(data.parent), "annotation": str(data), "repeat_time": repeat[0]}})
                    if repeat else "{}")
    argv = ["--model", base["tok"], "--output", tmp_path / "out", "--max-steps", "1", "--quiet", "--freeze-backbone",
            "--freeze-llm", *(["--data", data, "--root", data.parent] if not repeat else []),
            *[a.format(d=tmp_path, meta=meta) for a in extra]]
    code, out, err = run_main(argv, capsys, main)
    line = one_line(code, err)
    assert phrase.format(data=data) in line, line
    if lines:  # a bad sample: the file with its full path, then the line
        assert f"error: {data}:" in line, line
    if repeat:  # the meta file is named
        assert line.startswith(f"error: {meta}: "), line
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# valid but unusual inputs: they must still work


def uniform(rgb) -> torch.Tensor:
    """The normalised tile of a uniform image of colour rgb, from the ImageNet constants."""
    v = (np.array(rgb) / 255 - MEAN) / STD
    return torch.tensor(v, dtype=torch.float32)[:, None, None].expand(3, S, S)


def write_gif(p):
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)


def write_palette(p):
    im = Image.new("P", (40, 40), 1)
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    im.info["transparency"] = 0  # index 0 transparent (unused here): the image keeps its green
    im.save(p, transparency=0)


def write_i16(p):
    im = Image.new("I;16", (40, 40), 300)  # 16-bit grey above 255
    im.save(p)


# name -> (write(path), file name, expected tiles at max_num=6, expected colour or None (shape and finiteness only));
# the square ones are 40x40, under half of a 2x2 grid of 56-pixel tiles, so the reference keeps them as one tile
VALID = {
    "grayscale L": (lambda p: Image.new("L", (40, 40), 128).save(p), "l.png", 1, (128, 128, 128)),
    "CMYK": (lambda p: Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(p), "cmyk.tiff", 1, (255, 0, 0)),
    "CMYK JPEG": (lambda p: Image.new("CMYK", (40, 40), (0, 0, 0, 0)).save(p, quality=100), "cmyk.jpg", 1, None),
    "16-bit I;16": (write_i16, "i16.png", 1, None),
    "palette P with transparency": (write_palette, "p.png", 1, (0, 255, 0)),
    "RGBA": (lambda p: Image.new("RGBA", (40, 40), (10, 20, 30, 0)).save(p), "rgba.png", 1, (10, 20, 30)),
    "animated GIF (first frame)": (write_gif, "anim.gif", 1, (255, 0, 0)),
    "WEBP lossless": (lambda p: Image.new("RGB", (40, 40), (0, 128, 255)).save(p, lossless=True), "x.webp", 1,
                      (0, 128, 255)),
    # 1 x 10000: aspect 1e-4, the closest grid with <= 6 tiles is 1 column x 6 rows, plus the thumbnail
    "1x10000": (lambda p: Image.new("RGB", (1, 10000), (40, 80, 120)).save(p), "tall.png", 7, (40, 80, 120)),
    "10000x1": (lambda p: Image.new("RGB", (10000, 1), (40, 80, 120)).save(p), "wide.png", 7, (40, 80, 120)),
    "1x1": (lambda p: Image.new("RGB", (1, 1), (40, 80, 120)).save(p), "dot.png", 1, (40, 80, 120)),
}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    for name, (write, fname, *_ ) in VALID.items():
        write(d / fname)
    return d


@pytest.mark.parametrize("case", list(VALID))
def test_unusual_image_still_loads(case, media):
    import nanovl

    _, fname, tiles, colour = VALID[case]
    x = nanovl.load_image(media / fname, max_num=6, input_size=S)
    assert x.shape == (tiles, 3, S, S) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    if colour is not None:
        torch.testing.assert_close(x, uniform(colour).expand(tiles, 3, S, S), atol=2e-5, rtol=0)
    else:  # a uniform image stays uniform per channel
        assert float((x - x[:, :, :1, :1]).abs().max()) < 1e-5


def write_mkv(path, colours, fps=10, size=(64, 48)):
    """An MKV (Matroska) video whose frame i is the uniform colour colours[i], FFV1 (lossless)."""
    import av

    with av.open(str(path), "w") as out:
        st = out.add_stream("ffv1", rate=fps)
        st.width, st.height, st.pix_fmt = size[0], size[1], "bgr0"
        for c in colours:
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), c, dtype=np.uint8), format="rgb24")
            for pkt in st.encode(frame.reformat(format="bgr0")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)


def test_mkv_video_still_loads(tmp_path):
    """An MKV (no frame count in the container) of 12 frames of distinct colours: 4 segments take frames 1, 4, 7, 9
    (seg = 11/4 = 2.75; int(1.375 + round(k * 2.75)), numpy's round half-to-even: 0, 3, 6 (5.5), 8 (8.25))."""
    import nanovl

    colours = [(20 * i, 255 - 20 * i, (60 * i) % 256) for i in range(12)]
    write_mkv(tmp_path / "v.mkv", colours)
    x, patches = nanovl.load_video(tmp_path / "v.mkv", num_segments=4, input_size=S)
    assert patches == [1, 1, 1, 1] and x.shape == (4, 3, S, S)
    for tile, i in zip(x, (1, 4, 7, 9)):
        torch.testing.assert_close(tile, uniform(colours[i]), atol=2e-5, rtol=0)


def test_unusual_image_through_the_cli(base, media, capsys):
    """One command-line run on the 1x10000 image: 7 tiles, an answer, status 0."""
    from nanovl.cli import main

    main(["--model", str(base["tok"]), "--image", str(media / "tall.png"), "--max-tiles", "6", "--max-tokens", "2",
          "--no-stream", "--verbose"])
    out, err = capsys.readouterr()
    assert "7 tiles [7]" in err and "Traceback" not in err, err
    assert out.endswith("\n") and len(out.splitlines()) == 1
