"""What nanovl accepts, checked once where input comes in (the command line, the public functions) and before any
expensive work: the resource limits, and the checks of numbers, texts, devices, dtypes and tensors.

A limit is a module attribute (`nanovl.limits.MAX_TILES = 64`); NANOVL_MAX_TILES=64 in the environment overrides it.
The image-pixel limit is PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`), which
NANOVL_MAX_IMAGE_PIXELS sets; nanovl refuses an image above it where PIL would only warn.
"""
import math
import numbers
import operator
import os

import torch
from PIL import Image

from nanovl.errors import NanovlError

MAX_TILES = 40  # tiles per image: the largest grid the tiling searches (InternVL recipes train with up to 36)
MAX_FRAMES = 256  # frames sampled from one video
MAX_PROMPT_CHARS = 1_000_000  # characters of a prompt (system message, history, question), before tokenizing
MAX_SAMPLES = 100_000_000  # training samples of one dataset of a meta file, after its repeat_time
UNITS = {"MAX_TILES": "tiles", "MAX_FRAMES": "frames", "MAX_PROMPT_CHARS": "characters", "MAX_IMAGE_PIXELS": "pixels",
         "MAX_SAMPLES": "samples"}

if os.environ.get("NANOVL_MAX_IMAGE_PIXELS", "").isdigit():  # PIL's own check then stops at the same number
    Image.MAX_IMAGE_PIXELS = int(os.environ["NANOVL_MAX_IMAGE_PIXELS"])


def limit(name: str) -> int | None:
    """The limit in force: NANOVL_<name> if set, else the attribute (MAX_IMAGE_PIXELS: PIL's; None: no limit)."""
    env = os.environ.get(f"NANOVL_{name}")
    if env is not None:
        if not env.isdigit() or int(env) < 1:
            raise NanovlError(f"NANOVL_{name}={env!r} in the environment: a limit is a whole number >= 1")
        return int(env)
    return Image.MAX_IMAGE_PIXELS if name == "MAX_IMAGE_PIXELS" else globals()[name]


def within(name: str, value: int, what: str, fix: str = "ask for less") -> None:
    """Refuse `value` above the limit `name`, saying which limit it is and how to raise it."""
    cap = limit(name)
    if cap is not None and value > cap:
        where = "PIL.Image.MAX_IMAGE_PIXELS" if name == "MAX_IMAGE_PIXELS" else f"nanovl.limits.{name}"
        raise NanovlError(f"{what} is {value:,} {UNITS[name]}, over the limit of {cap:,}: {fix}, or raise the limit "
                          f"(NANOVL_{name}=N in the environment, {where} in Python)")


# -----------------------------------------------------------------------------
# options and arguments: a wrong type is a TypeError, a value out of range a NanovlError

def whole(value, what: str, lo: int = 0, hi: int | None = None) -> int:
    """An int (numpy and 0-d tensor ints too, never a bool) with lo <= value <= hi."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}") from None
    if value < lo or (hi is not None and value > hi):
        raise NanovlError(f"{what} must be {f'>= {lo}' if hi is None else f'between {lo} and {hi}'}, got {value}")
    return value


def number(value, what: str, lo: float = 0.0, hi: float = math.inf, lo_open: bool = False) -> float:
    """A finite real number (never a bool) in [lo, hi], or (lo, hi] with lo_open."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        span = f"{'>' if lo_open else '>='} {lo:g}" if hi == math.inf else f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise NanovlError(f"{what} must be a finite number {span}, got {value}")
    return float(value)


def text(value, what: str) -> str:
    """A str that is valid Unicode (a lone surrogate, as an undecodable byte becomes in sys.argv, is not)."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(value[e.start])
        bad = f"the byte {c - 0xDC00:#04x}" if 0xDC80 <= c <= 0xDCFF else f"a lone surrogate U+{c:04X}"
        raise NanovlError(f"{what} is not valid UTF-8 text ({bad} at character {e.start}): "
                          "give it as UTF-8") from None
    return value


def device(value, what: str = "device") -> torch.device:
    """A device that exists on this machine."""
    try:
        d = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise NanovlError(f"{what} {value!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    try:
        if d.type == "meta":
            raise RuntimeError("it holds no data")
        torch.empty(0, device=d)
    except (RuntimeError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NanovlError(f"{what} {value} is not available on this machine ({reason}): use cpu or a device "
                          "it has") from None
    return d


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dtype(value, what: str = "dtype") -> torch.dtype:
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{what} must be a torch.dtype (torch.bfloat16, torch.float16 or torch.float32), "
                        f"got {type(value).__name__} {value!r}")
    if value not in DTYPES:
        raise NanovlError(f"{what} {value} is not supported: use torch.bfloat16, torch.float16 or torch.float32 "
                          "(int8 weights: nanovl.quantize.quantize_int8 after loading)")
    return value


SAMPLING = ("temperature", "top_k", "top_p", "seed", "compile")


def generation(max_new_tokens, names: dict | None = None, **sampling) -> None:
    """The options of chat / stream / batch_chat / generate; names: how messages call them (the CLI's flags)."""
    name = lambda k: (names or {}).get(k, k)  # noqa: E731
    unknown = sorted(set(sampling) - set(SAMPLING))
    if unknown:
        raise TypeError(f"unknown generation option(s) {', '.join(unknown)}: nanovl takes max_new_tokens, "
                        f"{', '.join(SAMPLING)}")
    whole(max_new_tokens, name("max_new_tokens"), 0)
    number(sampling.get("temperature", 0.0), name("temperature"), 0)
    whole(sampling.get("top_k", 0), name("top_k"), 0)
    number(sampling.get("top_p", 1.0), name("top_p"), 0, 1, lo_open=True)
    if sampling.get("seed") is not None:
        whole(sampling["seed"], name("seed"), 0, 2 ** 64 - 1)


def pixel_values(pv, image_size: int, channels: int = 3, what: str = "pixel_values") -> None:
    """(tiles >= 1, channels, image_size, image_size) finite floats, as load_image gives them."""
    if not isinstance(pv, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor as load_image returns, got {type(pv).__name__}")
    shape, want = tuple(pv.shape), f"(tiles, {channels}, {image_size}, {image_size})"
    if len(shape) != 4 or shape[1:] != (channels, image_size, image_size) or shape[0] < 1:
        hint = ": one tile still needs its leading dimension (pixel_values[None])" if len(shape) == 3 else \
            ": it holds no tile" if len(shape) == 4 and shape[0] == 0 else ""
        raise NanovlError(f"{what} has shape {shape}, but this model takes {want} as load_image gives it{hint}")
    if not pv.is_floating_point():
        raise NanovlError(f"{what} is {pv.dtype}: the model takes float pixel values normalised as load_image does")
    if not bool(torch.isfinite(pv).all()):
        raise NanovlError(f"{what} holds NaN or infinite values")


def token_ids(ids, vocab_size: int, what: str = "input_ids") -> None:
    """(batch >= 1, tokens >= 1) integer ids in [0, vocab_size)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of token ids (batch, tokens), got {type(ids).__name__}")
    if ids.ndim != 2 or 0 in ids.shape or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise NanovlError(f"{what} must be integer token ids of shape (batch, tokens) with at least one token, "
                          f"got {ids.dtype} {tuple(ids.shape)}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise NanovlError(f"{what} holds the id {lo if lo < 0 else hi}, outside the model's vocabulary 0..{vocab_size - 1}")
