"""The README's generated blocks are up to date, and its first screen has the two commands."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import readme  # noqa: E402


def test_layout_block_is_current():
    assert readme.layout() in (ROOT / "README.md").read_text(), "run `python scripts/readme.py --layout`"


def test_flash_block_quotes_the_benchmark():
    assert readme.flash() in (ROOT / "README.md").read_text(), "run `python scripts/readme.py --layout`"


def test_first_screen_has_run_and_test_commands():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:15])
    assert "make run" in first_screen and "make test" in first_screen
    assert "make test" in (ROOT / ".ci/run").read_text()
