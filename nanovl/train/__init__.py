"""Fine-tuning InternVL as the original code does: its data format, labels, loss, freezing and LoRA, checkpoints.
Imports nanovl; nanovl never imports it.

    from nanovl.train import SupervisedDataset, collate, compute_loss
    ds = SupervisedDataset("meta.json", model.tokenizer, template="internvl2_5", max_dynamic_patch=6)
    loss = compute_loss(model, collate([ds[0], ds[1]]), loss_reduction="token")
    finetune(TrainArgs(model="OpenGVLab/InternVL3-1B", meta="meta.json", output="out/"))   # python -m nanovl.train
"""
import importlib

# name -> module; imported on first use, so that `python -m nanovl.train` can answer Ctrl-C while torch imports
LAZY = {"SupervisedDataset": "data", "collate": "data", "BadSample": "data",
        "add_lora": "lora", "merge_lora": "lora", "lora_state_dict": "lora", "merge_lora_state": "lora",
        "compute_loss": "loss", "token_weights": "loss",
        "PreferenceDataset": "mpo", "RunningMean": "mpo", "collate_pairs": "mpo", "mpo_loss": "mpo",
        "TrainArgs": "trainer", "finetune": "trainer"}
__all__ = list(LAZY)


def __getattr__(name):
    if name in LAZY:
        return getattr(importlib.import_module("nanovl.train." + LAZY[name]), name)
    raise AttributeError(f"module 'nanovl.train' has no attribute {name!r}")
