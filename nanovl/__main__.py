"""python -m nanovl ...: the command line of nanovl/cli.py."""
from nanovl.cli import main

main()
