"""InternVL3.5-Flash: time to first token with and without the visual resolution router, and decode speed, on a
12-tile image (4 x 3 grid + thumbnail = 13 tiles) at InternVL3.5-1B-Flash size (random weights, bf16, CPU), plus the
README's routing picture.

    python benchmarks/flash_bench.py            # -> benchmarks/flash_results.md/.json, docs/flash-routing.png (~10 min)
    python benchmarks/flash_bench.py --smoke --out /tmp/flash   # the same code paths on a tiny model, seconds

Three settings of the same model, measured alternately in one process (median of --reps):
  router   the router decides each tile (flash_mode on, the checkpoint's thresholds)
  256      every tile at 256 tokens without the router: the dense InternVL3.5-1B (flash_mode off)
  64       every tile compressed to 64 tokens: the most the router can save (model.flash_force = 64)
The weights are random, so the router's choice on this image says nothing about a trained router's: the `64` row is
the bound, the `router` row shows the cost of routing itself (the pooling + gating network, both projectors).
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import checkpoints as ck  # noqa: E402  tests/checkpoints.py: the catalogue's InternVL3_5-1B-Flash config
import nanovl  # noqa: E402
from nanovl import generation, preprocess, router  # noqa: E402
from nanovl.config import InternVLConfig  # noqa: E402
from nanovl.model import InternVL  # noqa: E402

TINY = dict(vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                               image_size=64, patch_size=2),
            llm_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, intermediate_size=128, vocab_size=512),
            force_image_size=64)
IMG_START, IMG_END, IMG_CONTEXT = 151669, 151670, 151671  # InternVL3.5's <img>, </img>, <IMG_CONTEXT>


def config(smoke: bool) -> InternVLConfig:
    d = json.loads(json.dumps(ck.BY_NAME["InternVL3_5-1B-Flash"].config))
    if smoke:
        for k, v in TINY.items():
            d[k] = {**d[k], **v} if isinstance(v, dict) else v
    return InternVLConfig.from_dict(d)


def picture_image(w: int = 1600, h: int = 1200):
    """A synthetic 4:3 scene (sky, sun, hills, a house, text), so that the tiles differ: what the picture shows."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(im)
    for y in range(h):  # sky to grass
        t = y / h
        d.line([(0, y), (w, y)], fill=(int(90 + 120 * t), int(160 + 40 * t), int(240 - 180 * t)) if t < 0.6
               else (60, int(140 - 40 * t), 50))
    d.ellipse([w * 0.72, h * 0.08, w * 0.88, h * 0.29], fill=(255, 220, 80))
    d.polygon([(0, h * 0.62), (w * 0.3, h * 0.45), (w * 0.6, h * 0.62)], fill=(70, 120, 60))
    d.rectangle([w * 0.12, h * 0.62, w * 0.36, h * 0.9], fill=(200, 80, 60))
    d.polygon([(w * 0.09, h * 0.62), (w * 0.24, h * 0.48), (w * 0.39, h * 0.62)], fill=(110, 50, 40))
    d.rectangle([w * 0.2, h * 0.74, w * 0.27, h * 0.9], fill=(80, 50, 30))
    for i in range(14):
        d.text((w * 0.5, h * (0.66 + 0.022 * i)), "nanovl reads every line " * 2, fill=(255, 255, 255))
    return im


def prompt(tiles: int, vocab: int, num_image_token: int) -> torch.Tensor:
    """(1, T): 40 text tokens, <img>, 256 <IMG_CONTEXT> a tile, </img>, 20 text tokens (the Flash router drops 192
    of a compressed tile's 256 itself, as the original's generate does)."""
    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(10, min(vocab, 150000), (n,), generator=g)  # noqa: E731
    return torch.cat([text(40), torch.tensor([IMG_START]), torch.full((tiles * num_image_token,), IMG_CONTEXT),
                      torch.tensor([IMG_END]), text(20)])[None]


def run(model, ids, pv, new_tokens: int) -> tuple[float, float]:
    """One model.generate call, taken apart to time it: the images (the ViT, and for Flash the router, both
    projectors and the prompt's compression, as generate does), then prefill and decode. -> (time to first token,
    decode tokens/s, prompt tokens)."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        if model.routes:
            ids, _, vit = model.route_rows(ids, None, pv)
        else:
            vit = generation.encode_images(model, pv)
    images_s, stats = time.perf_counter() - t0, generation.Stats()
    for _ in generation.generate(model, ids, max_new_tokens=new_tokens, vit_embeds=vit, stats=stats):
        pass
    return images_s + stats.ttft_s, stats.decode_tps(), ids.shape[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a tiny model: checks the code paths in seconds")
    p.add_argument("--reps", type=int, default=None, help="repetitions of each setting (default 2, smoke 1)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded for the decode rate")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/, picture in docs/)")
    args = p.parse_args(argv)
    reps = args.reps or (1 if args.smoke else 2)
    out = Path(args.out) if args.out else ROOT / "benchmarks"
    pic = (Path(args.out) if args.out else ROOT / "docs") / "flash-routing.png"
    out.mkdir(parents=True, exist_ok=True)
    pic.parent.mkdir(parents=True, exist_ok=True)
    cfg = config(args.smoke)
    if args.smoke:
        cfg.llm_config.vocab_size = 151936  # room for the image token ids (embedding rows only)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"[flash] building InternVL3.5-1B-Flash{' (tiny)' if args.smoke else ''} with random weights ...",
          file=sys.stderr, flush=True)
    torch.manual_seed(0)
    model = InternVL(cfg).to(torch.bfloat16).eval()
    model.img_context_token_id = IMG_CONTEXT
    image = picture_image()
    tiles = preprocess.dynamic_preprocess(image, 1, 12, cfg.image_size, use_thumbnail=True)
    pv = torch.stack([preprocess.to_tensor(t, cfg.image_size) for t in tiles]).to(torch.bfloat16)  # (13, 3, S, S)
    ids = prompt(len(pv), cfg.llm_config.vocab_size, cfg.num_image_token)
    scores, compressed = model.route(pv)  # also the warm-up: the ViT's first pass
    router.tile_map(tiles, 4, 3, compressed.tolist()).save(pic)
    settings = {"router": None, "256": None, "64": 64}
    tokens = {name: 0 for name in settings}
    times = {name: {"ttft": [], "decode": []} for name in settings}
    def use(name):
        model.config.flash_mode, model.flash_force = name != "256", settings[name]

    for r in range(reps):  # alternating, so that drift in the machine's speed hits every setting alike
        for name in settings:
            use(name)
            ttft, tps, tokens[name] = run(model, ids, pv, args.new_tokens)
            times[name]["ttft"].append(ttft)
            times[name]["decode"].append(tps)
            print(f"[flash] rep {r + 1}/{reps} {name}: TTFT {ttft:.2f}s, decode {tps:.1f} tok/s", file=sys.stderr,
                  flush=True)
    rows = {name: dict(prompt_tokens=tokens[name], ttft_s=statistics.median(times[name]["ttft"]),
                       decode_tok_s=statistics.median(times[name]["decode"]), ttft_runs=times[name]["ttft"])
            for name in settings}
    n_c = int(compressed.sum())
    res = dict(model="InternVL3.5-1B-Flash (random weights)" + (" tiny" if args.smoke else ""), tiles=len(pv),
               compressed_by_router=n_c, scores=[round(float(s), 4) for s in scores], rows=rows,
               machine=dict(cpu=next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                      if line.startswith("model name")), "?") if os.path.exists("/proc/cpuinfo")
                            else "?", threads=torch.get_num_threads(), torch=torch.__version__,
                            load_before=[round(x, 2) for x in load]), reps=reps, new_tokens=args.new_tokens,
               date=time.strftime("%Y-%m-%d %H:%M %Z"))
    (out / "flash_results.json").write_text(json.dumps(res, indent=1) + "\n")
    base = rows["256"]["ttft_s"]
    lines = [f"# InternVL3.5-Flash: time to first token with and without the router ({'smoke, ' if args.smoke else ''}"
             f"`python benchmarks/flash_bench.py`)", "",
             f"- model: {res['model']}, bf16, {torch.get_num_threads()} threads, {res['machine']['cpu']}, torch "
             f"{torch.__version__}; load average before the run {res['machine']['load_before']}; {res['date']}",
             f"- image: a synthetic 4:3 scene, {len(pv)} tiles (4 x 3 + thumbnail); prompt: 60 text tokens + the "
             f"image; median of {reps} alternating runs; decode over {args.new_tokens} tokens",
             f"- the router compressed {n_c} of {len(pv)} tiles (random weights: this choice means nothing; `64` is "
             "the bound a trained router approaches as it compresses more)", "",
             "| setting | prompt tokens | time to first token (vision + router + prefill) | vs all 256 | decode |",
             "|---|---|---|---|---|"]
    for name, label in (("256", "all tiles 256 (the dense model)"), ("router", "router"),
                        ("64", "all tiles 64")):
        r = rows[name]
        lines.append(f"| {label} | {r['prompt_tokens']:,} | {r['ttft_s']:.2f} s | {r['ttft_s'] / base:.2f}x | "
                     f"{r['decode_tok_s']:.1f} tok/s |")
    lines += ["", f"Routing picture of this run: `{pic.relative_to(ROOT) if pic.is_relative_to(ROOT) else pic}`."]
    (out / "flash_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
