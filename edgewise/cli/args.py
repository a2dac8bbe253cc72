"""What every `edgewise` command family shares: argument types that check counts, sizes and rates while parsing
(before any heavy work), and the progress bar."""

from __future__ import annotations

import argparse
import math
import sys

from edgewise.errors import EdgewiseError


# -- argument types: every count, size and rate is checked while parsing, before any heavy work --------
def number(kind: type, low: float, low_open: bool = False, high: float | None = None):
    """An argparse type: a `kind` number >= low (> low if low_open) and <= high."""
    bounds = f"{'>' if low_open else 'at least'} {low}" + (f" and at most {high}" if high is not None else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, got '{text}'") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {bounds}"  # argparse names the type in some messages
    return parse


positive_int = number(int, 1)
non_negative_int = number(int, 0)
positive_float = number(float, 0.0, low_open=True)
non_negative_float = number(float, 0.0)
unit_fraction = number(float, 0.0, low_open=True, high=1.0)


def size_in_bytes(text: str) -> int:
    """An argparse type over `edgewise.sizes.parse_size`: a size such as 256KB (1024-based), at least one byte."""
    from edgewise.sizes import parse_size

    try:
        n = parse_size(text)
    except EdgewiseError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text}")
    return n


def progress_bar(desc: str, unit: str | None = None, postfix: tuple[str, ...] = ()):
    """A tqdm bar fed with (done, total, *values of `postfix`); `unit` "B" counts bytes (MB/s shown)."""
    from tqdm import tqdm

    bar = None
    unit = unit or ("layer" if "load" in desc else "window" if "perplexity" in desc else "step")

    def update(done: int, total: int, *shown: float) -> None:
        """`shown`: values for the bar's `postfix` names (a loss, ...), in order."""
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False, file=sys.stderr)
        if shown and postfix:
            bar.set_postfix({name: f"{value:.4g}" for name, value in zip(postfix, shown)}, refresh=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update

