"""Shared pytest plumbing for the parity tests: import paths, cached tiny checkpoints, a diff summary."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for p in (str(ROOT), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

import fixtures as fx  # noqa: E402


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """make_ckpt(llm, vit, **write_checkpoint_kwargs) -> (path, state_dict, config_dict), cached per session.
    The returned directory is shared: tests that modify a checkpoint must write their own."""
    cache = {}

    def make(llm="qwen2", vit="300m", **kw):
        key = repr((llm, vit, sorted(kw.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"ckpt-{llm}-{vit}")
            sd = fx.write_checkpoint(d, llm, vit, **kw)
            cache[key] = (d, sd, fx.read_config(d))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def nv_load():
    """nv_load(path) -> nanovl model (fp32, CPU, eval), cached per path."""
    cache = {}

    def load(path):
        import nanovl

        key = str(path)
        if key not in cache:
            cache[key] = nanovl.load(path, dtype=torch.float32, device="cpu")
        return cache[key]

    return load


def pytest_terminal_summary(terminalreporter):
    if fx.DIFFS:
        terminalreporter.write_sep("-", "max abs differences (nanovl vs reference)")
        for name, d in fx.DIFFS.items():
            terminalreporter.write_line(f"{d:10.3e}  {name}")
    if fx.DIFFS and os.environ.get("NANOVL_PARITY_REPORT"):  # scripts/readme.py puts these numbers in the README
        Path(os.environ["NANOVL_PARITY_REPORT"]).write_text(json.dumps(fx.DIFFS, indent=1))
