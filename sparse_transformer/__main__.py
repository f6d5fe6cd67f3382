"""``python -m sparse_transformer ...`` (also what torchrun launches)."""

from .cli import console

if __name__ == "__main__":
    console()
