"""benchmarks/train_bench.py --smoke and benchmarks/train_gpu.py --smoke run end to end on a tiny checkpoint and write
every row with finite numbers (no timing asserted)."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _numbers(line: str) -> list:
    return [float(x) for x in re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", line.split("|", 2)[2])]


def _run(script, tmp_path, out):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--cache",
                          str(tmp_path / "cache"), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert "SMOKE" in text and "nan" not in text.lower().replace("nanovl", "") and "inf" not in text.split("|", 1)[1]
    return text


def test_train_bench_smoke_has_every_row(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    text = _run("train_bench.py", tmp_path, tmp_path / "train_results.md")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| |")]
    for label in ["full (LLM + mlp1): seconds / step", "full (LLM + mlp1): memory total (GiB)",
                  "full, checkpointing off: seconds / step", "LoRA r16: seconds / step", "LoRA r16: tokens / s",
                  "LoRA r16: step rise / state (GiB)", "nanovl: step rise (GiB)", "transformers: seconds / step",
                  "tokens / s (real tokens)", "seconds / step", "peak RSS, all processes (GiB)",
                  "LoRA (reference: adapters off): seconds / step", "full (reference: a frozen copy): memory total (GiB)"]:
        assert any(r.startswith(f"| {label} |") for r in rows), f"no row {label!r}"
    for r in rows:
        if "trainable parameters" in r:
            continue
        values = _numbers(r)
        assert values and all(math.isfinite(v) for v in values), r
    raw = json.loads((tmp_path / "train_results.json").read_text())
    assert {r["impl"] for r in raw["full"]["runs"]} == {"nanovl", "hf"}
    assert {(r["mode"], r["ckpt"]) for r in raw["full"]["runs"]} == {("full", True), ("full", False)}
    assert {r["layout"] for r in raw["lora"]["packing"]} == {"packed", "padded"}
    assert [p["processes"] for p in raw["processes"]] == [1, 2] and raw["processes"][1]["sharded"]
    assert {r["mode"] for r in raw["mpo"]["runs"]} == {"lora", "full"}
    facts = raw["full"]["facts"]
    assert facts["nanovl"]["trainable"] == facts["hf"]["trainable"]  # the same trainable set
    assert raw["lora"]["facts"]["nanovl"]["trainable"] == raw["lora"]["facts"]["hf"]["trainable"]
    assert abs(facts["nanovl"]["first_loss"] - facts["hf"]["first_loss"]) < 0.05  # same weights, same data (bf16)


def test_train_gpu_smoke_falls_back_to_cpu(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    text = _run("train_gpu.py", tmp_path, tmp_path / "train_gpu_results.md")
    raw = json.loads((tmp_path / "train_gpu_results.json").read_text())
    assert raw["device"] == "cpu" and raw["smoke"]
    got = {(r["impl"], r["mode"], r["ckpt"], r["data"]) for r in raw["runs"]}
    assert {("nanovl", m, c, d) for m in ("full", "lora") for c in (True, False) for d in ("sample", "packed")} <= got
    assert {("hf", m, c, "sample") for m in ("full", "lora") for c in (True, False)} <= got
    assert all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 and r["mfu_measured"] > 0
               for r in raw["runs"])
    assert text.count("| nanovl |") == 8
