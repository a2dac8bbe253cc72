"""Dense streaming: the FFN weights a residency plan leaves on flash are read for every token, in layer
order, through a prefetch ring, while the compute runs the layers before them.

The weights stream straight from the GGUF: a layer's FFN tensors lie side by side there (llama.cpp
writes down, gate, up together), so a layer's streamed bytes are one or a few byte ranges, read as
large page-aligned O_DIRECT runs (`DirectReader`: parallel `pread`s in C++ threads, no GIL, no page
cache). The kernels then run on the bytes as they arrived: K-quant rows need no re-layout.

`PrefetchRing`: `depth` page-aligned buffers and one reader thread. The order of use is known (the
streamed layers, in order, once per forward pass), so the reader fills buffer k % depth with the k-th
layer of that cycle as soon as the compute has released it: while layer i computes, the reads of the
next depth - 1 streamed layers are in flight. `acquire(layer)` waits until that layer's read has
completed (the wait is the I/O the compute could not hide, and is counted); `release(layer)` hands
the buffer back. A pass that ends early (an error mid-forward) is noticed at the next `acquire` of a
layer out of turn: the ring drains and restarts at that layer.

The size of each direct read is chosen by timing the reads themselves (`edgewise.trial.MeasuredChoice`
over `READ_SIZES`, cost: seconds per byte of a layer's read), not from the probe: on the 2-core test
machine two full benchmark runs decoded faster with 256 KiB reads than with 1 MiB at half the weights
(1.90 against 1.61 tok/s; 1.71 against 1.62), while the probe, which reads with nothing else running,
put 1 MiB level with or ahead of 256 KiB. Measured per read since, in every configuration of a full
run, the two sizes read within 0.05 GB/s of each other, and a third run put fixed 1 MiB reads ahead
(2.02 against 1.84 tok/s): on this disk the difference was run-to-run noise. The choice costs nothing
measurable, and the stats line shows each size's throughput on the user's own disk.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from edgewise.errors import EdgewiseError
from edgewise.flash.io import PAGE, DirectReader, aligned_buffer
from edgewise.flash.residency import ResidencyPlan
from edgewise.gguf_io import GGUFFile, GGUFTensor
from edgewise.lm.model import gated
from edgewise.lm.weights import KQUANT_TYPES, KQuantLinear, load_linear
from edgewise.trial import MeasuredChoice

READ_SIZES = (256 << 10, 1 << 20)  # bytes per pread the ring chooses among: large reads are what flash is fast at (the probe's curve flattens from 256 KiB)
MERGE_GAP = 64 << 10  # tensors closer than this in the file are read as one range, gap included


@dataclass(frozen=True)
class LayerReads:
    """One layer's streamed tensors: where each lands in the ring buffer, and the runs that put it there."""

    layer: int
    tensors: dict[str, tuple[GGUFTensor, int]]  # FFN role (ffn_gate, ...) -> (tensor, byte offset in the buffer)
    runs: dict[int, np.ndarray]  # read size -> [n, 3] int64: (file offset, length, buffer offset), all multiples of PAGE
    nbytes: int  # buffer bytes the layer needs (and reads, at any read size)


def layer_reads(gguf: GGUFFile, plan: ResidencyPlan, read_sizes: tuple[int, ...] = READ_SIZES) -> dict[int, LayerReads]:
    """The streamed FFN tensors of `plan`, per layer, as page-aligned runs of at most each of `read_sizes` bytes."""
    if not read_sizes or any(size < PAGE or size % PAGE for size in read_sizes):
        raise EdgewiseError(f"read sizes {list(read_sizes)}: expected one or more multiples of {PAGE} bytes")
    by_layer: dict[int, list[GGUFTensor]] = {}
    for part in plan.streamed:
        if part.layer >= 0:
            t = gguf.tensor(part.name)
            if t.offset is None:
                raise EdgewiseError(f"{gguf.path}: tensor '{t.name}' has no file offset to stream it from")
            by_layer.setdefault(part.layer, []).append(t)
    out = {}
    for layer, tensors in sorted(by_layer.items()):
        tensors.sort(key=lambda t: t.offset)
        ranges: list[list[int]] = []  # [start, end) in the file, merged across small gaps
        for t in tensors:
            if ranges and t.offset - ranges[-1][1] <= MERGE_GAP:
                ranges[-1][1] = max(ranges[-1][1], t.offset + t.nbytes)
            else:
                ranges.append([t.offset, t.offset + t.nbytes])
        runs: dict[int, list[tuple[int, int, int]]] = {size: [] for size in read_sizes}
        placed, at = {}, 0
        for start, end in ranges:
            first, last = start // PAGE * PAGE, -(-end // PAGE) * PAGE
            for t in tensors:
                if start <= t.offset < end:
                    placed[t.name.split(".")[2]] = (t, at + t.offset - first)
            for size, sized in runs.items():
                sized += [(off, min(size, last - off), at + off - first) for off in range(first, last, size)]
            at += last - first
        out[layer] = LayerReads(layer, placed, {size: np.array(r, dtype=np.int64).reshape(-1, 3) for size, r in runs.items()}, at)
    return out


@dataclass
class RingStats:
    reads: int = 0  # layer reads completed
    bytes_read: int = 0
    read_s: float = 0.0  # the reader's time in reads
    wait_s: float = 0.0  # the compute's time waiting for a read (I/O it could not hide)
    waits: int = 0  # acquires that found their read still in flight
    restarts: int = 0
    by_size: dict[int, list[float]] = field(default_factory=dict)  # read size -> [layer reads, bytes, seconds]
    events: list[tuple[int, int, float, float]] = field(default_factory=list)  # (layer, slot, read done, handed out), when recorded


class PrefetchRing:
    """See the module docstring. `record=True` keeps one event per acquire (for tests and the report). The read
    sizes chosen among are those `reads` has runs for (`layer_reads(read_sizes=...)`)."""

    def __init__(self, reader: DirectReader, reads: dict[int, LayerReads], depth: int = 2, record: bool = False):
        if depth < 1:
            raise EdgewiseError(f"the prefetch ring needs at least 1 buffer, got {depth}")
        if not reads:
            raise EdgewiseError("nothing to stream: every FFN weight is resident (use the dense runtime)")
        self.reader, self.reads, self.depth, self.record = reader, reads, depth, record
        self.order = sorted(reads)
        self.read_sizes = tuple(sorted(next(iter(reads.values())).runs))  # layer_reads plans every layer at the same sizes
        self.read_size = MeasuredChoice()  # used by the reader thread alone
        slot_bytes = max(r.nbytes for r in reads.values())
        self.buffers = [aligned_buffer(slot_bytes) for _ in range(depth)]
        self.tensors = [torch.frombuffer(b, dtype=torch.uint8) for b in self.buffers]
        self.stats = RingStats()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._start_seq = 0

    @property
    def buffer_bytes(self) -> int:
        return sum(len(b) for b in self.buffers)

    # -- the reader thread ---------------------------------------------------------------------------
    def _start(self, seq: int) -> None:
        self._next_read = self._next_use = seq  # sequence numbers: seq -> layer order[seq % n], slot seq % depth
        self._done_at: dict[int, float] = {}  # seq -> when its read completed
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read_loop, name="edgewise-prefetch", daemon=True)
        self._thread.start()

    def _read_loop(self) -> None:
        n = len(self.order)
        try:
            while True:
                with self._cv:
                    while not self._stop and self._next_read >= self._next_use + self.depth:  # every buffer holds an unused read
                        self._cv.wait()
                    if self._stop:
                        return
                    seq = self._next_read
                layer = self.order[seq % n]
                size = self.read_size.choose(self.read_sizes)
                runs = self.reads[layer].runs[size]
                start = time.perf_counter()
                self.reader.read(runs, self.buffers[seq % self.depth])
                done = time.perf_counter()
                nbytes = int(runs[:, 1].sum())
                self.read_size.record(size, (done - start) / nbytes)
                with self._cv:
                    self.stats.reads += 1
                    self.stats.bytes_read += nbytes
                    self.stats.read_s += done - start
                    counts = self.stats.by_size.setdefault(size, [0, 0, 0.0])
                    counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + nbytes, counts[2] + done - start
                    self._done_at[seq] = done
                    self._next_read = seq + 1
                    self._cv.notify_all()
        except BaseException as exc:  # handed to the compute thread at its next acquire
            with self._cv:
                self._error = exc
                self._cv.notify_all()

    def read_size_line(self) -> str:
        """Each read size's share of the layer reads and its throughput over the ring's life, for a stats line."""
        with self._cv:
            sizes = sorted(self.stats.by_size.items())
        if len(self.read_sizes) < 2 or not sizes:
            return ""
        parts = [f"{_kib(size)} {n_bytes / max(seconds, 1e-9) / 1e9:.2f} GB/s ({reads} reads)" for size, (reads, n_bytes, seconds) in sizes]
        return "read sizes: " + ", ".join(parts)

    def close(self) -> None:
        if self._thread is not None:
            with self._cv:
                self._stop = True
                self._cv.notify_all()
            self._thread.join()
            self._thread = None

    # -- the compute side ----------------------------------------------------------------------------
    def acquire(self, layer: int) -> torch.Tensor:
        """The buffer holding `layer`'s streamed bytes, once their read has completed."""
        n = len(self.order)
        if self._thread is None or self.order[self._next_use % n] != layer:
            if layer not in self.reads:
                raise EdgewiseError(f"layer {layer} streams nothing")
            if self._thread is not None:  # a pass ended early: drain and restart at this layer
                self.stats.restarts += 1
                self.close()
            self._start(self.order.index(layer))
        seq = self._next_use
        start = time.perf_counter()
        with self._cv:
            if seq not in self._done_at and self._error is None:
                self.stats.waits += 1
            while seq not in self._done_at and self._error is None:
                self._cv.wait()
            if self._error is not None:
                error, self._error = self._error, None
                self._thread = None
                raise EdgewiseError(f"reading layer {self.order[seq % n]}'s weights failed: {error}") from error
            handed_out = time.perf_counter()
            self.stats.wait_s += handed_out - start
            if self.record:
                self.stats.events.append((layer, seq % self.depth, self._done_at[seq], handed_out))
        return self.tensors[seq % self.depth]

    def release(self, layer: int) -> None:
        with self._cv:
            self._done_at.pop(self._next_use, None)
            self._next_use += 1
            self._cv.notify_all()


def _kib(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes % (1 << 20) == 0 else f"{nbytes >> 10} KiB"


class StreamedFFN(nn.Module):
    """Layer `layer`'s gated FFN with its resident tensors held here and its streamed ones read through the
    ring: down(act(gate x) * (up x)), the same kernels and bytes as the dense model's."""

    def __init__(self, gguf: GGUFFile, layer: int, ring: PrefetchRing | None, streamed: dict[str, tuple[GGUFTensor, int]], activation: str, bits: dict[str, int]):
        super().__init__()
        self.layer, self.ring, self.streamed, self.gelu = layer, ring, streamed, activation == "gelu_tanh"
        self.bits = {"ffn_gate": bits["ffn_gate_up"], "ffn_up": bits["ffn_gate_up"], "ffn_down": bits["ffn_down"]}
        self.resident = nn.ModuleDict(
            {role: load_linear(gguf.tensor(f"blk.{layer}.{role}.weight"), "quant", act_bits=self.bits[role]) for role in self.bits if role not in streamed}
        )

    def _linear(self, role: str, buffer: torch.Tensor | None) -> nn.Module:
        if role in self.resident:
            return self.resident[role]
        t, at = self.streamed[role]
        raw = buffer[at : at + t.nbytes]
        if t.qtype in KQUANT_TYPES:  # the kernel reads the bytes where they landed
            return KQuantLinear(raw.view(t.shape[0], -1), t.qtype, t.shape[1], self.bits[role])
        return load_linear(GGUFTensor(t.name, t.qtype, t.shape, raw.numpy().reshape(t.shape[0], -1)), "quant", act_bits=self.bits[role])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buffer = self.ring.acquire(self.layer) if self.streamed else None
        try:
            gate = self._linear("ffn_gate", buffer)(x).float()
            up = self._linear("ffn_up", buffer)(x).float()
            h = gated(gate, up, self.gelu)
            return self._linear("ffn_down", buffer)(h.to(x.dtype))
        finally:
            if self.streamed:
                self.ring.release(self.layer)
