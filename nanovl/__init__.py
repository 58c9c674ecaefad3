"""nanovl: InternVL in plain PyTorch. `model = nanovl.load(dir_or_hub_id)`, then `model.chat(question, pixel_values)`."""
import torch

from nanovl.errors import NanovlError
from nanovl.model import InternVL
from nanovl.preprocess import load_image, load_video
from nanovl.weights import load_weights, read_config, resolve

__all__ = ["load", "load_image", "load_video", "InternVL", "NanovlError"]


def load(path, dtype: torch.dtype = torch.float32, device="cpu", adapters=None) -> InternVL:
    """Load a checkpoint directory (or a hub id, downloaded into weights/) in the given dtype, memory-mapped.
    adapters: a folder of LoRA adapters saved alone (nanovl.train --save-lora-adapters), merged into the weights.
    An unmerged LoRA checkpoint of the original code (use_llm_lora in config.json) is merged as it loads."""
    from nanovl.tokenizer import Tokenizer
    from nanovl.weights import load_adapters

    path = resolve(path)
    config, fmt = read_config(path)
    with torch.device("meta"):
        model = InternVL(config)
    load_weights(model, path, fmt, dtype, device)
    if adapters is not None:
        load_adapters(model, adapters)
    if any((path / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        model.tokenizer = Tokenizer(path)
    model.img_context_token_id = image_token_id(model)
    return model.eval()


def image_token_id(model) -> int | None:
    """The <IMG_CONTEXT> id the prompt's image slots use: the tokenizer's (the original code looks it up there),
    else config.json's image_token_id (-hf checkpoints, which may ship without a tokenizer), else None."""
    from_tokenizer = model.tokenizer.token_to_id("<IMG_CONTEXT>") if model.tokenizer is not None else None
    return from_tokenizer if from_tokenizer is not None else model.config.image_token_id
