"""Command line: python -m nanovl.generate --image x.jpg [--prompt ...] [--model DIR_OR_HUB_ID] [--chat] ..."""
import argparse
import os
import sys
from pathlib import Path

import torch

import nanovl
from nanovl import limits, preprocess, router, thinking
from nanovl.chat import History
from nanovl.errors import NanovlError
from nanovl.generation import Stats

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLAGS = {"max_new_tokens": "--max-tokens", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
         "seed": "--seed"}  # the generation options' names on the command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = Parser(prog="python -m nanovl.generate", description="Chat with an InternVL checkpoint.",
               epilog="Limits (environment): NANOVL_MAX_TILES (tiles per image, default 40), NANOVL_MAX_FRAMES "
                      "(frames per video, 256), NANOVL_MAX_PROMPT_CHARS (1,000,000), NANOVL_MAX_IMAGE_PIXELS "
                      "(PIL's decompression-bomb limit, 89,478,485).")
    p.add_argument("--model", default="OpenGVLab/InternVL3-1B", help="checkpoint directory or hub id")
    p.add_argument("--adapters", default=None, help="LoRA adapters saved alone (python -m nanovl.train "
                   "--save-lora-adapters), merged into --model")
    p.add_argument("--image", nargs="+", default=[], help="one or more images")
    p.add_argument("--video", help="a video file; --frames frames are sampled")
    p.add_argument("--frames", type=int, default=8, help="frames sampled from --video")
    p.add_argument("--prompt", default=None, help="the question (default: describe the image/video)")
    p.add_argument("--system", default=None, help="system message (default: the template's)")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn conversation")
    think = p.add_mutually_exclusive_group()  # InternVL3.5 (nanovl/thinking.py); chat(think=True / False) in Python
    think.add_argument("--think", dest="think", action="store_const", const=True, default=None,
                       help="InternVL3.5 thinking mode: its reasoning system prompt (not with --system); the <think> "
                            "part is dimmed on a terminal. Recommended: --temperature 0.6 --top-p 0.95 --top-k 50 "
                            "--max-tokens 8192")
    think.add_argument("--no-think", dest="think", action="store_const", const=False,
                       help="suppress thinking: pre-fill the answer with an empty <think></think> block")
    p.add_argument("--max-tokens", type=int, default=512, help="most new tokens per answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tiles", type=int, default=None, help="tiles per image (default: config max_dynamic_patch)")
    p.add_argument("--no-thumbnail", action="store_true", help="no global thumbnail tile")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA and on CPUs with native bf16 (avx512_bf16 or amx_bf16), fp32 on other CPUs")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step (opt-in)")
    p.add_argument("--int8", action="store_true", help="int8 weight-only language-model linears (opt-in; not the ViT)")
    p.add_argument("--no-stream", action="store_true", help="print the answer at the end")
    p.add_argument("--verbose", action="store_true", help="print tiles, tokens, timings and memory (Flash: which "
                   "tiles the router compressed)")
    p.add_argument("--flash", choices=["router", "256", "64"], default=None, help="InternVL3.5-Flash: the router "
                   "gives each tile 256 or 64 tokens (default), or force every tile to 256 (the dense model) or 64")
    p.add_argument("--show-routing", metavar="FILE", default=None, help="InternVL3.5-Flash: draw each --image's "
                   "tiles, tinted by the router's decision, into FILE (a .png; FILE-2.png ... for more images)")
    return p.parse_args(argv)


def check_options(args) -> torch.device:
    """Every option's range and text, before anything loads. -> the device."""
    limits.generation(args.max_tokens, FLAGS, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      seed=args.seed)
    limits.within("MAX_FRAMES", limits.whole(args.frames, "--frames", 1), "--frames", "ask for fewer frames")
    if args.max_tiles is not None:
        limits.within("MAX_TILES", limits.whole(args.max_tiles, "--max-tiles", 1), "--max-tiles", "use fewer tiles")
    for flag in ("prompt", "system"):
        if getattr(args, flag) is not None:
            limits.text(getattr(args, flag), f"--{flag}")
    if args.think and args.system is not None:
        raise NanovlError("--think uses InternVL3.5's reasoning prompt as the system message: give --think or "
                          "--system, not both")
    if args.image and args.video:
        raise NanovlError("give --image or --video, not both")
    if args.show_routing and not args.image:
        raise NanovlError("--show-routing draws the tiles of --image: give one")
    if args.chat and (sys.stdin is None or sys.stdin.closed):
        raise NanovlError("--chat reads the questions from stdin, which is closed")
    return limits.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), "--device")


def load_media(args, config):
    """-> (pixel_values or None, num_patches_list, prompt prefix)."""
    if args.video:
        tokens, context = args.frames * config.num_image_token, config.llm_config.max_position_embeddings
        if tokens >= context:  # before any frame is decoded
            raise NanovlError(f"--frames {args.frames} gives {tokens:,} image tokens ({config.num_image_token} a "
                              f"frame), more than the model's context of {context:,}: ask for fewer --frames")
        pv, patches = nanovl.load_video(args.video, num_segments=args.frames, input_size=config.image_size)
        return pv, patches, "".join(f"Frame{i + 1}: <image>\n" for i in range(len(patches)))
    if not args.image:
        return None, [], ""
    max_tiles = args.max_tiles if args.max_tiles is not None else (
        config.max_dynamic_patch if config.dynamic_image_size else 1)
    limits.within("MAX_TILES", max_tiles, "config.json's max_dynamic_patch", "pass a smaller --max-tiles")
    images = [nanovl.load_image(path, max_num=max_tiles, input_size=config.image_size,
                                min_num=min(config.min_dynamic_patch, max_tiles),
                                use_thumbnail=config.use_thumbnail and not args.no_thumbnail) for path in args.image]
    patches = [len(im) for im in images]
    prefix = "<image>\n" if len(images) == 1 else "".join(f"Image-{i + 1}: <image>\n" for i in range(len(images)))
    return torch.cat(images), patches, prefix


def report(stats: Stats, pixel_values, patches, device):
    """The --verbose line of one turn, on stderr."""
    ttft = stats.vision_s + stats.ttft_s
    if str(device).startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource  # Unix only: imported where --verbose needs it
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    tiles = f"{sum(patches)} tiles {patches}" if pixel_values is not None else "no image"
    print(f"[{tiles} | prompt {stats.prompt_tokens} tokens | vision {stats.vision_s:.2f}s | "
          f"TTFT {ttft:.2f}s | prefill {stats.prompt_tokens / max(stats.prefill_s, 1e-9):.1f} tok/s | "
          f"decode {stats.new_tokens} tokens at {stats.decode_tps():.1f} tok/s | peak memory {peak:.2f} GiB]",
          file=sys.stderr)
    start = 0
    for i, n in enumerate(patches if stats.compressed is not None else []):  # Flash: the router's decisions
        squeezed = [k + 1 for k in range(n) if stats.compressed[start + k]]
        print(f"[router: image {i + 1}: {len(squeezed)} of {n} tiles compressed to 64 tokens "
              f"{squeezed if squeezed else ''}, {192 * len(squeezed)} image tokens saved "
              f"({256 * n - 192 * len(squeezed)} of {256 * n})]", file=sys.stderr)
        start += n


def show_routing(args, config, pixel_values, patches, compressed):
    """--show-routing FILE: each image's tiles as the router saw them, tinted by its decision (router.tile_map)."""
    if compressed is None:
        raise NanovlError("--show-routing needs an InternVL3.5-Flash checkpoint with its router on")
    out, start = Path(args.show_routing), 0
    max_tiles = args.max_tiles if args.max_tiles is not None else config.max_dynamic_patch
    for i, (path, n) in enumerate(zip(args.image, patches)):
        w, h = preprocess.open_image(path).size
        cols, rows = preprocess.closest_grid(w, h, min(config.min_dynamic_patch, max_tiles), max_tiles,
                                             config.image_size) if n > 1 else (1, 1)
        tiles = [preprocess.to_image(t) for t in pixel_values[start:start + n]]
        picture = router.tile_map(tiles, cols, rows, compressed[start:start + n])
        picture.save(out if i == 0 else out.with_name(f"{out.stem}-{i + 1}{out.suffix}"))
        start += n


def answer(model, args, question, pixel_values, patches, history) -> str:
    """One turn: stream the answer to stdout (or print it at the end), then the --verbose statistics."""
    stats, text = Stats(), ""
    show = thinking.Display(dim=args.think is not None and sys.stdout.isatty())  # else prints the pieces as they are
    for piece in model.stream(question, pixel_values, history, patches or None, stats=stats,
                              max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, system_message=args.system, compile=args.compile,
                              think=args.think):
        text += piece
        if not args.no_stream:
            print(show(piece), end="", flush=True)
    print(show(text.strip()) + show.close() if args.no_stream else show.close())
    if args.verbose:
        report(stats, pixel_values, patches, model.device)
    if args.show_routing and pixel_values is not None and not history:
        show_routing(args, model.config, pixel_values, patches, stats.compressed)
    return text.strip() if args.think is None else thinking.Reply.of(text)  # the history keeps the answer only


def chat_loop(model, args, pixel_values, patches, prefix):
    """--chat: read questions from the terminal; a bad turn prints its error and the conversation goes on.
    The History keeps the image features, so only the first turn runs the vision encoder."""
    history, first = History(), args.prompt
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 is refused below, the chat goes on
    while True:
        if first:
            line, first = first, None
        else:
            try:
                line = input("> ").strip()
            except EOFError:
                return
        if not line:
            continue
        question = prefix + line if not history else line
        try:
            limits.text(line, "that line")
            turn = (question, answer(model, args, question, pixel_values, patches, history))
            history = History(list(history) + [turn], history.vision)
        except NanovlError as e:
            print(f"error: {e}", file=sys.stderr)


def run(args):
    device = check_options(args)
    dtype = DTYPES[args.dtype] if args.dtype else nanovl.default_dtype(device)
    model = nanovl.load(args.model, dtype=dtype, device=device, adapters=args.adapters)
    if args.int8:
        from nanovl.quantize import quantize_int8
        quantize_int8(model.language_model)
    if args.flash is not None:
        if model.config.flash_mode is None:
            raise NanovlError(f"--flash: {args.model} is not an InternVL3.5-Flash checkpoint (no flash_mode in its "
                              "config.json)")
        model.config.flash_mode, model.flash_force = True, None if args.flash == "router" else int(args.flash)
    pixel_values, patches, prefix = load_media(args, model.config)
    if args.verbose:
        print(f"[{args.model}: {model.config.llm_config.arch}, template {model.config.template}, "
              f"{dtype} on {device}]", file=sys.stderr)
    if args.chat:
        return chat_loop(model, args, pixel_values, patches, prefix)
    default = "Describe this video." if args.video else "Describe this image." if args.image else "Hello!"
    answer(model, args, prefix + (args.prompt or default), pixel_values, patches, None)


def main(argv=None):
    """Bad input: one `error:` line and status 2; Ctrl-C: status 130; a closed output pipe: quiet, status 141."""
    try:
        run(parse_args(argv))
    except BrokenPipeError:  # stdout's reader went away (| head): stop quietly, as Unix tools do
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        except (OSError, ValueError):
            pass
        sys.exit(141)
    except (NanovlError, OSError) as e:
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)  # one line, whatever the message
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
