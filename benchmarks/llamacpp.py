"""llama.cpp beside nanovl, on bench.py's random-weight InternVL3-1B checkpoint (original layout), at equal threads.

    python benchmarks/llamacpp.py                 # alone: every step, then the numbers as JSON
    python benchmarks/llamacpp.py --threads 2 --reps 1

llama.cpp as a CPU user installs it from the package registry: the sources that the llama-cpp-python source package
ships (vendor/llama.cpp), built with cmake. One function per step; each fails with one line (Missing), which bench.py
prints in the llama.cpp column instead of numbers:

    fetch()    pip download --no-binary :all: --no-deps llama-cpp-python==VERSION -> its vendor/llama.cpp
    build()    cmake, Release, GGML_NATIVE=ON (-march=native), targets llama-bench and llama-mtmd-cli only
    convert()  llama.cpp's own convert_hf_to_gguf.py: language model in BF16 and Q8_0, vision + projector (mmproj) BF16
    measure()  llama-bench: prefill of a prompt as long as bench.py's, then decode at that depth;
               llama-mtmd-cli: vision + projector on 1 and 7 tiles, and the time to the first token

Everything lands in benchmarks/cache/llamacpp/ (git-ignored) and is reused by the next run.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is ggml-org/llama.cpp@0c1e57098
TARGETS = ("llama-bench", "llama-mtmd-cli")
TOKENIZER = ROOT.parent / "shared" / "assets" / "tokenizers" / "InternVL2_5-1B-MPO"  # Qwen2 BPE, 151674 ids
PROMPT = "Describe this image in detail."


class Missing(Exception):
    """llama.cpp could not be measured; the message is one line for the results table."""


def first_line(text: str, default: str = "?") -> str:
    """The first line that says what went wrong (an error line if there is one), at most 160 characters."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    errors = [l for l in lines if re.search(r"error|not found|no such|fatal|traceback", l, re.I)]
    return ((errors or lines or [default])[0])[:160]


def run(cmd: list, what: str, cwd=None, log: Path | None = None) -> subprocess.CompletedProcess:
    """Run cmd; on failure raise Missing('<what>: <first error line>'). The full output goes to log when given."""
    try:
        exe, env = Path(str(cmd[0])), dict(os.environ)
        if (exe.parent / "libllama.so").exists():  # llama.cpp's own programs: find their libraries in a moved build
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(exe.parent), env.get("LD_LIBRARY_PATH")]))
        out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env)
    except FileNotFoundError:
        raise Missing(f"{Path(str(cmd[0])).name} not found") from None
    if log is not None:
        log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        sig = f" (killed by signal {-out.returncode})" if out.returncode < 0 else f" (exit {out.returncode})"
        raise Missing(f"{what} failed{sig}: {first_line(out.stderr + out.stdout)}")
    return out


# ---------------------------------------------------------------- the steps

def fetch(cache: Path, version: str = VERSION) -> Path:
    """-> the llama.cpp source tree inside the llama-cpp-python sdist (downloaded and unpacked once)."""
    src = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").exists():
        return src
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", cache,
             f"llama-cpp-python=={version}"], "pip download llama-cpp-python")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        tar.extractall(cache, members=[m for m in tar.getmembers() if m.name.startswith(prefix)], filter="data")
    if not (src / "CMakeLists.txt").exists():
        raise Missing(f"{sdist.name} has no vendor/llama.cpp")
    return src


def build(src: Path, cache: Path) -> Path:
    """-> the directory holding llama-bench and llama-mtmd-cli (cmake Release build, -march=native, 2 jobs, nice)."""
    out = cache / "build"
    bin_dir = out / "bin"
    if all((bin_dir / t).exists() for t in TARGETS):
        return bin_dir
    if shutil.which("cmake") is None:
        raise Missing("cmake not found")
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    run([*nice, "cmake", "-S", src, "-B", out, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"],
        "cmake configure", log=cache / "configure.log")
    run([*nice, "cmake", "--build", out, "--config", "Release", "-j", "2", "--target", *TARGETS], "build",
        log=cache / "build.log")
    return bin_dir


def convert(src: Path, ckpt: Path, cache: Path) -> dict:
    """bench.py's original-layout checkpoint -> {'bf16', 'q8_0', 'mmproj'}: GGUF paths, written once by llama.cpp's
    convert_hf_to_gguf.py. Its input folder gets the tokenizer files and a preprocessor_config.json (ImageNet mean/std,
    448 px, as InternVL's), which the checkpoint written by bench.py does not have."""
    gguf = {"bf16": cache / "gguf" / "text-bf16.gguf", "q8_0": cache / "gguf" / "text-q8_0.gguf",
            "mmproj": cache / "gguf" / "mmproj-bf16.gguf"}
    stamp = cache / "gguf" / ".source"
    if all(p.exists() for p in gguf.values()) and stamp.exists() and stamp.read_text() == str(ckpt.resolve()):
        return gguf
    if not TOKENIZER.exists():
        raise Missing(f"tokenizer files not found at {TOKENIZER}")
    inp = cache / "convert-input"
    shutil.rmtree(inp, ignore_errors=True)
    inp.mkdir(parents=True)
    (inp / "model.safetensors").symlink_to((ckpt / "model.safetensors").resolve())
    shutil.copy(ckpt / "config.json", inp)
    for f in TOKENIZER.iterdir():
        if f.name != "tokenizer.derived.json":  # the converter builds the tokenizer from vocab.json + merges.txt
            shutil.copy(f, inp)
    (inp / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "size": {"height": 448, "width": 448}}))
    gguf["bf16"].parent.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    for key, extra in [("bf16", ["--outtype", "bf16"]), ("q8_0", ["--outtype", "q8_0"]),
                       ("mmproj", ["--mmproj", "--outtype", "bf16"])]:
        run([sys.executable, src / "convert_hf_to_gguf.py", inp, *extra, "--outfile", gguf[key]],
            f"convert_hf_to_gguf.py {' '.join(extra)}", log=cache / f"convert-{key}.log")
    stamp.write_text(str(ckpt.resolve()))
    return gguf


def bench_text(bin_dir: Path, model: Path, threads: int, prompt: int, new_tokens: int, reps: int,
               extra: tuple = ()) -> dict:
    """llama-bench: prefill of `prompt` tokens, then `new_tokens` decoded after `prompt` tokens of context."""
    res = {}
    for key, flags in [("prefill_tps", ["-p", prompt, "-n", 0]), ("decode_tps", ["-p", 0, "-n", new_tokens, "-d", prompt])]:
        out = run([bin_dir / "llama-bench", "-m", model, "-t", threads, "-r", reps, "-o", "json", *flags, *extra],
                  f"llama-bench {model.name}")
        (row,) = json.loads(out.stdout)
        res[key], res[key.replace("_tps", "_samples")] = row["avg_ts"], row["samples_ts"]
    return res


def text_with_fallback(bin_dir: Path, model: Path, threads: int, prompt: int, new_tokens: int, reps: int) -> dict:
    """The stock build first; if it is killed by a signal (Q8_0 on AMX CPUs with GCC 12: an invalid tile config in
    ggml's AMX kernel), once more with --repack 0 (no AMX/repacked buffers), and say so."""
    try:
        return dict(bench_text(bin_dir, model, threads, prompt, new_tokens, reps), flags="")
    except Missing as e:
        if "signal" not in str(e):
            raise
        r = bench_text(bin_dir, model, threads, prompt, new_tokens, reps, ("--repack", 0))
        return dict(r, flags="--repack 0", note=f"the stock run crashed ({e}); measured with --repack 0")


def test_image(cache: Path, cols: int, rows: int) -> Path:
    """A noise PNG of exactly cols x rows tiles of 448 px: llama.cpp's InternVL tiling then picks that grid and adds
    an overview tile when there is more than one (1x1: 1 tile; 3x2: 7 tiles)."""
    import numpy as np
    from PIL import Image

    path = cache / f"noise-{cols}x{rows}.png"
    if not path.exists():
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (rows * 448, cols * 448, 3), dtype=np.uint8)).save(path)
    return path


def bench_vision(bin_dir: Path, gguf: dict, image: Path, threads: int) -> dict:
    """llama-mtmd-cli, one token: vision + projector time (ms of every 'mtmd batch encoding done'), tiles (image
    tokens / 256) and prefill time of the whole prompt (llama_perf's prompt eval, images' tokens included)."""
    out = run([bin_dir / "llama-mtmd-cli", "-m", gguf["bf16"], "--mmproj", gguf["mmproj"], "--image", image,
               "-p", PROMPT, "-n", 1, "-t", threads, "-c", 8192, "--temp", 0, "-v"], "llama-mtmd-cli")
    log = out.stdout + out.stderr
    encode = [int(m) for m in re.findall(r"mtmd batch encoding done in (\d+) ms", log)]
    prefill = re.search(r"prompt eval time\s*=\s*([\d.]+) ms\s*/\s*(\d+) tokens", log)
    if not encode or not prefill:
        raise Missing("llama-mtmd-cli printed no encode/prompt-eval times")
    image_tokens = sum(int(n) for n in re.findall(r"n_tokens_batch = (\d+)", log))
    return dict(vision_s=sum(encode) / 1e3, prefill_s=float(prefill.group(1)) / 1e3,
                prompt_tokens=int(prefill.group(2)), tiles=image_tokens // 256)


def measure(bin_dir: Path, gguf: dict, cache: Path, threads: int, prompt: int, new_tokens: int, reps: int) -> dict:
    """Decode/prefill for BF16 and Q8_0, then vision and time to first token (vision + prefill) on 1 and 7 tiles."""
    res = {"bf16": text_with_fallback(bin_dir, gguf["bf16"], threads, prompt, new_tokens, reps),
           "q8_0": text_with_fallback(bin_dir, gguf["q8_0"], threads, prompt, new_tokens, reps)}
    for key, (cols, rows) in [("vision1", (1, 1)), ("vision7", (3, 2))]:
        runs = [bench_vision(bin_dir, gguf, test_image(cache, cols, rows), threads) for _ in range(reps)]
        tiles = runs[0]["tiles"]
        res[key] = dict(tiles=tiles, prompt_tokens=runs[0]["prompt_tokens"],
                        s_per_tile=statistics.median(r["vision_s"] / tiles for r in runs),
                        ttft_s=statistics.median(r["vision_s"] + r["prefill_s"] for r in runs),
                        runs=runs)
    return res


def llamacpp(ckpt: Path, cache: Path, threads: int, prompt: int, new_tokens: int, reps: int) -> dict:
    """Every step; -> numbers, or {'missing': one line} when a step fails."""
    try:
        src = fetch(cache)
        bin_dir = build(src, cache)
        gguf = convert(src, ckpt, cache)
        res = measure(bin_dir, gguf, cache, threads, prompt, new_tokens, reps)
    except Missing as e:
        return {"missing": str(e)}
    version = run([bin_dir / "llama-bench", "--version"], "llama-bench --version")
    return dict(res, version=first_line(version.stdout + version.stderr), threads=threads, prompt=prompt,
                package=f"llama-cpp-python {VERSION}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(ROOT / "benchmarks" / "cache" / "InternVL3-1B"),
                   help="original-layout checkpoint (bench.py writes it)")
    p.add_argument("--cache", default=str(ROOT / "benchmarks" / "cache" / "llamacpp"))
    p.add_argument("--threads", type=int, default=None, help="default: torch's thread count, as nanovl's")
    p.add_argument("--prompt", type=int, default=1830, help="prompt tokens (bench.py's 7-tile prompt: 1830)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    if args.threads is None:
        import torch
        args.threads = torch.get_num_threads()
    print(json.dumps(llamacpp(Path(args.ckpt), Path(args.cache), args.threads, args.prompt, args.new_tokens,
                              args.reps), indent=1))


if __name__ == "__main__":
    main()
