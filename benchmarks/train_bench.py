"""nanovl's training step vs transformers (+ peft) on CPU, at InternVL3-1B size (random weights).

    python benchmarks/train_bench.py            # the full run (make train-bench): writes benchmarks/train_results.md
    python benchmarks/train_bench.py --smoke    # a tiny checkpoint, seconds (make train-bench-smoke, CI)

One optimizer step = what `python -m nanovl.train` runs per step: the objective on each micro-batch, backward of
loss / accumulation, the bf16 gradients moved into fp32 masters, clipping at 1.0 and AdamW (trainer.finetune). The
step is built from nanovl's own training parts (trainer.configure, Supervised, MasterAdamW, mpo.MPO, packing.Packer,
distributed.setup / wrap); transformers' InternVLForConditionalGeneration (+ peft for LoRA) runs the same data
through the same fp32-master AdamW, in the same process, alternating with nanovl. Rows:

    full fine-tuning (LLM + mlp1) and LoRA r16 (LLM), frozen ViT, 6 tiles, 2048 tokens: nanovl vs transformers
    gradient checkpointing on vs off (full): time and memory, both implementations
    packed vs padded (LoRA): several short samples, tokens/s and padding waste; transformers padded
    1 vs 2 processes (torchrun, gloo, FSDP2): tokens/s and memory
    one MPO step (sigmoid + bco_pair + sft), LoRA (reference = adapters off) and full (reference = a frozen copy)

Memory: the training state (weights, fp32 masters, AdamW moments), counted exactly from the tensors, plus the step's
peak resident-memory rise over its start (RSS sampled every 2 ms from /proc/self/statm, after gc and malloc_trim(0)).
"""
import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
import bench  # noqa: E402  (benchmarks/bench.py: the random-weight checkpoints, the machine, the CPU share)

NAME = "InternVL3-1B"
LR, WD, LORA_R = 1e-5, 0.05, 16
HF_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # the original's


class Sizes:
    """Token counts of the benchmark's data: the real run, or tiny ones for --smoke (same shapes of work)."""

    def __init__(self, smoke: bool, cfg: dict):
        self.smoke, self.tiles = smoke, 6
        self.vocab = cfg["llm_config"]["vocab_size"]
        self.ids = bench.TINY_IMG_IDS if smoke else bench.MODELS[NAME]["img_ids"]  # <img>, </img>, <IMG_CONTEXT>
        vc = cfg["vision_config"]
        self.image_size = cfg.get("force_image_size") or vc["image_size"]
        self.num_image_token = int((self.image_size // vc["patch_size"]) ** 2 * cfg["downsample_ratio"] ** 2)
        self.seq = 96 if smoke else 2048  # one sample: 6 tiles and text, this many tokens in all
        self.short = (8, 40) if smoke else (64, 640)  # packing: text tokens of each short 1-tile sample
        self.n_short = 6
        self.max_packed = 96 if smoke else 2048


def sample(z: Sizes, tiles: int, n_tokens: int, seed: int, answer_share: float = 2 / 3) -> dict:
    """One sample as SupervisedDataset gives it (unpadded): 24 text ids, <img>, num_image_token x tiles
    <IMG_CONTEXT>, </img>, a question, then the answer, the only learned tokens; n_tokens in all."""
    g = torch.Generator().manual_seed(seed)
    start, end, ctx = z.ids
    text = lambda n: torch.randint(10, start if start > 10 else z.vocab, (n,), generator=g)  # noqa: E731
    image = torch.cat([torch.tensor([start]), torch.full((tiles * z.num_image_token,), ctx), torch.tensor([end])])
    rest = n_tokens - 24 - len(image)
    assert rest >= 4, f"{n_tokens} tokens cannot hold {tiles} tiles"
    answer = max(2, int(rest * answer_share))
    ids = torch.cat([text(24), image, text(rest - answer), text(answer)])  # (T,)
    labels = torch.full_like(ids, -100)
    labels[-answer:] = ids[-answer:]
    return dict(input_ids=ids, labels=labels, position_ids=torch.arange(len(ids)),
                pixel_values=torch.randn(tiles, 3, z.image_size, z.image_size, generator=g),
                image_flags=torch.ones(tiles, dtype=torch.long))


def pair(z: Sizes, seed: int) -> dict:
    """An MPO pair as PreferenceDataset gives it: one prompt with 6 tiles, a chosen and a rejected answer of the
    same length (each row z.seq tokens), the tiles once."""
    a, b = sample(z, z.tiles, z.seq, seed), sample(z, z.tiles, z.seq, seed + 1000)
    n = int((a["labels"] != -100).sum())
    rejected = torch.cat([a["input_ids"][:-n], b["input_ids"][-n:]])
    return dict(chosen_input_ids=a["input_ids"], chosen_labels=a["labels"], rejected_input_ids=rejected,
                rejected_labels=torch.cat([a["labels"][:-n], rejected[-n:]]), pixel_values=a["pixel_values"],
                image_flags=a["image_flags"])


def short_samples(z: Sizes, seed: int = 7) -> list:
    """z.n_short samples of 1 tile and a random amount of text (z.short): the data of packed vs padded."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(z.short[0], z.short[1] + 1, (z.n_short,), generator=g).tolist()
    return [sample(z, 1, 24 + z.num_image_token + 2 + n, seed + k, answer_share=0.5) for k, n in enumerate(lengths)]


class Ids:
    """The three token ids packing needs, for a benchmark that has no tokenizer files (Packer asks token_to_id)."""

    def __init__(self, ids):
        from nanovl.template import IMG_CONTEXT, IMG_END, IMG_START
        self.table = dict(zip((IMG_START, IMG_END, IMG_CONTEXT), ids))

    def token_to_id(self, token):
        return self.table[token]


def padded_and_packed(z: Sizes) -> tuple[list, list]:
    """The same short samples as right-padded micro-batches of 2 (collate) and as packed rows of at most
    z.max_packed tokens (Packer + packed_collate, strict_mode off: no padding tokens or tiles)."""
    from nanovl.train import collate
    from nanovl.train.packing import Packer, packed_collate

    items = short_samples(z)
    padded = [collate(items[i:i + 2]) for i in range(0, len(items), 2)]
    packer = Packer(Ids(z.ids), z.num_image_token, z.max_packed, num_images_expected=40, strict_mode=False)
    rows = [r for x in items for r in packer.add(x)] + packer.flush()
    return padded, [packed_collate([r]) for r in rows]


# ---------------------------------------------------------------- the models and their objectives

def train_args(ckpt: Path, mode: str, grad_checkpoint: bool = True):
    from nanovl.train.trainer import TrainArgs
    return TrainArgs(model=str(ckpt), output="-", data="-", freeze_backbone=True, drop_path_rate=0.0,
                     use_llm_lora=LORA_R if mode == "lora" else 0, grad_checkpoint=grad_checkpoint,
                     learning_rate=LR, weight_decay=WD)


def nanovl_model(ckpt: Path, z: Sizes, mode: str, device="cpu", dtype=torch.bfloat16):
    """nanovl.load + trainer.configure (freeze the ViT; full: LLM + mlp1 train; LoRA: adapters only) -> (model,
    the trainer's supervised objective)."""
    import nanovl
    from nanovl.train.trainer import Supervised, configure

    model = nanovl.load(ckpt, dtype=dtype, device=device)
    model.img_context_token_id = z.ids[2]  # no tokenizer files: the benchmark works from token ids
    args = train_args(ckpt, mode)
    configure(model, args)
    model.train()
    return model, Supervised(model, args)


class HFSupervised:
    """transformers' own loss (labels= : token mean of the shifted cross-entropy, nanovl's `token` reduction)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, batch):
        d = self.model.device
        out = self.model(input_ids=batch["input_ids"].to(d), pixel_values=batch["pixel_values"].to(d),
                         attention_mask=batch["attention_mask"].long().to(d), labels=batch["labels"].to(d))
        return out.loss, int((batch["labels"][:, 1:] != -100).sum()), {}


def hf_model(ckpt: Path, mode: str, device="cpu", dtype=torch.bfloat16):
    """InternVLForConditionalGeneration (SDPA) of the transformers-layout copy, ViT frozen; LoRA: peft's
    inject_adapter_in_model on the language model, r16 alpha 32 dropout 0.05 on the original's target modules."""
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    model.model.vision_tower.requires_grad_(False)
    if mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model
        model.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.05,
                                           target_modules=HF_LORA_TARGETS), model.model.language_model)
        for n, p in model.named_parameters():  # the same dtype as nanovl's adapters (the base weights')
            if "lora_" in n:
                p.data = p.data.to(dtype)
    set_checkpointing("hf", model, True)
    model.train()
    return model, HFSupervised(model)


def set_checkpointing(impl: str, model, on: bool) -> None:
    """Activation checkpointing of the decoder blocks (nanovl always checkpoints its ViT in training, as the
    original; the ViT is frozen here, so it keeps no activations either way)."""
    if impl == "nanovl":
        model.language_model.gradient_checkpointing = on
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def optimizer(model, impl: str = "nanovl"):
    """The trainer's AdamW over fp32 masters of the trainable parameters; for transformers' model with the
    gradient layout of DeepSpeed's bf16 mode (`Fp32GradBuffers`)."""
    from nanovl.train.trainer import MasterAdamW

    class Fp32GradBuffers(MasterAdamW):
        """The same AdamW, but each micro-batch's gradients go into fp32 buffers right after its backward, as
        DeepSpeed's bf16 optimizer (the original recipe's) does; nanovl keeps the last one in bf16 until the step."""
        fp32_buffers = True

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return (MasterAdamW if impl == "nanovl" else Fp32GradBuffers)(named, LR, WD)


def train_step(objective, opt, micro_batches: list, sync=lambda: None) -> dict:
    """One optimizer step as trainer.finetune runs it: for each micro-batch the objective, the earlier gradients
    into the fp32 masters, backward of loss / accumulation; then clip at 1.0 and AdamW."""
    t0, losses = time.perf_counter(), []
    for batch in micro_batches:
        loss, _, _ = objective(batch)
        opt.accumulate()
        (loss / len(micro_batches)).backward()
        if getattr(opt, "fp32_buffers", False):
            opt.accumulate()
        losses.append(loss.item())
    sync()
    t1 = time.perf_counter()
    opt.step(1.0)
    sync()
    t2 = time.perf_counter()
    return dict(seconds=t2 - t0, fwd_bwd_s=t1 - t0, opt_s=t2 - t1, loss=statistics.mean(losses))


# ---------------------------------------------------------------- memory

def rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """with PeakRSS() as m: ... -> m.rise: the peak resident memory during the block over its start, sampled every
    2 ms by a thread (freed heap returned to the system first, so the start is not inflated by earlier steps)."""

    def __enter__(self):
        gc.collect()
        malloc_trim()
        self.start = self.peak = rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.rise = max(self.peak, rss()) - self.start


def state_bytes(*modules, opt=None) -> int:
    """Bytes of every distinct storage of the modules' parameters and buffers, the optimizer's fp32 masters and its
    AdamW moments: the memory a training run holds between steps."""
    tensors = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
    if opt is not None:
        tensors += opt.masters + [v for s in opt.opt.state.values() for v in s.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tokens_of(batches: list) -> tuple[int, int]:
    """(real tokens, positions computed incl. padding) of a step's micro-batches."""
    return (sum(int(b["attention_mask"].sum()) for b in batches), sum(b["input_ids"].numel() for b in batches))


def measured(fn, opt, batches, state, **what) -> dict:
    with PeakRSS() as m:
        r = train_step(fn, opt, batches)
    real, positions = tokens_of(batches)
    r.update(what, tokens=real, positions=positions, tokens_per_s=real / r["seconds"], rise_bytes=m.rise,
             state_bytes=state, total_bytes=state + m.rise)
    print(f"[train-bench] {' '.join(f'{k}={v}' for k, v in what.items())}: {r['seconds']:.2f} s/step "
          f"({r['tokens_per_s']:.0f} tok/s), state {state / 2**30:.2f} GiB + step rise {m.rise / 2**30:.2f} GiB, "
          f"loss {r['loss']:.4f}", file=sys.stderr, flush=True)
    return r


def release() -> None:
    """After `del` of a phase's models and optimizers: collect them and return their memory to the system."""
    gc.collect()
    malloc_trim()


# ---------------------------------------------------------------- the phases

def phase_full(ckpts, z: Sizes, reps: int) -> dict:
    """Full fine-tuning, nanovl and transformers in turn (one model at a time: two full optimizer states do not fit
    beside each other at this size), each: load, a warm-up step (it also allocates the AdamW moments), then the
    step with checkpointing on and off."""
    from nanovl.train import collate

    batch = [collate([sample(z, z.tiles, z.seq, 0)])]
    runs, facts = [], {}
    for rep in range(reps):
        for impl in (["nanovl", "hf"] if rep % 2 == 0 else ["hf", "nanovl"]):
            model, objective = nanovl_model(ckpts[impl], z, "full") if impl == "nanovl" else \
                hf_model(ckpts[impl], "full")
            opt = optimizer(model, impl)
            warm = train_step(objective, opt, batch)
            facts.setdefault(impl, dict(trainable=trainable(model), first_loss=warm["loss"]))
            for on in ([True, False] if rep % 2 == 0 else [False, True]):
                set_checkpointing(impl, model, on)
                runs.append(measured(objective, opt, batch, state_bytes(model, opt=opt), impl=impl, mode="full",
                                     ckpt=on, rep=rep))
            del model, objective, opt
            release()
    return dict(runs=runs, facts=facts)


def phase_lora(ckpts, z: Sizes, reps: int) -> dict:
    """LoRA: both models at once (adapters are small), alternating; then packed vs padded on short samples."""
    from nanovl.train import collate

    batch = [collate([sample(z, z.tiles, z.seq, 0)])]
    padded, packed = padded_and_packed(z)
    models = {"nanovl": nanovl_model(ckpts["nanovl"], z, "lora"), "hf": hf_model(ckpts["hf"], "lora")}
    opts = {impl: optimizer(m, impl) for impl, (m, _) in models.items()}
    facts = {impl: dict(trainable=trainable(m), first_loss=train_step(o, opts[impl], batch)["loss"],
                        adapter_dtype=str(next(p.dtype for n, p in m.named_parameters() if "lora_" in n)))
             for impl, (m, o) in models.items()}
    state = {impl: state_bytes(m, opt=opts[impl]) for impl, (m, _) in models.items()}
    runs = []
    for rep in range(reps):
        for impl in (["nanovl", "hf"] if rep % 2 == 0 else ["hf", "nanovl"]):
            runs.append(measured(models[impl][1], opts[impl], batch, state[impl], impl=impl, mode="lora", ckpt=True,
                                 rep=rep))
    variants = [("nanovl", "padded", padded), ("nanovl", "packed", packed), ("hf", "padded", padded)]
    for impl, layout, batches in variants if not z.smoke else []:  # warm-up: the new shapes
        train_step(models[impl][1], opts[impl], batches)
    packing = []
    for rep in range(reps):
        for impl, layout, batches in (variants if rep % 2 == 0 else variants[::-1]):
            packing.append(measured(models[impl][1], opts[impl], batches, state[impl], impl=impl, mode="lora",
                                    layout=layout, rep=rep))
    del models, opts
    release()
    real, positions = tokens_of(padded)
    layout = dict(samples=z.n_short, sample_tokens=[len(x["input_ids"]) for x in short_samples(z)],
                  padded_batches=[list(b["input_ids"].shape) for b in padded],
                  packed_rows=[b["input_ids"].shape[1] for b in packed], padding_waste=1 - real / positions)
    return dict(runs=runs, facts=facts, packing=packing, layout=layout)


def phase_mpo(ckpts, z: Sizes, reps: int) -> dict:
    """One MPO step (trainer's objective mpo.MPO, default weights and beta), LoRA with the adapters-off reference,
    then full with a frozen copy as reference (as trainer.finetune builds them)."""
    import nanovl
    from nanovl.train import collate_pairs
    from nanovl.train.mpo import MPO

    batch = [collate_pairs([pair(z, 0)])]
    runs, facts = [], {}
    for mode in ("lora", "full"):
        model, _ = nanovl_model(ckpts["nanovl"], z, mode)
        reference = None
        if mode == "full":
            reference = nanovl.load(ckpts["nanovl"], dtype=torch.bfloat16).requires_grad_(False)
            reference.img_context_token_id = z.ids[2]
        objective = MPO(model, reference, 0.1, (0.8, 0.2, 1.0))
        opt = optimizer(model)
        facts[mode] = dict(first_loss=train_step(objective, opt, batch)["loss"], trainable=trainable(model),
                           reference="adapters off (no copy)" if reference is None else "frozen copy")
        state = state_bytes(model, *([reference] if reference is not None else []), opt=opt)
        for rep in range(reps):
            runs.append(measured(objective, opt, batch, state, impl="nanovl", mode=mode, objective="mpo", rep=rep))
        del model, reference, objective, opt
        release()
    return dict(runs=runs, facts=facts)


def phase_processes(ckpt: Path, z: Sizes, steps: int, threads: int, smoke: bool) -> list:
    """torchrun with 1 and with 2 processes (gloo, FSDP2 for 2), full fine-tuning, one sample of z.seq tokens per
    process and step; the cores shared out: threads per process = threads // processes."""
    out = []
    for n in (1, 2):
        per = max(1, threads // n)
        with tempfile.TemporaryDirectory() as d:
            result = Path(d) / "result.json"
            env = dict(os.environ, OMP_NUM_THREADS=str(per))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                   str(Path(__file__).resolve()), "--dist-worker", "--ckpt", str(ckpt), "--threads", str(per),
                   "--steps", str(steps), "--json", str(result)] + (["--smoke"] if smoke else [])
            print(f"[train-bench] {n} process(es) x {per} thread(s): torchrun ...", file=sys.stderr, flush=True)
            run = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-4000:]}")
            r = json.loads(result.read_text())
        print(f"[train-bench] {n} process(es): {statistics.median(r['step_s']):.2f} s/step, "
              f"{r['tokens_per_step'] / statistics.median(r['step_s']):.0f} tok/s", file=sys.stderr, flush=True)
        out.append(r)
    return out


def dist_worker(args) -> None:
    """One process of the 1-vs-2-process rows: the trainer's distributed setup (FSDP2 over the ViT and decoder
    blocks, bf16 compute from fp32 masters), full fine-tuning, `steps` steps (the first one a warm-up)."""
    import nanovl
    from nanovl.train import collate
    from nanovl.train import distributed as dist_utils
    from nanovl.train.trainer import Supervised, configure

    ctx = dist_utils.setup(args.device)
    torch.set_num_threads(args.threads)
    ckpt = Path(args.ckpt)
    z = Sizes(args.smoke, json.loads((ckpt / "config.json").read_text()))
    model = nanovl.load(ckpt, dtype=ctx.load_dtype(torch.bfloat16), device=ctx.device)
    model.img_context_token_id = z.ids[2]
    targs = train_args(ckpt, "full")
    configure(model, targs)
    model.train()
    ctx.wrap(model)
    opt, objective = optimizer(model), Supervised(model, targs)
    batch = [collate([sample(z, z.tiles, z.seq, ctx.rank)])]  # each process its own sample
    sync = torch.cuda.synchronize if ctx.device.startswith("cuda") else (lambda: None)
    times = []
    for _ in range(args.steps):
        ctx.barrier()
        t = time.perf_counter()
        train_step(objective, opt, batch, sync)
        ctx.barrier()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cuda_peak = torch.cuda.max_memory_allocated() if ctx.device.startswith("cuda") else 0
    total_peak, total_cuda = ctx.sum(peak), ctx.sum(cuda_peak)
    if ctx.rank == 0:
        Path(args.json).write_text(json.dumps(dict(
            processes=ctx.world, threads=args.threads, step_s=times[1:] or times, warmup_s=times[0],
            tokens_per_step=ctx.world * int(batch[0]["attention_mask"].sum()), peak_rss_sum_bytes=total_peak,
            cuda_peak_sum_bytes=total_cuda, device=ctx.device, sharded=ctx.world > 1)))
    ctx.close()


# ---------------------------------------------------------------- results.md

def med(runs, key, **match):
    vals = [r[key] for r in runs if all(r.get(k) == v for k, v in match.items())]
    return statistics.median(vals) if vals else float("nan")


def cell(runs, key, scale=1.0, fmt="{:.3g}", **match):
    vals = [r[key] * scale for r in runs if all(r.get(k) == v for k, v in match.items())]
    return bench.spread(vals, fmt)


def report(res: dict, args) -> str:
    m, z = res["machine"], res["sizes"]
    gib = 2 ** -30
    full, lora, mpo, procs = res["full"], res["lora"], res["mpo"], res["processes"]
    others = res["others_cpu_share"] + res["steal_share"]
    lines = [
        "# nanovl training step vs transformers + peft on this CPU" +
        (" (SMOKE: tiny checkpoint, numbers meaningless)" if args.smoke else ""), "",
        f"Written by `python benchmarks/train_bench.py{' --smoke' if args.smoke else ''}` on {m['date']} in "
        f"{res['elapsed_s'] / 60:.1f} minutes. Random weights at {'a tiny size' if args.smoke else NAME + ' size'} "
        f"(InternViT-300M + Qwen2-0.5B-like decoder, untied head) in the original layout, and a transformers-layout "
        f"copy of the same weights (`benchmarks/bench.py`'s checkpoints in `{Path(args.cache).name}/`).", "",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['capability']}), {m['ram_gib']:.0f} GiB RAM, torch threads "
        f"{res['threads']}; 1-minute load average {res['loadavg_before'][0]:.2f} before the run; during it other "
        f"processes used {res['others_cpu_share']:.0%} of the CPU and the hypervisor took {res['steal_share']:.0%}"
        + (" (**noisy numbers: rerun on a quiet machine**)" if others > 0.05 else ""),
        f"- versions: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {res['peft']}, "
        f"nanovl {m['nanovl']}",
        f"- data: one sample of {z['tiles']} tiles and {z['seq']} tokens (24 text, <img>, {z['tiles']} x "
        f"{z['num_image_token']} <IMG_CONTEXT>, </img>, a question, a learned answer of "
        f"{res['learned_tokens']} tokens), bf16 weights, fp32 pixels; frozen ViT; lr {LR}, weight decay {WD}, "
        f"clipping 1.0.",
        "- a step: what `nanovl.train` runs per optimizer step (objective, backward, clip, AdamW over fp32 masters "
        "of the trainable parameters: `trainer.MasterAdamW`, which keeps a single micro-batch's gradients in bf16 "
        "and converts them a chunk at a time in the step). transformers: "
        "`InternVLForConditionalGeneration.from_pretrained(dir, dtype=bfloat16, attn_implementation=\"sdpa\")`, its "
        "own loss (`labels=`), the same AdamW over fp32 masters with the gradients copied into fp32 buffers after "
        "each backward, as DeepSpeed's bf16 mode (the original recipe's) does; LoRA through peft's `inject_adapter_in_model` (r16, alpha 32, dropout 0.05 on "
        "q/k/v/o/gate/up/down, the adapters in bf16 like nanovl's). Checkpointing (transformers: "
        "`gradient_checkpointing_enable(use_reentrant=False)`) is on unless a row says off, as the original's "
        "default. Every timed step follows a warm-up step; nanovl and transformers alternate within one process; "
        f"median (min-max) of {args.reps} repetition(s).",
        "- memory: **state** = the weights, fp32 masters and AdamW moments between steps, counted from the tensors "
        "(exact); **step rise** = the peak resident memory during the step minus the resident memory at its start, "
        "sampled every 2 ms from `/proc/self/statm` after `gc.collect()` and `malloc_trim(0)` (activations, "
        "gradients, logits; a spike shorter than 2 ms can be missed); **total** = state + step rise. Not "
        "`ru_maxrss`: both implementations share one process.", "",
        "## One optimizer step", "",
        "| | nanovl | transformers (+ peft) | nanovl / transformers |", "|---|---|---|---|"]

    def row(label, runs, key, scale=1.0, fmt="{:.3g}", **match):
        a, b = med(runs, key, impl="nanovl", **match), med(runs, key, impl="hf", **match)
        lines.append(f"| {label} | {cell(runs, key, scale, fmt, impl='nanovl', **match)} | "
                     f"{cell(runs, key, scale, fmt, impl='hf', **match)} | {a / b:.2f}x |")

    def pair_row(label, runs, k1, k2, scale=1.0, **match):  # "a / b" in each cell, the ratio of the first
        a, b = ({i: med(runs, k, impl=i, **match) for i in ("nanovl", "hf")} for k in (k1, k2))
        lines.append(f"| {label} | {a['nanovl'] * scale:.3g} / {b['nanovl'] * scale:.3g} | "
                     f"{a['hf'] * scale:.3g} / {b['hf'] * scale:.3g} | {a['nanovl'] / a['hf']:.2f}x |")

    for label, runs, kind, on in (("full (LLM + mlp1)", full["runs"], "full", True),
                                  ("full, checkpointing off", full["runs"], "full", False),
                                  ("LoRA r16", lora["runs"], "lora", True)):
        row(f"{label}: seconds / step", runs, "seconds", mode=kind, ckpt=on)
        row(f"{label}: tokens / s", runs, "tokens_per_s", fmt="{:.0f}", mode=kind, ckpt=on)
        pair_row(f"{label}: forward + backward / optimizer (s)", runs, "fwd_bwd_s", "opt_s", mode=kind, ckpt=on)
        row(f"{label}: memory total (GiB)", runs, "total_bytes", gib, mode=kind, ckpt=on)
        pair_row(f"{label}: step rise / state (GiB)", runs, "rise_bytes", "state_bytes", gib, mode=kind, ckpt=on)
    for mode, phase in (("full", full), ("LoRA", lora)):
        f = phase["facts"]
        lines.append(f"| {mode}: trainable parameters / loss of the first step | {f['nanovl']['trainable'] / 1e6:.2f}M "
                     f"/ {f['nanovl']['first_loss']:.4f} | {f['hf']['trainable'] / 1e6:.2f}M / "
                     f"{f['hf']['first_loss']:.4f} | same weights, same data |")

    lines += ["", "## Activation checkpointing on vs off (full fine-tuning)", "",
              "| | checkpointing on | off | off / on |", "|---|---|---|---|"]
    for impl, label in (("nanovl", "nanovl"), ("hf", "transformers")):
        for key, what, scale in (("seconds", "seconds / step", 1.0), ("rise_bytes", "step rise (GiB)", gib),
                                 ("total_bytes", "memory total (GiB)", gib)):
            on, off = med(full["runs"], key, impl=impl, ckpt=True), med(full["runs"], key, impl=impl, ckpt=False)
            lines.append(f"| {label}: {what} | {on * scale:.3g} | {off * scale:.3g} | {off / on:.2f}x |")

    pk, lay = lora["packing"], lora["layout"]
    lines += ["", "## Packed vs padded (LoRA, the same short samples)", "",
              f"{lay['samples']} samples of 1 tile and {min(lay['sample_tokens'])}-{max(lay['sample_tokens'])} "
              f"tokens ({sum(lay['sample_tokens'])} in all), one optimizer step over all of them. Padded: "
              f"`collate` micro-batches of 2, shapes {lay['padded_batches']}, padding waste "
              f"{lay['padding_waste']:.0%} of the positions. Packed: `Packer` rows of at most {z['max_packed']} "
              f"tokens (no strict-mode padding), lengths {lay['packed_rows']}, block-diagonal attention. "
              "transformers has no packed path on CPU (it needs flash-attention varlen), so it runs the padded "
              "batches.", "",
              "| | nanovl packed | nanovl padded | transformers padded | packed / padded | packed / transformers |",
              "|---|---|---|---|---|---|"]
    for key, what, scale, fmt in (("tokens_per_s", "tokens / s (real tokens)", 1.0, "{:.0f}"),
                                  ("seconds", "seconds / step", 1.0, "{:.3g}"),
                                  ("rise_bytes", "step rise (GiB)", gib, "{:.3g}")):
        a, b, c = (med(pk, key, impl=i, layout=lt) for i, lt in (("nanovl", "packed"), ("nanovl", "padded"),
                                                                   ("hf", "padded")))
        lines.append(f"| {what} | {cell(pk, key, scale, fmt, impl='nanovl', layout='packed')} | "
                     f"{cell(pk, key, scale, fmt, impl='nanovl', layout='padded')} | "
                     f"{cell(pk, key, scale, fmt, impl='hf', layout='padded')} | {a / b:.2f}x | {a / c:.2f}x |")

    one, two = procs
    t1, t2 = statistics.median(one["step_s"]), statistics.median(two["step_s"])
    lines += ["", "## 1 vs 2 processes (torchrun, gloo; 2 processes: FSDP2)", "",
              f"Full fine-tuning, one {z['seq']}-token sample per process and step, the cores shared out "
              f"({one['threads']} thread(s) for 1 process, {two['threads']} each for 2). 1 process: bf16 weights and "
              "nanovl's fp32 masters; 2 processes: fp32 sharded weights, bf16 compute (FSDP's mixed-precision "
              "policy). Memory: the sum of the processes' peak RSS (`ru_maxrss`, fresh processes); "
              f"median of {len(one['step_s'])} step(s) after a warm-up.", "",
              "| | 1 process | 2 processes | 2 / 1 |", "|---|---|---|---|",
              f"| seconds / step | {t1:.3g} | {t2:.3g} | {t2 / t1:.2f}x |",
              f"| tokens / s | {one['tokens_per_step'] / t1:.0f} | {two['tokens_per_step'] / t2:.0f} | "
              f"{two['tokens_per_step'] / t2 / (one['tokens_per_step'] / t1):.2f}x |",
              f"| peak RSS, all processes (GiB) | {one['peak_rss_sum_bytes'] * gib:.2f} | "
              f"{two['peak_rss_sum_bytes'] * gib:.2f} | {two['peak_rss_sum_bytes'] / one['peak_rss_sum_bytes']:.2f}x |"]

    lines += ["", "## One MPO step (nanovl; sigmoid 0.8 + bco_pair 0.2 + sft 1.0, beta 0.1)", "",
              f"One pair: the {z['tiles']}-tile prompt with a chosen and a rejected answer, two rows of {z['seq']} "
              "tokens, the ViT run once for both; the reference's log-probabilities without gradients. The ViT is "
              "frozen as in the rows above (the MPO recipes train it too). Compared with the supervised step of the "
              "same mode above (one row).", "",
              "| | MPO step | supervised step | MPO / supervised |", "|---|---|---|---|"]
    for mode, sft, label in (("lora", lora["runs"], "LoRA (reference: adapters off)"),
                             ("full", full["runs"], "full (reference: a frozen copy)")):
        for key, what, scale in (("seconds", "seconds / step", 1.0), ("state_bytes", "state (GiB)", gib),
                                 ("rise_bytes", "step rise (GiB)", gib), ("total_bytes", "memory total (GiB)", gib)):
            a, b = med(mpo["runs"], key, mode=mode), med(sft, key, impl="nanovl", mode=mode, ckpt=True)
            lines.append(f"| {label}: {what} | {cell(mpo['runs'], key, scale, mode=mode)} | {b * scale:.3g} | "
                         f"{a / b:.2f}x |")

    lines += ["", "## Targets (fine-tuning issue: at least as fast as transformers + peft, at most 0.8x the memory)",
              ""]
    for mode, runs in (("full", full["runs"]), ("lora", lora["runs"])):
        speed = med(runs, "seconds", impl="hf", mode=mode, ckpt=True) / med(runs, "seconds", impl="nanovl",
                                                                            mode=mode, ckpt=True)
        mem = med(runs, "total_bytes", impl="nanovl", mode=mode, ckpt=True) / med(runs, "total_bytes", impl="hf",
                                                                                  mode=mode, ckpt=True)
        rise = med(runs, "rise_bytes", impl="nanovl", mode=mode, ckpt=True) / med(runs, "rise_bytes", impl="hf",
                                                                                  mode=mode, ckpt=True)
        lines.append(f"- {'met' if speed >= 1 else '**not met**'}: {mode}: speed {speed:.2f}x transformers")
        lines.append(f"- {'met' if mem <= 0.8 else '**not met**'}: {mode}: memory total {mem:.2f}x transformers "
                     f"(the step rise alone {rise:.2f}x; the state is the same weights and optimizer in both)")
    lines += ["", f"Raw numbers: `{Path(args.out).with_suffix('.json').name}` beside this file."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny checkpoint, 1 repetition: a seconds-long check")
    p.add_argument("--reps", type=int, default=None, help="repetitions of each timed step (default 2, 1 with --smoke)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (split between processes)")
    p.add_argument("--cache", default=str(ROOT / "benchmarks" / "cache"), help="where checkpoints are written once")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "train_results.md"))
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.smoke else 2)
    torch.set_num_threads(args.threads)
    t0, load0, (busy0, steal0) = time.perf_counter(), os.getloadavg(), bench.cpu_seconds()
    orig, hf = bench.build_checkpoints(NAME, Path(args.cache), args.smoke)
    cfg = json.loads((orig / "config.json").read_text())
    z = Sizes(args.smoke, cfg)
    ckpts = dict(nanovl=orig, hf=hf)
    for d in (orig, hf):
        bench.warm_page_cache(d)
    res = dict(sizes=dict(vars(z), ids=list(z.ids)), threads=torch.get_num_threads(),
               learned_tokens=int((sample(z, z.tiles, z.seq, 0)["labels"] != -100).sum()))
    for name, phase in (("full", lambda: phase_full(ckpts, z, args.reps)),
                        ("lora", lambda: phase_lora(ckpts, z, args.reps)),
                        ("mpo", lambda: phase_mpo(ckpts, z, args.reps)),
                        ("processes", lambda: phase_processes(orig, z, args.reps + 1, args.threads, args.smoke))):
        t = time.perf_counter()
        res[name] = phase()
        print(f"[train-bench] {name} rows done in {time.perf_counter() - t:.0f} s "
              f"({(time.perf_counter() - t0) / 60:.1f} min so far)", file=sys.stderr, flush=True)
    elapsed, (busy1, steal1) = time.perf_counter() - t0, bench.cpu_seconds()
    ours = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))
    import peft
    res.update(machine=bench.machine(), elapsed_s=elapsed, loadavg_before=load0, args=vars(args), peft=peft.__version__,
               others_cpu_share=max(0.0, busy1 - busy0 - ours) / (elapsed * os.cpu_count()),
               steal_share=(steal1 - steal0) / (elapsed * os.cpu_count()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.write_text(report(res, args))
    print(out.read_text())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--dist-worker"]:
        p = argparse.ArgumentParser()
        p.add_argument("--ckpt")
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--steps", type=int, default=2)
        p.add_argument("--json")
        p.add_argument("--smoke", action="store_true")
        p.add_argument("--device", default="cpu")
        dist_worker(p.parse_args(sys.argv[2:]))
    else:
        main()
