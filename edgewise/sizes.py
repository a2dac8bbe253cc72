"""Sizes as users write them, one definition for every option that takes one (`--budget`, `--sram`,
`--dram-budget`, ...).

'256KB', '200K', '0.25MB', '1.5GiB', '900M', '262144' (bytes), and, where the option has a whole to
take a share of, '50%'. K, M and G are 1024-based with or without the "i", as RAM and SRAM are
counted: a "256KB" microcontroller has 262144 bytes, and a "900MB" memory cgroup 943718400.
"""

from __future__ import annotations

import re

from edgewise.errors import EdgewiseError

UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?:([kmgt])(?:i?b)?|(b)|(%))?\s*", re.IGNORECASE)


def parse_size(text: str | int, of: int | None = None, what: str = "size") -> int:
    """Bytes for `text`; a percentage is of `of` bytes (refused when `of` is None). `what` names the option
    in the error."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.fullmatch(str(text))
    if m is None or (m.group(4) and of is None):
        share = " or a share like 50%" if of is not None else ""
        raise EdgewiseError(f"{what} {text!r}: expected a size like 256KB, 900MB, 1.5GiB or a number of bytes{share}")
    value = float(m.group(1))
    if m.group(4):
        return int(value / 100 * of)
    return int(value * UNITS[(m.group(2) or m.group(3) or "").lower()])

