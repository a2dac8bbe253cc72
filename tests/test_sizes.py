"""One size parser for every option (`edgewise.sizes`): 1024-based units, shares of a stated whole, named errors."""

from __future__ import annotations

import pytest

from edgewise.errors import EdgewiseError
from edgewise.sizes import parse_size


@pytest.mark.parametrize(
    "text, expected",
    [("256KB", 262144), ("200K", 204800), ("0.25MB", 262144), ("1000", 1000), ("1e3", 1000), ("900MB", 900 << 20), ("900M", 900 << 20),
     ("64MiB", 64 << 20), ("1.5GiB", 3 << 29), ("2gb", 2 << 30), (" 12 b ", 12), (4096, 4096)],
)
def test_sizes_are_1024_based(text, expected):
    assert parse_size(text) == expected


def test_a_share_needs_a_whole():
    assert parse_size("50%", of=1000) == 500 and parse_size("12.5%", of=800) == 100
    assert parse_size("40MB", of=1000) == 40 << 20  # a size stays a size where a share is allowed
    with pytest.raises(EdgewiseError, match=r"--budget '50%': expected a size like 256KB, 900MB, 1.5GiB or a number of bytes$"):
        parse_size("50%", what="--budget")


@pytest.mark.parametrize("text", ["12 parsecs", "", "MB", "1.2.3KB", "-5KB", "5 K B"])
def test_bad_sizes_are_named(text):
    with pytest.raises(EdgewiseError, match=r"--dram-budget .*expected a size like .* or a share like 50%"):
        parse_size(text, of=100, what="--dram-budget")
