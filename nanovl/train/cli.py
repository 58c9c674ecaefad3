"""python -m nanovl.train --model DIR_OR_HUB_ID --meta META.json --output DIR [flags named as the original's]."""
import sys
import typing
from argparse import BooleanOptionalAction
from dataclasses import MISSING, fields
from pathlib import Path

from nanovl import limits
from nanovl.cli import Parser
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


def parser() -> Parser:
    p = Parser(prog="python -m nanovl.train", description="Fine-tune an InternVL checkpoint "
                                "(supervised), as the original InternVL code does.")
    hints = typing.get_type_hints(TrainArgs)
    for f in fields(TrainArgs):
        flag, kind = "--" + f.name.replace("_", "-"), typing.get_args(hints[f.name]) or (hints[f.name],)
        kind = next(k for k in kind if k is not type(None))
        required = f.default is MISSING
        if kind is bool:
            p.add_argument(flag, action=BooleanOptionalAction, default=f.default, help=HELP.get(f.name))
        else:
            p.add_argument(flag, type=kind, default=None if required else f.default, required=required,
                           help=HELP.get(f.name), metavar=f.name.upper() if kind is not str else None)
    return p


def check_options(a) -> None:
    """The ranges of the flags that finetune's own check() leaves open, before anything loads (one line each)."""
    for name, lo in (("max_seq_length", 1), ("max_dynamic_patch", 1), ("min_dynamic_patch", 1),
                     ("save_total_limit", 1)):
        if getattr(a, name) is not None:
            limits.whole(getattr(a, name), f"--{name.replace('_', '-')}", lo)
    if a.max_dynamic_patch is not None:
        limits.within("MAX_TILES", a.max_dynamic_patch, "--max-dynamic-patch", "use fewer tiles")
        if a.min_dynamic_patch is not None and a.min_dynamic_patch > a.max_dynamic_patch:
            raise NanovlError(f"--min-dynamic-patch {a.min_dynamic_patch} is above --max-dynamic-patch "
                              f"{a.max_dynamic_patch}")
    limits.whole(a.min_num_frame, "--min-num-frame", 1)
    limits.whole(a.max_num_frame, "--max-num-frame", a.min_num_frame)
    limits.within("MAX_FRAMES", a.max_num_frame, "--max-num-frame", "sample fewer frames")
    if a.sampling_method not in ("rand", "middle"):
        raise NanovlError(f"--sampling-method must be rand or middle, got {a.sampling_method!r}")
    if a.drop_path_rate is not None:
        limits.number(a.drop_path_rate, "--drop-path-rate", 0, 1)
        if a.drop_path_rate == 1:
            raise NanovlError("--drop-path-rate 1 drops every ViT block: use a rate below 1")
    limits.number(a.max_grad_norm, "--max-grad-norm", 0)
    limits.number(a.num_train_epochs, "--num-train-epochs", 0)
    limits.whole(a.seed, "--seed", 0, 2 ** 32 - 1)  # numpy's generator takes 32 bits
    if a.device is not None:
        limits.device(a.device, "--device")
    if Path(a.output).exists() and not Path(a.output).is_dir():
        raise NanovlError(f"--output {a.output} is a file: give a folder for the trained checkpoint")


def main(argv=None) -> None:
    """Bad options or data: one `error:` line and status 2; Ctrl-C: status 130."""
    try:
        args = parser().parse_args(argv)
        check_options(args)
        finetune(TrainArgs(**vars(args)))
    except (NanovlError, OSError) as e:
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)  # one line, whatever the message
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
