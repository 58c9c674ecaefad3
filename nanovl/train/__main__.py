"""python -m nanovl.train: supervised fine-tuning (nanovl/train/cli.py)."""
from nanovl.errors import ctrl_c_exits

with ctrl_c_exits():
    from nanovl.train.cli import main

main()
