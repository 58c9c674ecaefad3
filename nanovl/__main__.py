"""python -m nanovl ...: the command line of nanovl/cli.py (chat); python -m nanovl.train and python -m nanovl.convert
are the other two."""
try:
    from nanovl.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch is imported: no traceback
    raise SystemExit(130) from None

main()
