"""Which weights stay in DRAM and which stream from flash, by value per byte; and the physical limit that
follows from the choice.

Every weight byte a token needs either sits in DRAM or is read from flash for that token. Holding a part
resident saves `use` x its bytes of reading per token, where `use` is the fraction of tokens that need
it, so its value per resident byte is `use`. The plan:
1. **Required parts first**: what every token needs and a stream could not serve better (attention,
   norms, the output head). A budget below their sum is refused, naming the minimum.
2. **The reading buffers**: the streamed parts' prefetch ring (`ring_depth` x the largest streamed
   layer) is DRAM too, and counted inside the budget. Two buffers let the next layer's reads run while
   a layer computes; a budget that cannot hold two gets one (reads and compute then take turns: slower,
   but it runs), and only a budget below the one-buffer minimum is refused.
3. **Then by value per byte**, highest first, each part that still fits (greedy; parts are a layer's
   tensor or a slice of one, small against the budget, so greedy is within one part of optimal).
   Dense FFN weights have use 1; measured activation sparsity gives slices of lower use.

Parts never resident are streamed; `bytes_per_token` sums their bytes x use. The **bound** is the time a
token cannot beat: those bytes at the disk's direct-read throughput for the engine's read size (from
`edgewise flash probe`), plus the compute time of a token (issue 16's yardstick; with reads fully
overlapped with compute the floor is the larger of the two, which the report also shows).

The token embedding is not a resident part: a token reads one row of it (a few KB), so it is
streamed with use = one row per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgewise.errors import EdgewiseError
from edgewise.gguf_io import GGUFFile

FFN_TENSORS = ("ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class Part:
    """A piece of the model that is resident or streamed as a whole."""

    name: str
    nbytes: int
    use: float = 1.0  # fraction of its bytes a token reads when it is streamed
    required: bool = False  # must be resident (every token reads all of it, in random order or repeatedly)
    layer: int = -1  # the layer a streamed part is read for (-1: none); the ring holds whole layers

    @property
    def bytes_per_token(self) -> float:
        return self.nbytes * self.use


def model_parts(gguf: GGUFFile) -> list[Part]:
    """A GGUF's weights as parts: FFN tensors per layer (use 1: dense), the rest required, except the
    token embedding (one row per token)."""
    parts = []
    for t in gguf.tensors.values():
        nbytes = int(t.raw.nbytes)
        if t.name == "token_embd.weight" and "output.weight" in gguf.tensors:
            parts.append(Part(t.name, nbytes, use=1.0 / t.shape[0]))
            continue
        pieces = t.name.split(".")
        if pieces[0] == "blk" and pieces[2] in FFN_TENSORS:
            parts.append(Part(t.name, nbytes, layer=int(pieces[1])))
        else:
            parts.append(Part(t.name, nbytes, required=True))  # attention, norms, the output head (or a tied table)
    return parts


@dataclass
class ResidencyPlan:
    budget_bytes: int
    resident: list[Part]
    streamed: list[Part]
    ring_bytes: int
    ring_depth: int = 2  # buffers in the prefetch ring (1: no overlap of reads and compute; 0: nothing streams)

    @property
    def resident_bytes(self) -> int:
        return sum(p.nbytes for p in self.resident)

    @property
    def dram_bytes(self) -> int:
        """Resident weights plus the reading ring: never more than the budget."""
        return self.resident_bytes + self.ring_bytes

    @property
    def bytes_per_token(self) -> float:
        return sum(p.bytes_per_token for p in self.streamed)

    def bound_s(self, gbps: float, compute_s: float) -> tuple[float, float]:
        """(reads + compute, max(reads, compute)): seconds per token without and with full overlap."""
        read_s = self.bytes_per_token / (gbps * 1e9)
        return read_s + compute_s, max(read_s, compute_s)

    def table(self) -> str:
        """What is resident and what streams, per kind of part (attention, ffn_gate, ...), in MB."""
        rows: dict[str, list[float]] = {}
        for where, parts in (("resident", self.resident), ("streamed", self.streamed)):
            for p in parts:
                kind = p.name.split(".")[2] if p.name.startswith("blk.") else p.name.removesuffix(".weight")
                row = rows.setdefault(kind, [0.0, 0.0, 0.0])
                row[0 if where == "resident" else 1] += p.nbytes / 1e6
                if where == "streamed":
                    row[2] += p.bytes_per_token / 1e6
        lines = ["| part | resident MB | streamed MB | read per token MB |", "|---|---:|---:|---:|"]
        for kind, (res, streamed, per_token) in sorted(rows.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
            lines.append(f"| {kind} | {res:.1f} | {streamed:.1f} | {per_token:.2f} |")
        lines.append(f"| prefetch ring | {self.ring_bytes / 1e6:.1f} | | |")
        lines.append(f"| **total** | **{self.dram_bytes / 1e6:.1f}** of {self.budget_bytes / 1e6:.1f} | {sum(p.nbytes for p in self.streamed) / 1e6:.1f} | {self.bytes_per_token / 1e6:.2f} |")
        return "\n".join(lines)


def _ring_bytes(streamed: list[Part], depth: int) -> int:
    per_layer: dict[int, int] = {}
    for p in streamed:
        if p.layer >= 0:
            per_layer[p.layer] = per_layer.get(p.layer, 0) + p.nbytes
    return depth * max(per_layer.values(), default=0)


def plan_residency(parts: list[Part], budget_bytes: int, ring_depth: int = 2) -> ResidencyPlan:
    """Required parts, then the ring, then the rest by value per byte while it fits (see the module docstring).
    A budget too small for a ring of `ring_depth` buffers gets the deepest ring that fits, down to one."""
    if ring_depth < 1:
        raise EdgewiseError(f"ring_depth must be at least 1 (a buffer to read into), got {ring_depth}")
    needed = [p for p in parts if p.required or p.use > 0]  # a part of use 0 is never read: neither resident nor streamed
    if sum(p.nbytes for p in needed) <= budget_bytes:  # every weight fits: nothing streams, no ring
        return ResidencyPlan(budget_bytes, needed, [], 0, 0)
    required = [p for p in parts if p.required]
    optional = sorted((p for p in parts if not p.required), key=lambda p: (-p.use, -p.nbytes, p.name))
    streamed = [p for p in optional if p.bytes_per_token > 0]
    fixed = sum(p.nbytes for p in required)
    depth = ring_depth
    while depth > 1 and budget_bytes < fixed + _ring_bytes(streamed, depth):
        depth -= 1
    minimum = fixed + _ring_bytes(streamed, depth)
    if budget_bytes < minimum:
        raise EdgewiseError(
            f"a DRAM budget of {budget_bytes / 1e6:.1f} MB is below this model's resident minimum of {minimum / 1e6:.1f} MB"
            f" (attention, norms and output head {fixed / 1e6:.1f} MB, plus a one-layer reading buffer); give at least that"
        )
    resident = list(required)
    used = fixed
    for p in optional:
        if p.use <= 0:
            continue  # never read: neither resident nor streamed
        # a part made resident may shrink the ring (its layer streams less); the ring of what would remain is charged
        rest = [q for q in streamed if q is not p]
        if used + p.nbytes + _ring_bytes(rest, depth) <= budget_bytes:
            resident.append(p)
            used += p.nbytes
            streamed = rest
    return ResidencyPlan(budget_bytes, resident, streamed, _ring_bytes(streamed, depth), depth)


def plan_from_names(parts: list[Part], budget_bytes: int, resident_names: list[str], ring_depth: int, where: str) -> ResidencyPlan:
    """A saved plan (the names of its resident parts) rebuilt over `parts`; `where` names the plan's file in errors."""
    by_name = {p.name: p for p in parts}
    missing = [n for n in resident_names if n not in by_name]
    if missing:
        raise EdgewiseError(f"{where}: the plan keeps tensor '{missing[0]}' resident, which this GGUF lacks (a plan for another model?); convert again")
    names = set(resident_names)
    unplaced = [p.name for p in parts if p.required and p.name not in names]
    if unplaced:
        raise EdgewiseError(f"{where}: the plan streams '{unplaced[0]}', which every token needs in RAM; convert again")
    resident = [by_name[n] for n in resident_names]
    streamed = [p for p in parts if p.name not in names and p.bytes_per_token > 0]
    plan = ResidencyPlan(budget_bytes, resident, streamed, _ring_bytes(streamed, ring_depth), ring_depth)
    if plan.dram_bytes > budget_bytes:
        raise EdgewiseError(f"{where}: the plan holds {plan.dram_bytes / 1e6:.1f} MB, more than its budget of {budget_bytes / 1e6:.1f} MB; convert again")
    return plan
