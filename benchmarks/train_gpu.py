"""The training step on a CUDA GPU at InternVL3-1B size (random weights): nanovl full fine-tuning (LLM + mlp1) and
LoRA r16, bf16, frozen ViT, activation checkpointing on and off, on one 6-tile 2,048-token sample and on one packed
row of about 8,192 tokens; tokens/s, model FLOPs utilisation and peak memory (torch.cuda.max_memory_allocated).
transformers + peft run the 2,048-token sample beside it when they are installed; with several GPUs the full step
also runs under torchrun (NCCL, FSDP2) on all of them.

    python benchmarks/train_gpu.py            # CUDA: writes benchmarks/train_gpu_results.md (about 2 minutes on an H200)
    python benchmarks/train_gpu.py --smoke    # a tiny checkpoint on the CPU, seconds (CI keeps the script working)

The step and the data are benchmarks/train_bench.py's (the trainer's own parts: configure, Supervised,
MasterAdamW, Packer); without CUDA, or with --smoke, everything runs on the CPU at the tiny size and the memory
column is the step's resident-memory rise instead.
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_bench as tb  # noqa: E402
from train_bench import ROOT, bench  # noqa: E402

NOMINAL_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}  # dense, no sparsity


def packed_row(z: tb.Sizes, max_tokens: int, seed: int = 11) -> dict:
    """One packed row (Packer, strict_mode off) of samples with 1-6 tiles and 64-1024 text tokens (tiny: 1 tile,
    z.short text tokens), filled to at most max_tokens: the first row the packer yields as full."""
    from nanovl.train.packing import Packer, packed_collate

    packer = Packer(tb.Ids(z.ids), z.num_image_token, max_tokens, num_images_expected=40, strict_mode=False)
    g = torch.Generator().manual_seed(seed)
    for k in range(10_000):
        tiles = 1 if z.smoke else int(torch.randint(1, 7, (1,), generator=g))
        text = int(torch.randint(z.short[0], z.short[1] + 1, (1,), generator=g)) if z.smoke else \
            int(torch.randint(64, 1025, (1,), generator=g))
        rows = packer.add(tb.sample(z, tiles, 24 + tiles * z.num_image_token + 2 + text, seed + k, answer_share=0.5))
        if rows:
            return packed_collate(rows[:1])
    raise RuntimeError("the packer never filled a row")


def model_flops(cfg: dict, batch: dict, mode: str) -> float:
    """FLOPs a step needs (no recomputation counted): the frozen ViT and the projector forward; the decoder forward
    (matmuls, causal attention per packed sample, the head on the learned positions only) and its backward, x2 of
    the forward with full fine-tuning (input and weight gradients), x1 with LoRA (input gradients; the adapters'
    own are negligible)."""
    vc, lc = cfg["vision_config"], cfg["llm_config"]
    C, I, P, Lv = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"], vc["num_hidden_layers"]
    size = cfg.get("force_image_size") or vc["image_size"]
    N, tiles = 1 + (size // P) ** 2, int(batch["image_flags"].sum())
    n_img = int((N - 1) * cfg["downsample_ratio"] ** 2)
    D, L, V = lc["hidden_size"], lc["num_hidden_layers"], lc["vocab_size"]
    H, KV, Il = lc["num_attention_heads"], lc["num_key_value_heads"], lc["intermediate_size"]
    hd = D // H
    vit = tiles * (Lv * (2 * N * (4 * C * C + 2 * C * I) + 4 * N * N * C) + 2 * n_img * (4 * C * D + D * D))
    T = int(batch["attention_mask"].sum())
    seg = batch.get("segment_ids")
    if seg is None:
        lengths = batch["attention_mask"].sum(1).tolist()
    else:
        lengths = torch.unique_consecutive(seg[0][batch["attention_mask"][0]], return_counts=True)[1].tolist()
    learned = int((batch["labels"][:, 1:] != -100).sum())
    per_token = 2 * (D * H * hd + 2 * D * KV * hd + H * hd * D + 3 * D * Il)
    llm = L * (per_token * T + 2 * H * hd * sum(n * n for n in lengths)) + 2 * V * D * learned
    return vit + llm * (3 if mode == "full" else 2)


def matmul_peak(device: str) -> float:
    """Achieved bf16 FLOP/s of a large square matmul (the practical ceiling)."""
    n = 8192 if device == "cuda" else 256
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t, reps = time.perf_counter(), 20 if device == "cuda" else 3
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(objective, opt, batch, device, steps: int, warm: bool = True) -> dict:
    """A warm-up step (unless smoke), then `steps` timed ones: median seconds and the peak memory of the timed steps (CUDA: the
    allocator's peak, state included; CPU: the resident-memory rise of the step, state excluded)."""
    if warm:
        tb.train_step(objective, opt, [batch], lambda: sync(device))
    times, rise = [], 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        if device == "cuda":
            times.append(tb.train_step(objective, opt, [batch], lambda: sync(device))["seconds"])
        else:
            with tb.PeakRSS() as m:
                times.append(tb.train_step(objective, opt, [batch])["seconds"])
            rise = max(rise, m.rise)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rise
    return dict(seconds=statistics.median(times), all_seconds=times, peak_bytes=peak)


def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    smoke = args.smoke or device == "cpu"
    orig, hf = bench.build_checkpoints(tb.NAME, Path(args.cache), smoke)
    cfg = json.loads((orig / "config.json").read_text())
    z = tb.Sizes(smoke, cfg)
    from nanovl.train import collate

    data = {"sample": collate([tb.sample(z, z.tiles, z.seq, 0)]),
            "packed": packed_row(z, z.max_packed if smoke else args.packed_tokens)}
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
        impls = ["nanovl", "hf"]
    except ImportError:
        impls = ["nanovl"]
    name = torch.cuda.get_device_name() if device == "cuda" else bench.machine()["cpu"]
    peak = matmul_peak(device)
    nominal = next((v for k, v in NOMINAL_BF16.items() if k in name), None) if device == "cuda" else None
    runs = []
    for impl in impls:
        for mode in ("full", "lora"):
            t = time.perf_counter()
            model, objective = tb.nanovl_model(orig, z, mode, device=device) if impl == "nanovl" else \
                tb.hf_model(hf, mode, device=device)
            opt = tb.optimizer(model, impl)
            for on in (True, False):
                tb.set_checkpointing(impl, model, on)
                for kind, batch in data.items():
                    if impl == "hf" and kind == "packed":
                        continue  # transformers has no block-diagonal packed attention under SDPA
                    r = measure(objective, opt, batch, device, args.steps, warm=not smoke)
                    tokens = int(batch["attention_mask"].sum())
                    flops = model_flops(cfg, batch, mode)
                    r.update(impl=impl, mode=mode, ckpt=on, data=kind, tokens=tokens, tokens_per_s=tokens / r["seconds"],
                             flops=flops, mfu_measured=flops / r["seconds"] / peak,
                             mfu_nominal=flops / r["seconds"] / nominal if nominal else None)
                    runs.append(r)
                    print(f"[train-gpu] {impl} {mode} ckpt={'on' if on else 'off'} {kind} ({tokens} tokens): "
                          f"{r['seconds']:.3f} s/step, {r['tokens_per_s']:.0f} tok/s, MFU {r['mfu_measured']:.0%} of "
                          f"measured peak, peak memory {r['peak_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
            del model, objective, opt
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            print(f"[train-gpu] {impl} {mode}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    multi = multi_gpu(orig, args) if device == "cuda" and torch.cuda.device_count() > 1 else None
    return dict(device=device, device_name=name, gpus=torch.cuda.device_count() if device == "cuda" else 0,
                matmul_peak_flops=peak, nominal_peak_flops=nominal, runs=runs, multi_gpu=multi,
                sizes=dict(vars(z), ids=list(z.ids)), torch=torch.__version__, smoke=smoke)


def multi_gpu(orig: Path, args) -> dict:
    """torchrun over every GPU (NCCL, FSDP2): the full step on one 2,048-token sample per GPU."""
    n = torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               str(Path(tb.__file__).resolve()), "--dist-worker", "--ckpt", str(orig), "--device", "cuda",
               "--threads", "4", "--steps", str(args.steps + 1), "--json", str(out)]
        print(f"[train-gpu] {n} GPUs: torchrun ...", file=sys.stderr, flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return dict(error=r.stderr[-2000:])
        return json.loads(out.read_text())


def report(res: dict, args) -> str:
    gib, peak, nominal = 2 ** -30, res["matmul_peak_flops"], res["nominal_peak_flops"]
    lines = [f"# nanovl training step on {res['device_name']}" + (" (SMOKE: tiny checkpoint on the CPU, numbers "
                                                                  "meaningless)" if res["smoke"] else ""), "",
             f"Written by `python benchmarks/train_gpu.py{' --smoke' if args.smoke else ''}` on "
             f"{time.strftime('%Y-%m-%d %H:%M %Z')}; torch {res['torch']}. Random weights at "
             f"{'a tiny size' if res['smoke'] else tb.NAME + ' size'}, bf16, frozen ViT; full = LLM + mlp1, LoRA = "
             f"r16 on the LLM. sample: one {res['sizes']['tiles']}-tile sample of {res['sizes']['seq']} tokens; "
             f"packed: one packed row (block-diagonal attention). A step: the trainer's objective, backward, fp32 "
             f"masters, clip, AdamW; a warm-up, then the median of {args.steps}. MFU: the FLOPs the step needs (ViT "
             f"forward, decoder forward + backward, no recomputation counted) over the bf16 peak: measured with a "
             f"{8192 if res['device'] == 'cuda' else 256}^3 matmul ({peak / 1e12:.3g} TFLOP/s)" +
             (f", and the nominal dense peak ({nominal / 1e12:.0f} TFLOP/s)" if nominal else "") + ". Peak memory: "
             + ("`torch.cuda.max_memory_allocated()` over the timed steps (weights and optimizer included)."
                if res["device"] == "cuda" else "the step's resident-memory rise (CPU)."), "",
             "| implementation | trained | checkpointing | data | tokens | s / step | tokens / s | MFU (measured peak) "
             "| MFU (nominal) | peak memory (GiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {'nanovl' if r['impl'] == 'nanovl' else 'transformers + peft'} | {r['mode']} | "
                     f"{'on' if r['ckpt'] else 'off'} | {r['data']} | {r['tokens']} | {r['seconds']:.3g} | "
                     f"{r['tokens_per_s']:.0f} | {r['mfu_measured']:.1%} | "
                     f"{'-' if r['mfu_nominal'] is None else format(r['mfu_nominal'], '.1%')} | "
                     f"{r['peak_bytes'] * gib:.2f} |")
    m = res["multi_gpu"]
    if m and "error" not in m:
        t = statistics.median(m["step_s"])
        lines += ["", f"{m['processes']} GPUs (torchrun, NCCL, FSDP2), full, one {res['sizes']['seq']}-token sample "
                  f"per GPU: {t:.3g} s/step, {m['tokens_per_step'] / t:.0f} tokens/s, peak memory "
                  f"{m['cuda_peak_sum_bytes'] / m['processes'] * gib:.2f} GiB per GPU."]
    elif m:
        lines += ["", f"Several GPUs: torchrun failed: `{m['error'][-300:]}`"]
    else:
        lines += ["", "One device: no multi-GPU row (it runs when torch sees more than one GPU)."]
    lines += ["", f"Raw numbers: `{Path(args.out).with_suffix('.json').name}` beside this file."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny checkpoint on the CPU, seconds")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row, after one warm-up")
    p.add_argument("--packed-tokens", type=int, default=8192, help="the packed row's token limit")
    p.add_argument("--cache", default=str(ROOT / "benchmarks" / "cache"), help="where checkpoints are written once")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "train_gpu_results.md"))
    args = p.parse_args(argv)
    if args.smoke:
        args.steps = 1
    t0 = time.perf_counter()
    res = run(args)
    res["elapsed_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.write_text(report(res, args))
    print(out.read_text())
    print(f"[train-gpu] done in {res['elapsed_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
