"""nanovl: InternVL in plain PyTorch. `model = nanovl.load(dir_or_hub_id)`, then `model.chat(question, pixel_values)`."""
import torch

from nanovl.errors import NanovlError
from nanovl.model import InternVL
from nanovl.preprocess import load_image, load_video
from nanovl.weights import load_weights, read_config, resolve

__all__ = ["load", "load_image", "load_video", "InternVL", "NanovlError"]


def load(path, dtype: torch.dtype = torch.float32, device="cpu") -> InternVL:
    """Load a checkpoint directory (or a hub id, downloaded into weights/) in the given dtype, memory-mapped."""
    from nanovl.tokenizer import Tokenizer

    path = resolve(path)
    config, fmt = read_config(path)
    with torch.device("meta"):
        model = InternVL(config)
    load_weights(model, path, fmt, dtype, device)
    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer.model"))
    if has_tokenizer:
        model.tokenizer = Tokenizer(path)
        model.img_context_token_id = model.tokenizer.token_to_id("<IMG_CONTEXT>") or model.img_context_token_id
    return model.eval()
