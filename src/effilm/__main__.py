"""``python -m effilm`` (and ``torchrun -m effilm``) runs the command line."""

from effilm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
