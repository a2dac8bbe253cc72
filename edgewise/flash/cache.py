"""A preallocated per-layer cache of FFN units (the paper's Fig. 6), with swap-delete.

One page-aligned buffer of `capacity` units is allocated once. Live units always fill slots
[0, size): a new run of units is read straight from flash into the free tail (contiguous, so one
coalesced read lands in consecutive slots, no copy), and deleting a unit moves the last live unit
into its slot. So nothing is allocated per token and the FFN kernel runs over one dense prefix.
"""

from __future__ import annotations

import mmap

import numpy as np
import torch

from edgewise.errors import EdgewiseError


class UnitCache:
    def __init__(self, n_units: int, capacity: int, unit_bytes: int):
        if not 1 <= capacity <= n_units:
            raise EdgewiseError(f"cache capacity {capacity} units outside 1..{n_units}")
        self.capacity, self.unit_bytes = capacity, unit_bytes
        self.buffer = mmap.mmap(-1, capacity * unit_bytes)  # page-aligned, as O_DIRECT needs
        self.units = np.frombuffer(self.buffer, dtype=np.uint8).reshape(capacity, unit_bytes)
        self.tensor = torch.from_numpy(self.units)  # shares memory: what the FFN kernel reads
        self.slot_of = np.full(n_units, -1, dtype=np.int64)  # unit -> slot, -1 when absent
        self.unit_at = np.full(capacity, -1, dtype=np.int64)  # slot -> unit
        self.stamp = np.full(capacity, -1, dtype=np.int64)  # slot -> last token that used it
        self.size = 0

    @property
    def nbytes(self) -> int:
        return self.capacity * self.unit_bytes

    @property
    def free(self) -> int:
        return self.capacity - self.size

    def clear(self) -> None:
        self.slot_of[self.unit_at[: self.size]] = -1
        self.unit_at[: self.size] = -1
        self.stamp[: self.size] = -1
        self.size = 0

    def delete(self, slots: np.ndarray) -> None:
        """Swap-delete: live units from the tail move into the freed slots below the new size."""
        slots = np.unique(np.asarray(slots, dtype=np.int64))
        if len(slots) == 0:
            return
        if slots[0] < 0 or slots[-1] >= self.size:
            raise IndexError(f"delete of slots outside 0..{self.size - 1}")
        new_size = self.size - len(slots)
        holes = slots[slots < new_size]
        tail = np.arange(new_size, self.size)
        movers = tail[~np.isin(tail, slots)]
        self.slot_of[self.unit_at[slots]] = -1
        if len(holes):
            self.units[holes] = self.units[movers]
            self.unit_at[holes] = self.unit_at[movers]
            self.stamp[holes] = self.stamp[movers]
            self.slot_of[self.unit_at[holes]] = holes
        self.unit_at[new_size : self.size] = -1
        self.stamp[new_size : self.size] = -1
        self.size = new_size

    def append(self, units: np.ndarray, stamp: int) -> int:
        """Claim the next len(units) slots for `units` (their bytes are then read into
        self.units[first:first+n]); returns the first slot."""
        n = len(units)
        if n > self.free:
            raise EdgewiseError(f"cache overflow: {n} units into {self.free} free slots")
        first = self.size
        self.unit_at[first : first + n] = units
        self.slot_of[units] = np.arange(first, first + n)
        self.stamp[first : first + n] = stamp
        self.size += n
        return first

    def check(self) -> None:
        """The invariants (for tests): maps are inverse, live slots are exactly [0, size)."""
        live = self.unit_at[: self.size]
        assert (live >= 0).all() and len(np.unique(live)) == self.size, "live slots hold distinct units"
        assert (self.slot_of[live] == np.arange(self.size)).all(), "slot_of inverts unit_at"
        assert (self.slot_of >= 0).sum() == self.size, "no stale slot_of entries"
        assert (self.unit_at[self.size :] == -1).all(), "slots past size are empty"
