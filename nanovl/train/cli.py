"""python -m nanovl.train --model DIR_OR_HUB_ID --meta META.json --output DIR [flags named as the original's]."""
import argparse
import sys
import typing
from dataclasses import MISSING, fields

from nanovl.errors import NanovlError
from nanovl.train.trainer import TrainArgs, finetune

HELP = {
    "model": "checkpoint directory or hub id (original or -hf layout)",
    "output": "output directory: the trained model in the original layout, metrics.jsonl, loss.svg, checkpoint-N/",
    "meta": "meta JSON {name: {root, annotation (.jsonl), data_augment, repeat_time, max_dynamic_patch}}",
    "data": "one JSONL file instead of --meta (original conversations or ms-swift messages/images)",
    "root": "the folder image and video paths of --data are relative to",
    "template": "chat template (the original's --conv_style); default: the checkpoint's",
    "max_seq_length": "cut samples at this many tokens (default: the recipe's, 8192 for 2.5, 16384 for 3)",
    "max_dynamic_patch": "max tiles per image (a meta entry's max_dynamic_patch wins; several images share it)",
    "min_dynamic_patch": "min tiles per image (default: the checkpoint's)",
    "dynamic_image_size": "tile images dynamically (default: the checkpoint's)",
    "use_thumbnail": "add a thumbnail tile (default: the checkpoint's)",
    "min_num_frame": "video: frames per sample are drawn from [min, max]",
    "max_num_frame": "video: frames per sample are drawn from [min, max]",
    "sampling_method": "video frame sampling: rand (one random frame per interval) or middle",
    "data_augment": "JPEG re-encoding (quality 75-100) per tile, for datasets whose meta entry does not say",
    "loss_reduction": "token (mean over learned tokens), sample (1/x) or square (1/sqrt(x)); x = a sample's learned "
                      "tokens (the original applies sample/square only to packed data)",
    "loss_reduction_all_gather": "average the loss denominator over processes (the global weighted mean)",
    "use_packed_ds": "pack several samples into each row (block-diagonal causal attention, positions restarting per "
                     "sample, image blocks never split); needs --max-steps and --per-device-batch-size 1",
    "max_packed_tokens": "tokens per packed row",
    "num_images_expected": "tiles per packed row",
    "max_buffer_size": "rows being filled at once; past it the one with most tiles is used as it is",
    "strict_mode": "pad each packed row to --max-packed-tokens tokens and --num-images-expected tiles (the original's "
                   "default; its 2.5/3 recipes use --no-strict-mode)",
    "allow_overflow": "let a sample join a row it overflows once half the buffers are in use (the row is then cut)",
    "mpo": "preference training (MPO) on {question, chosen, rejected} pairs: sigmoid + bco_pair + sft losses against "
           "a frozen reference (with LoRA: the adapters switched off)",
    "beta": "MPO: the DPO temperature of the sigmoid and bco_pair terms",
    "sigmoid_loss_weight": "MPO: weight of the preference (sigmoid) term",
    "bco_pair_loss_weight": "MPO: weight of the quality (bco_pair) term",
    "rpo_alpha": "MPO: weight of the generation term (token-mean cross-entropy of the chosen answers)",
    "freeze_backbone": "freeze the ViT (default: the recipe's: frozen for fine-tuning, trained for MPO)",
    "freeze_llm": "freeze the language model",
    "freeze_mlp": "freeze the projector mlp1 (default: frozen with LoRA, as the LoRA recipe; trained otherwise)",
    "unfreeze_lm_head": "train the output head even with a frozen language model (a no-op in the original)",
    "unfreeze_vit_layers": "train ViT layers[k:] (k=-4: the last 4)",
    "use_backbone_lora": "LoRA of this rank on the ViT (attn.qkv, attn.proj, mlp.fc1, mlp.fc2), alpha 2r",
    "use_llm_lora": "LoRA of this rank on the language model (the original's targets per family), alpha 2r; "
                    "the base model is frozen",
    "lora_dropout": "dropout on the LoRA input",
    "drop_path_rate": "InternViT stochastic depth (default: the recipe's)",
    "grad_checkpoint": "activation checkpointing of the decoder blocks (the ViT's is always on in training)",
    "learning_rate": "peak learning rate (default: the recipe's: 4e-5 for 2.5, 2e-5 for 3, 1e-5 for InternVL3-1B)",
    "weight_decay": "AdamW weight decay on every trainable parameter (default: the recipe's)",
    "warmup_ratio": "linear warmup over this fraction of the steps, then cosine decay to 0",
    "warmup_steps": "warmup steps (overrides --warmup-ratio)",
    "max_grad_norm": "gradient clipping (0: none)",
    "num_train_epochs": "epochs (ignored with --max-steps)",
    "max_steps": "optimizer steps",
    "per_device_batch_size": "samples per process per micro-batch",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "seed": "seed of the data order, augmentation, drop path and LoRA init",
    "dtype": "bf16 (fp32 master weights and optimizer state, as DeepSpeed's bf16 mode) or fp32",
    "device": "cpu, cuda, ... (default: cuda if available)",
    "save_steps": "write checkpoint-N/ every N steps (0: only the final model)",
    "save_total_limit": "keep only the last K checkpoint-N/",
    "resume": "continue from a checkpoint-N/ folder, or 'auto': the output's latest",
    "save_lora_adapters": "with LoRA: write the adapters alone (unmerged) instead of the merged model",
    "skip_bad_samples": "skip bad samples (counted and listed at the end) instead of stopping at the first",
    "check_data": "preprocess the whole dataset and list every bad sample (file:line: reason); no training",
    "dataloader_num_workers": "processes preparing batches",
    "logging_steps": "(metrics.jsonl has every step)",
    "quiet": "no progress line",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nanovl.train", description="Fine-tune an InternVL checkpoint "
                                "(supervised), as the original InternVL code does.")
    hints = typing.get_type_hints(TrainArgs)
    for f in fields(TrainArgs):
        flag, kind = "--" + f.name.replace("_", "-"), typing.get_args(hints[f.name]) or (hints[f.name],)
        kind = next(k for k in kind if k is not type(None))
        required = f.default is MISSING
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=HELP.get(f.name))
        else:
            p.add_argument(flag, type=kind, default=None if required else f.default, required=required,
                           help=HELP.get(f.name), metavar=f.name.upper() if kind is not str else None)
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    try:
        finetune(TrainArgs(**vars(args)))
    except NanovlError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
