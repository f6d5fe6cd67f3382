"""Parsed command-line options handed to the function a command runs, by name; comma-separated lists.

An option whose argparse dest is named like a parameter of that function is passed through as it
is, so a command that hands many options on states only those it renames or converts (``sample``,
``bench sample``). The benchmarks split their comma-separated options here.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any


def keywords(fn: Callable, args: argparse.Namespace, **given: Any) -> dict[str, Any]:
    """The options of ``args`` that are parameters of ``fn`` (same name), with ``given`` over them:
    call ``fn(**keywords(fn, args, out_dir=args.out))``."""
    params = inspect.signature(fn).parameters
    return {name: value for name, value in vars(args).items() if name in params} | given


def comma_list(text: str | None) -> list[str]:
    """The items of an option such as ``--patterns strided,fixed``: split at commas, stripped, empty
    items (and None) dropped."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]
