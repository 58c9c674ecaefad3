"""nanovl: InternVL in plain PyTorch. `model = nanovl.load(dir_or_hub_id)`, then `model.chat(question, pixel_values)`."""
import importlib
import os

from nanovl.errors import NanovlError

__all__ = ["load", "load_image", "load_video", "InternVL", "NanovlError"]
LAZY = {"InternVL": "nanovl.model", "load_image": "nanovl.preprocess", "load_video": "nanovl.preprocess"}


def __getattr__(name):  # torch is imported on first use: `python -m nanovl.generate` can answer Ctrl-C meanwhile
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'nanovl' has no attribute {name!r}")


def load(path, dtype=None, device="cpu", adapters=None):
    """Load a checkpoint directory (or a hub id, downloaded into weights/) in the given dtype (torch.float32 by
    default, torch.bfloat16 or torch.float16), memory-mapped, on `device`.
    adapters: a folder of LoRA adapters saved alone (nanovl.train --save-lora-adapters), merged into the weights.
    An unmerged LoRA checkpoint of the original code (use_llm_lora in config.json) is merged as it loads."""
    import torch

    from nanovl import limits
    from nanovl.model import InternVL
    from nanovl.tokenizer import Tokenizer
    from nanovl.weights import check_layer_count, load_adapters, load_weights, read_config, resolve

    if not isinstance(path, (str, os.PathLike)) or (adapters is not None and not isinstance(adapters, (str, os.PathLike))):
        raise TypeError(f"path and adapters must be folder paths or a hub id (str or Path), got "
                        f"{type(path).__name__} and {type(adapters).__name__}")
    dtype = limits.dtype(torch.float32 if dtype is None else dtype)
    device = limits.device(device)
    path = resolve(path)
    config, fmt = read_config(path)
    check_layer_count(config, path, fmt)  # before building: a hostile num_hidden_layers would build for hours
    try:
        with torch.device("meta"):
            model = InternVL(config)
    except (RuntimeError, ValueError, OverflowError) as e:  # sizes no tensor can have
        raise NanovlError(f"{path / 'config.json'} describes a model nanovl cannot build: {e}") from None
    load_weights(model, path, fmt, dtype, device)
    if adapters is not None:
        load_adapters(model, adapters)
    if any((path / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        model.tokenizer = Tokenizer(path)
    model.img_context_token_id = image_token_id(model)
    return model.eval()


def default_dtype(device) -> "torch.dtype":
    """The CLI's dtype when none is asked for: bf16 on CUDA and on CPUs with native bf16 instructions (avx512_bf16 or
    amx_bf16 in /proc/cpuinfo: the ViT's and the prefill's GEMMs run about twice as fast as in fp32), fp32 elsewhere.
    nanovl.load() itself stays fp32 by default (the parity tests rely on it)."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.bfloat16
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    except OSError:
        flags = []
    return torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & set(flags) else torch.float32


def image_token_id(model) -> int | None:
    """The <IMG_CONTEXT> id the prompt's image slots use: the tokenizer's (the original code looks it up there),
    else config.json's image_token_id (-hf checkpoints, which may ship without a tokenizer), else None."""
    from_tokenizer = model.tokenizer.token_to_id("<IMG_CONTEXT>") if model.tokenizer is not None else None
    return from_tokenizer if from_tokenizer is not None else model.config.image_token_id
