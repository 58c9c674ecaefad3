"""python -m nanovl.train: supervised fine-tuning (nanovl/train/cli.py)."""
from nanovl.train.cli import main

main()
