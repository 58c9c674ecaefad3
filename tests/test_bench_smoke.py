"""benchmarks/bench.py --smoke runs end to end on a tiny checkpoint and writes its results file (no timing asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_writes_results(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "results.md"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--cache",
                          str(tmp_path / "cache"), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert "SMOKE" in text and "| decode, 8 tokens (tok/s) |" in text and "## Targets" in text and "int8" in text
    raw = json.loads(out.with_suffix(".json").read_text())
    runs = raw["models"]["InternVL3-1B"]["runs"]
    assert {r["impl"] for r in runs} == {"nanovl", "hf", "nanovl-int8"}
    assert all(r["new_tokens"] == 8 for r in runs)  # never stops early
