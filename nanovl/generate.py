"""python -m nanovl.generate: the documented name of the command line (nanovl/cli.py)."""
try:
    from nanovl.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch is imported: no traceback
    raise SystemExit(130) from None

if __name__ == "__main__":
    main()
