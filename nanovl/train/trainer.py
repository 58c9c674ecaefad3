"""The fine-tuning loop: what trains (the original's freeze / LoRA flags), AdamW over fp32 master weights (DeepSpeed's
bf16 mode) with a cosine schedule and linear warmup, gradient clipping and accumulation, checkpoints that resume
exactly, metrics.jsonl, a progress line and a loss curve. `finetune(TrainArgs(...))` is the whole of
`python -m nanovl.train`.
"""
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

import nanovl
from nanovl.errors import NanovlError
from nanovl.train import distributed as dist_utils
from nanovl.train.data import SupervisedDataset, collate
from nanovl.train.mpo import MPO, PreferenceDataset, collate_pairs
from nanovl import weights
from nanovl.train.lora import add_lora, lora_state_dict, merge_lora_state
from nanovl.train.loss import REDUCTIONS, compute_loss
from nanovl.train.packing import Packer
from nanovl.train.stream import Batches, PackedBatches

# the original "2nd fine-tune" recipes (internvl_chat/shell/*/2nd_finetune/*.sh): frozen ViT, MLP + LLM trained
RECIPES = {
    "InternVL2.5": dict(learning_rate=4e-5, weight_decay=0.01, drop_path_rate=0.1, max_seq_length=8192,
                        max_dynamic_patch=6, freeze_backbone=True),
    "InternVL3": dict(learning_rate=2e-5, weight_decay=0.05, drop_path_rate=0.0, max_seq_length=16384,
                      max_dynamic_patch=12, freeze_backbone=True),
}
# ... and of the MPO stage (internvl_chat/shell/internvl2.5_mpo, internvl3.0/mpo, internvl3.5 mpo): everything
# trains, drop path 0.1, max_dynamic_patch left at the default 12
MPO_RECIPES = {
    "InternVL2.5": dict(learning_rate=1e-6, weight_decay=0.05, drop_path_rate=0.1, max_seq_length=8192,
                        max_dynamic_patch=12, freeze_backbone=False),
    "InternVL3": dict(learning_rate=2e-7, weight_decay=0.05, drop_path_rate=0.1, max_seq_length=12288,
                      max_dynamic_patch=12, freeze_backbone=False),
    "InternVL3.5": dict(learning_rate=2e-7, weight_decay=0.05, drop_path_rate=0.1, max_seq_length=16384,
                        max_dynamic_patch=12, freeze_backbone=False),
}


@dataclass
class TrainArgs:
    """The flags of python -m nanovl.train, named as the original's (internvl_chat_finetune.py); None = the recipe's
    or the checkpoint's value."""
    model: str
    output: str
    meta: str | None = None  # meta JSON (the original's --meta_path)
    data: str | None = None  # or one JSONL file ...
    root: str = ""  # ... with its image root
    template: str | None = None  # the original's --conv_style; default: the checkpoint's template
    max_seq_length: int | None = None
    max_dynamic_patch: int | None = None
    min_dynamic_patch: int | None = None
    dynamic_image_size: bool | None = None
    use_thumbnail: bool | None = None
    min_num_frame: int = 8
    max_num_frame: int = 32
    sampling_method: str = "rand"
    data_augment: bool = False  # for datasets whose meta entry does not say
    loss_reduction: str = "token"
    loss_reduction_all_gather: bool = False
    use_packed_ds: bool = False  # packed sequences (needs --max-steps, one row per micro-batch)
    max_packed_tokens: int = 8192
    num_images_expected: int = 40
    max_buffer_size: int = 20
    strict_mode: bool = True  # pad every packed row to max_packed_tokens and num_images_expected tiles
    allow_overflow: bool = False
    mpo: bool = False  # preference training (MPO) on chosen / rejected pairs instead of supervised
    beta: float = 0.1
    sigmoid_loss_weight: float = 0.8
    bco_pair_loss_weight: float = 0.2
    rpo_alpha: float = 1.0  # the weight of the SFT term on the chosen answers
    freeze_backbone: bool | None = None  # None: the recipe's (frozen for SFT, trained for MPO)
    freeze_llm: bool = False
    freeze_mlp: bool | None = None  # None: frozen with LoRA (the LoRA recipe), trained otherwise
    unfreeze_lm_head: bool = False
    unfreeze_vit_layers: int = 0
    use_backbone_lora: int = 0
    use_llm_lora: int = 0
    lora_dropout: float = 0.05
    drop_path_rate: float | None = None
    grad_checkpoint: bool = True
    learning_rate: float | None = None
    weight_decay: float | None = None
    warmup_ratio: float = 0.03
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 42
    dtype: str = "bf16"
    device: str | None = None
    save_steps: int = 0  # 0: no intermediate checkpoints
    save_total_limit: int | None = None
    resume: str | None = None  # a checkpoint-N folder, or "auto": the output's latest
    save_lora_adapters: bool = False  # LoRA: write the adapters alone (unmerged) instead of the merged model
    skip_bad_samples: bool = False
    check_data: bool = False
    dataloader_num_workers: int = 0
    logging_steps: int = 1
    quiet: bool = False


def recipe(args: TrainArgs, model_path: str) -> dict:
    """The defaults of the original recipe (2nd fine-tune, or MPO) of this model's generation, for every flag left
    None; the generation is read from the checkpoint's name, InternVL2.5 when it says nothing."""
    name = Path(str(model_path)).name.lower().replace("_", ".").replace("-", ".")
    gen = "InternVL3.5" if "internvl3.5" in name else "InternVL3" if "internvl3" in name else "InternVL2.5"
    table = MPO_RECIPES if args.mpo else RECIPES
    gen = gen if gen in table else "InternVL3"
    chosen = {k: v for k, v in table[gen].items() if getattr(args, k) is None}
    if not args.mpo and gen == "InternVL3" and "internvl3.1b" in name and args.learning_rate is None:
        chosen["learning_rate"] = 1e-5  # internvl3.0/2nd_finetune/internvl3_1b_*.sh
    return f"{gen}{' MPO' if args.mpo else ' 2nd-finetune'}", chosen


# -----------------------------------------------------------------------------
# what trains

def configure(model, args: TrainArgs) -> list:
    """Apply the original's switches in its order (internvl_chat_finetune.py main): freeze_backbone, freeze_llm,
    unfreeze_lm_head, backbone LoRA, LLM LoRA, freeze_mlp, unfreeze_vit_layers. -> the trainable parameters.
    unfreeze_lm_head is a no-op in the original (it sets an attribute on the module); nanovl unfreezes the head."""
    if args.drop_path_rate is not None:
        model.vision_model.set_drop_path_rate(args.drop_path_rate)
    model.vision_model.gradient_checkpointing = True  # the original always checkpoints the ViT in training
    model.language_model.gradient_checkpointing = args.grad_checkpoint
    if args.freeze_backbone:
        model.vision_model.requires_grad_(False)
    if args.freeze_llm:
        model.language_model.requires_grad_(False)
    if args.unfreeze_lm_head:
        model.language_model.lm_head.requires_grad_(True)
    if args.use_backbone_lora:
        add_lora(model, "vit", args.use_backbone_lora, dropout=args.lora_dropout)
    if args.use_llm_lora:
        add_lora(model, "llm", args.use_llm_lora, dropout=args.lora_dropout)
    if args.freeze_mlp or (args.freeze_mlp is None and (args.use_llm_lora or args.use_backbone_lora)):
        model.mlp1.requires_grad_(False)
    if args.unfreeze_vit_layers:
        model.vision_model.encoder.layers[args.unfreeze_vit_layers:].requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


class MasterAdamW:
    """AdamW (betas 0.9/0.999, eps 1e-8, weight decay on every trainable parameter, as the original's DeepSpeed
    config) over fp32 master copies of the trainable parameters; the model receives the updated masters rounded.
    fp32 parameters are their own masters.

    Gradients in fp32 without an fp32 copy of every gradient: `accumulate()`, called before each backward after the
    first, adds the bf16 gradients of the micro-batch before into fp32 (so several micro-batches sum in fp32, as
    DeepSpeed's buffers do); the last micro-batch's bf16 gradients stay where they are until `step()`, which
    converts them a chunk of parameters at a time (exactly: bf16 -> fp32 is lossless) and updates that chunk. With
    one micro-batch per step nothing full-size is allocated beyond the bf16 gradients: 2 bytes a trainable
    parameter instead of DeepSpeed's 4 (+2 while copying)."""

    CHUNK = 1 << 24  # parameters per update: at most 64 MiB of fp32 gradients exist at once (a bigger one alone)

    def __init__(self, named_params: list, lr: float, weight_decay: float):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_()
                        for p in self.params]
        self.opt = torch.optim.AdamW(self.masters, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                                     fused=True)  # one in-place kernel: no temporaries, 5x the foreach speed on CPU

    def accumulate(self) -> None:
        """Before a micro-batch's backward (a no-op before the first): the gradients so far into the fp32 masters."""
        for p, m in zip(self.params, self.masters):
            if m is not p and p.grad is not None:
                m.grad = p.grad.float() if m.grad is None else m.grad.add_(p.grad)
                p.grad = None

    @torch.no_grad()
    def step(self, max_grad_norm: float) -> float:
        """Clip by the global norm of all gradients (computed in fp32, as torch's clip_grad_norm_), then AdamW a
        chunk at a time. Returns the norm before clipping."""
        grads = []  # each parameter's gradient, taken off the tensors so that AdamW sees only one chunk's at a time
        for p, m in zip(self.params, self.masters):
            if m is not p and p.grad is not None and m.grad is not None:  # earlier micro-batches + the last one
                m.grad.add_(p.grad)
            grads.append(m.grad if m.grad is not None else p.grad)  # fp32, or the bf16 gradient of one micro-batch
            p.grad = m.grad = None
        live = [i for i, g in enumerate(grads) if g is not None]
        norms = [self.norm(grads[i]) for i in live]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded (FSDP): the global norm
        coef = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0) if max_grad_norm > 0 else None
        del norms
        for chunk in self.chunks(live):
            for i in chunk:
                m = self.masters[i]
                m.grad, grads[i] = grads[i].float(), None  # bf16 -> fp32 is exact; fp32 stays the same tensor
                if coef is not None:
                    m.grad.mul_(coef)
            self.opt.step()  # AdamW moves only the masters that hold a gradient: this chunk
            for i in chunk:
                p, m = self.params[i], self.masters[i]
                m.grad = None
                if m is not p:
                    p.copy_(m)
        return float(norm)

    def norm(self, g: torch.Tensor) -> torch.Tensor:
        """The fp32 2-norm of one gradient; a bf16 one a CHUNK of elements at a time, since vector_norm(dtype=fp32)
        makes an fp32 copy of its whole input (544 MB for a 151k-token embedding's gradient)."""
        if g.dtype == torch.float32 or hasattr(g, "full_tensor"):  # fp32, or sharded (FSDP: fp32)
            return torch.linalg.vector_norm(g, dtype=torch.float32)
        parts = [torch.linalg.vector_norm(part, dtype=torch.float32) for part in g.reshape(-1).split(self.CHUNK)]
        return torch.linalg.vector_norm(torch.stack(parts))

    def chunks(self, indices: list):
        """The parameters in order, in groups of at most CHUNK elements; a bigger parameter (the embedding, the head)
        alone and after the rest, when most bf16 gradients are already freed (a lower peak, the same update)."""
        big = [i for i in indices if self.masters[i].numel() > self.CHUNK]
        chunk, size = [], 0
        for i in [i for i in indices if i not in big]:
            if chunk and size + self.masters[i].numel() > self.CHUNK:
                yield chunk
                chunk, size = [], 0
            chunk.append(i)
            size += self.masters[i].numel()
        if chunk:
            yield chunk
        yield from ([i] for i in big)

    def named(self, sd: dict) -> dict:
        """torch's optimizer state (parameters by index) -> by parameter name, as FSDP's full state dict has it."""
        return {"state": {self.names[i]: v for i, v in sd["state"].items()},
                "param_groups": [dict(g, params=[self.names[i] for i in g["params"]]) for g in sd["param_groups"]]}

    def state_dict(self) -> dict:
        return {"masters": {n: m.detach().clone() for n, m in zip(self.names, self.masters)},
                "optimizer": self.named(self.opt.state_dict())}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for n, p, m in zip(self.names, self.params, self.masters):
            m.copy_(state["masters"][n])
            if m is not p:
                p.copy_(m)
        index, opt = {n: i for i, n in enumerate(self.names)}, state["optimizer"]
        self.opt.load_state_dict({"state": {index[n]: v for n, v in opt["state"].items()},
                                  "param_groups": [dict(g, params=[index[n] for n in g["params"]])
                                                   for g in opt["param_groups"]]})


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """transformers' get_cosine_schedule_with_warmup: the lr factor at optimizer step `step` (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------
# output

class Progress:
    """One status line: step, loss, lr, tokens/s, time left (redrawn on a terminal, else printed every 10%)."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet, self.t0, self.tty = total, quiet, time.perf_counter(), sys.stderr.isatty()

    def update(self, step: int, loss: float, lr: float, tokens: int) -> None:
        if self.quiet:
            return
        dt = time.perf_counter() - self.t0
        left = dt / max(step, 1) * (self.total - step)
        line = (f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {tokens / max(dt, 1e-9):.0f} tok/s | "
                f"{_clock(dt)} elapsed, {_clock(left)} left")
        if self.tty:
            print("\r" + line, end="\n" if step == self.total else "", file=sys.stderr, flush=True)
        elif step == self.total or step % max(1, self.total // 10) == 0:
            print(line, file=sys.stderr, flush=True)


def _clock(s: float) -> str:
    return f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{int(s % 60):02d}"


def loss_curve_svg(metrics: list, path: Path) -> None:
    """The training loss per step as a small SVG line chart (no plotting library needed)."""
    if not metrics:
        return
    W, H, pad = 640, 360, 50
    xs, ys = [m["step"] for m in metrics], [m["loss"] for m in metrics]
    lo, hi = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    x = lambda s: pad + (s - xs[0]) / max(1, xs[-1] - xs[0]) * (W - 2 * pad)  # noqa: E731
    y = lambda v: H - pad - (v - lo) / (hi - lo) * (H - 2 * pad)  # noqa: E731
    points = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(xs, ys))
    ticks = "".join(f'<text x="{pad - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>'
                    for v in (lo, (lo + hi) / 2, hi))
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">'
        f'<rect width="{W}" height="{H}" fill="white"/>'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{points}"/>'
        f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="black"/>{ticks}'
        f'<text x="{pad}" y="{H - pad + 18}">step {xs[0]}</text>'
        f'<text x="{W - pad}" y="{H - pad + 18}" text-anchor="end">step {xs[-1]}</text>'
        f'<text x="{W / 2}" y="24" text-anchor="middle">training loss</text></svg>\n')


# -----------------------------------------------------------------------------

def finetune(args: TrainArgs) -> Path:
    """Supervised fine-tuning from args; returns the output directory (a checkpoint in the original layout)."""
    check(args)
    ctx = dist_utils.setup(args.device)
    out = Path(args.output)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if ctx.rank == 0 and not args.quiet else \
        (lambda *a: None)
    _seed(args.seed)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = nanovl.load(args.model, dtype=ctx.load_dtype(dtype), device=ctx.device)
    if model.tokenizer is None:
        raise NanovlError(f"{args.model} has no tokenizer files: training needs them")
    gen, chosen = recipe(args, args.model)
    for k, v in chosen.items():
        setattr(args, k, v)
    if chosen:
        say(f"[{gen} recipe: {', '.join(f'{k}={v}' for k, v in chosen.items())}]")
    c = model.config
    meta = args.meta or {"data": {"root": args.root, "annotation": args.data, "data_augment": args.data_augment,
                                  "repeat_time": 1}}
    dataset = (PreferenceDataset if args.mpo else SupervisedDataset)(
        meta, model.tokenizer, template=args.template or c.template, max_seq_length=args.max_seq_length,
        dynamic_image_size=c.dynamic_image_size if args.dynamic_image_size is None else args.dynamic_image_size,
        use_thumbnail=c.use_thumbnail if args.use_thumbnail is None else args.use_thumbnail,
        min_dynamic_patch=args.min_dynamic_patch or c.min_dynamic_patch, max_dynamic_patch=args.max_dynamic_patch,
        min_num_frame=args.min_num_frame, max_num_frame=args.max_num_frame, num_image_token=c.num_image_token,
        data_augment=args.data_augment, seed=args.seed, image_size=c.image_size,
        sampling_method=args.sampling_method, skip_bad=args.skip_bad_samples)
    if args.check_data:
        return check_data(dataset, say)
    if args.mpo and args.use_packed_ds:
        raise NanovlError("--mpo trains on padded pairs: drop --use-packed-ds")
    if args.use_packed_ds and (args.max_steps <= 0 or args.per_device_batch_size != 1):
        raise NanovlError("--use-packed-ds needs --max-steps (a packed stream has no length, as the original) and "
                          "--per-device-batch-size 1 (one packed row per micro-batch)")
    if args.template:
        c.template = args.template
    c.max_dynamic_patch, c.min_dynamic_patch = args.max_dynamic_patch, dataset.min_dynamic_patch
    trainable = configure(model, args)
    if not trainable:
        raise NanovlError("nothing to train: every parameter is frozen (check --freeze-* and --use-*-lora)")
    reference = None
    if args.mpo and not (args.use_llm_lora or args.use_backbone_lora):  # a frozen copy (with LoRA: adapters off)
        reference = nanovl.load(args.model, dtype=ctx.load_dtype(dtype), device=ctx.device).requires_grad_(False)
        ctx.wrap(reference)
    model.train()
    ctx.wrap(model)
    objective = MPO(model, reference, args.beta, (args.sigmoid_loss_weight, args.bco_pair_loss_weight,
                                                  args.rpo_alpha)) if args.mpo else Supervised(model, args)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = MasterAdamW(named, args.learning_rate, args.weight_decay)

    if args.use_packed_ds:
        packer = Packer(model.tokenizer, c.num_image_token, args.max_packed_tokens, args.num_images_expected,
                        args.max_buffer_size, args.strict_mode, args.allow_overflow)
        stream = PackedBatches(dataset, packer, args.gradient_accumulation_steps, ctx.rank, ctx.world, args.seed,
                               args.dataloader_num_workers, args.max_packed_tokens if args.strict_mode else 0)
        total, what = args.max_steps, (f"packed rows of <= {args.max_packed_tokens} tokens and "
                                       f"{args.num_images_expected} tiles")
    else:
        stream = Batches(dataset, args.per_device_batch_size, args.gradient_accumulation_steps, ctx.rank, ctx.world,
                         args.seed, args.dataloader_num_workers, collate_pairs if args.mpo else collate)
        total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * stream.steps_per_epoch())
        what = f"{args.per_device_batch_size} samples"
    warmup = args.warmup_steps or math.ceil(total * args.warmup_ratio)
    say(f"[{len(dataset)} samples, {total} steps of {ctx.world} process(es) x {args.gradient_accumulation_steps} "
        f"micro-batch(es) of {what}, warmup {warmup}, {sum(p.numel() for p in trainable) / 1e6:.2f}M trainable "
        f"parameters, {args.dtype} on {ctx.device}]")

    step, metrics = 0, []
    if args.resume:
        step, metrics = resume(args, out, model, opt, stream, ctx, objective)
        say(f"[resumed at step {step} from {args.resume}]")
    out.mkdir(parents=True, exist_ok=True)
    if ctx.rank == 0:
        (out / "train_args.json").write_text(json.dumps(asdict(args), indent=2) + "\n")
    progress, t0, tokens_seen, last = Progress(total, args.quiet or ctx.rank != 0), time.perf_counter(), 0, None
    log = open(out / "metrics.jsonl", "w") if ctx.rank == 0 else None
    for row in metrics if log else []:  # a resumed run's file starts with the steps before the checkpoint
        log.write(json.dumps(row) + "\n")
    steps = iter(stream)
    for step in range(step + 1, total + 1):
        lr = args.learning_rate * cosine_with_warmup(step - 1, warmup, total)
        for group in opt.opt.param_groups:
            group["lr"] = lr
        losses, n_tokens, n_learned, extra = [], 0, 0, {}
        for batch in next(steps):
            if not batch and (ctx.world == 1 or last is None):  # every sample of it was bad (and skipped)
                continue
            if not batch:  # the other processes still need this one's share of the sharded model: learn nothing
                batch = dict(last, labels=torch.full_like(last["labels"], -100))
            last = batch
            loss, learned, logged = objective(batch)
            opt.accumulate()  # the earlier micro-batches' gradients into fp32 before this backward adds to them
            (loss / args.gradient_accumulation_steps).backward()
            for k, v in logged.items():
                extra.setdefault(k, []).append(v)
            if learned:
                losses.append(loss.item())
            n_tokens += int(batch["attention_mask"].sum()) if learned else 0
            n_learned += learned
        grad_norm = opt.step(args.max_grad_norm)
        loss_value = ctx.mean(sum(losses) / max(len(losses), 1))
        tokens_seen += ctx.sum(n_tokens)
        row = dict(step=step, loss=loss_value, lr=lr, grad_norm=grad_norm, tokens=ctx.sum(n_tokens),
                   learned_tokens=ctx.sum(n_learned), seconds=round(time.perf_counter() - t0, 3),
                   **{k: ctx.mean(sum(v) / len(v)) for k, v in extra.items()})
        metrics.append(row)
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()
        progress.update(step, loss_value, lr, tokens_seen)
        if args.save_steps and step % args.save_steps == 0 and step < total:
            save_checkpoint(model, opt, args, out / f"checkpoint-{step}", step, metrics, stream, ctx, objective)
    bad = stream.bad
    if log:
        log.close()
    if bad:
        say(f"[skipped {len(bad)} bad sample(s): {'; '.join(f'{k}: {v}' for k, v in list(bad.items())[:5])}"
            f"{' ...' if len(bad) > 5 else ''}]")
    save_final(model, args, out, ctx)
    if ctx.rank == 0:
        loss_curve_svg(metrics, out / "loss.svg")
        say(f"[saved {out}: metrics.jsonl, loss.svg, the model in the original layout]")
    ctx.close()
    return out


class Supervised:
    """The supervised objective: compute_loss with --loss-reduction. batch -> (loss, learned tokens, metrics)."""

    def __init__(self, model, args):
        self.model, self.reduction, self.all_reduce = model, args.loss_reduction, args.loss_reduction_all_gather

    def __call__(self, batch):
        loss, _, _, learned = compute_loss(self.model, batch, self.reduction, self.all_reduce, return_parts=True)
        return loss, learned, {}


def check(args: TrainArgs) -> None:
    """Options outside their range, before anything loads."""
    if (args.meta is None) == (args.data is None):
        raise NanovlError("give --meta META.json or --data FILE.jsonl (with --root DIR), not both")
    if args.loss_reduction not in REDUCTIONS:
        raise NanovlError(f"--loss-reduction must be one of {', '.join(REDUCTIONS)}")
    if args.dtype not in ("bf16", "fp32"):
        raise NanovlError(f"--dtype must be bf16 or fp32, got {args.dtype!r}")
    for name in ("per_device_batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(args, name) < 1:
            raise NanovlError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("use_backbone_lora", "use_llm_lora", "save_steps", "warmup_steps", "dataloader_num_workers"):
        if getattr(args, name) < 0:
            raise NanovlError(f"--{name.replace('_', '-')} must not be negative")
    for name in ("learning_rate", "weight_decay", "drop_path_rate"):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise NanovlError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if not 0 <= args.warmup_ratio <= 1 or not 0 <= args.lora_dropout < 1:
        raise NanovlError("--warmup-ratio must be in [0, 1] and --lora-dropout in [0, 1)")
    if args.max_steps <= 0 and not args.num_train_epochs > 0:
        raise NanovlError("give --num-train-epochs > 0 or --max-steps > 0")


def check_data(dataset, say) -> Path:
    """--check-data: preprocess every sample, report the bad ones with file:line, train nothing."""
    good = dataset.check()
    for where, reason in dataset.bad.items():
        print(f"{where}: {reason}", file=sys.stderr)
    say(f"[{good} of {len(dataset)} samples are good, {len(dataset.bad)} bad]")
    if dataset.bad:
        raise NanovlError(f"{len(dataset.bad)} bad sample(s) (listed above); fix them or train with "
                          "--skip-bad-samples")
    return None


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(model, opt, args, path: Path, step: int, metrics: list, stream, ctx, objective=None) -> None:
    """checkpoint-N/: the model (original layout) and training_state.pt (fp32 masters, optimizer, step, RNG, metrics,
    the data position), enough to continue exactly where the run was; older ones beyond save_total_limit are
    removed. Several processes: the full (gathered) state, so that any number of processes can resume it; each
    packing process adds its own data_state_rank<r>.pt (its buffers)."""
    trainer = ctx.gather_trainer_state(model, opt)
    save_model(model, path, args, ctx)
    if args.use_packed_ds:
        torch.save(stream.state(), path / f"data_state_rank{ctx.rank}.pt")
    if ctx.rank == 0:
        running = objective.running.state_dict() if hasattr(objective, "running") else None
        torch.save(dict(trainer=trainer, step=step, metrics=metrics, rng=_rng_state(), world=ctx.world,
                        data=None if args.use_packed_ds else stream.state(), mpo_running_mean=running),
                   path / "training_state.pt")
        if args.save_total_limit:
            old = sorted(path.parent.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            for p in old[:-args.save_total_limit]:
                shutil.rmtree(p)
    ctx.barrier()


def resume(args, out: Path, model, opt, stream, ctx, objective=None) -> tuple[int, list]:
    path = Path(args.resume)
    if args.resume == "auto":
        found = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if not found:
            raise NanovlError(f"--resume auto: no checkpoint-N folder in {out}")
        path = found[-1]
    if not (path / "training_state.pt").exists():
        raise NanovlError(f"--resume {path}: no training_state.pt (a checkpoint-N folder of a nanovl run)")
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    try:
        ctx.load_trainer_state(model, opt, state["trainer"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise NanovlError(f"--resume {path}: the checkpoint's trainable parameters do not match this run's "
                          f"(other --freeze / --use-*-lora flags?): {e}") from None
    if args.use_packed_ds:
        rank_file = path / f"data_state_rank{min(ctx.rank, state['world'] - 1)}.pt"
        stream.load_state(torch.load(rank_file, map_location="cpu", weights_only=False))
    elif state.get("data"):
        stream.load_state(state["data"])
    if state.get("mpo_running_mean") and hasattr(objective, "running"):
        objective.running.load_state_dict(state["mpo_running_mean"])
    if state["world"] == ctx.world:  # the same processes: the same random streams (drop path, LoRA dropout)
        _set_rng_state(state["rng"])
    return state["step"], state["metrics"]


def _rng_state() -> dict:
    s = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_model(model, path: Path, args, ctx) -> None:
    """The model in the original layout with LoRA merged (training goes on with the adapters). Several processes:
    the sharded model is gathered first; process 0 writes."""
    sd = ctx.full_state_dict(model)
    if ctx.rank == 0:
        model.save_pretrained(path, dtype=_dtype(args), state_dict=merge_lora_state(model, sd))
    ctx.barrier()


def save_final(model, args, out: Path, ctx) -> None:
    """The output directory: the merged model in the original layout (default), or with --save-lora-adapters the
    adapters alone (adapter_model.safetensors under the original's peft names + adapter_config.json), with any
    other trained tensor."""
    if not (args.save_lora_adapters and (args.use_llm_lora or args.use_backbone_lora)):
        return save_model(model, out, args, ctx)
    sd = ctx.full_state_dict(model)
    if ctx.rank == 0:
        from safetensors.torch import save_file
        adapters = lora_state_dict(model, state_dict=sd)
        names = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
        if names:  # other trained tensors (mlp1, unfrozen layers) travel with the adapters: nothing is lost
            base = weights.original_state_dict(model, state_dict={k: v for k, v in sd.items() if k in names})
            adapters.update(base)
        save_file({k: v.to(_dtype(args)).contiguous() for k, v in adapters.items()},
                  str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(json.dumps(dict(
            base_model=str(args.model), r=args.use_llm_lora or args.use_backbone_lora,
            lora_alpha=2 * (args.use_llm_lora or args.use_backbone_lora), lora_dropout=args.lora_dropout,
            use_llm_lora=args.use_llm_lora, use_backbone_lora=args.use_backbone_lora), indent=2) + "\n")
    ctx.barrier()


def _dtype(args) -> torch.dtype:
    """Checkpoints are written in the training dtype: bf16 as the original's, or fp32."""
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]


def args_from_dict(d: dict) -> TrainArgs:
    names = {f.name for f in fields(TrainArgs)}
    unknown = set(d) - names
    if unknown:
        raise NanovlError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    return TrainArgs(**d)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after the tokenizer is built
