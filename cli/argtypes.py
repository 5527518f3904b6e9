"""argparse types shared by the commands: a value out of range is refused while parsing, before a
model loads or a server starts, with argparse's usual `error: argument --x: ...` and exit code 2.

Without them `effnet bench --resolution 0` and `effnet models --num-classes 0` end in tracebacks from
deep inside PyTorch, and `effnet bench --batches 0` prints a row of zeros as if it had measured.
"""
from __future__ import annotations

import argparse
import math


def bounded(kind: type, lo: float, hi: float, unit: str = ""):
    """A number of `kind` (int or float) within [lo, hi]."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value) or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected {lo:g}..{hi:g}{unit}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def int_list(lo: int, hi: int, what: str = "value"):
    """Comma-separated integers, each within [lo, hi]; at least one."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.replace(" ", "").split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or any(not lo <= v <= hi for v in values):
            raise argparse.ArgumentTypeError(f"each {what} is {lo}..{hi}, got {text!r}")
        return values
    return parse


def existing_dir(what: str):
    """A folder that must already exist: a store given by path is read, and reading it must not create
    it (BentoML's model store makes its folder on first use, so a typo would leave an empty store behind)."""
    def parse(text: str) -> str:
        from pathlib import Path

        if not Path(text).expanduser().is_dir():
            raise argparse.ArgumentTypeError(f"{what} {text!r} is not a folder")
        return str(Path(text).expanduser())
    return parse
