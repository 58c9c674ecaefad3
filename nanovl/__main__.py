"""python -m nanovl ...: the command line of nanovl/cli.py (chat); python -m nanovl.train and python -m nanovl.convert
are the other two."""
from nanovl.errors import ctrl_c_exits

with ctrl_c_exits():
    from nanovl.cli import main

main()
