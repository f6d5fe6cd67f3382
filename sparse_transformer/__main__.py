"""``python -m sparse_transformer ...`` (also what torchrun launches)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
