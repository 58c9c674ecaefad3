"""python -m nanovl ...: the command line of nanovl/cli.py (chat); python -m nanovl.train and python -m nanovl.convert
are the other two."""
from nanovl.cli import main

main()
