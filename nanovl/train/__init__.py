"""Fine-tuning InternVL as the original code does: its data format, labels, loss, freezing and LoRA, checkpoints.
Imports nanovl; nanovl never imports it.

    from nanovl.train import SupervisedDataset, collate, compute_loss
    ds = SupervisedDataset("meta.json", model.tokenizer, template="internvl2_5", max_dynamic_patch=6)
    loss = compute_loss(model, collate([ds[0], ds[1]]), loss_reduction="token")
    finetune(TrainArgs(model="OpenGVLab/InternVL3-1B", meta="meta.json", output="out/"))   # python -m nanovl.train
"""
from nanovl.train.data import BadSample, SupervisedDataset, collate
from nanovl.train.lora import add_lora, lora_state_dict, merge_lora, merge_lora_state
from nanovl.train.loss import compute_loss, token_weights
from nanovl.train.mpo import PreferenceDataset, RunningMean, collate_pairs, mpo_loss
from nanovl.train.trainer import TrainArgs, finetune

__all__ = ["SupervisedDataset", "collate", "compute_loss", "token_weights", "BadSample", "TrainArgs", "finetune",
           "PreferenceDataset", "collate_pairs", "mpo_loss", "RunningMean",
           "add_lora", "merge_lora", "lora_state_dict"]
