"""python -m nanovl.generate: the documented name of the command line (nanovl/cli.py)."""
from nanovl.errors import ctrl_c_exits

with ctrl_c_exits():
    from nanovl.cli import main

if __name__ == "__main__":
    main()
