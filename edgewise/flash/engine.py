"""The flash engine: the decoder's FFNs run from the flash store under a DRAM budget.

Per token and layer (`FlashFFN.step`):
1. the predictor scores every unit from the FFN input; the top `k_units` are the active set;
2. units active in the cache are hits; units outside the window (not used by the last `window`
   tokens) are deleted, oldest first beyond that if room is needed (swap-delete);
3. the missing units are planned into reads (`reads`: one per unit, adjacent units merged, or the
   cost model's plan, which also reads small gaps of unneeded units when that is cheaper) and read
   with O_DIRECT by the thread pool straight into the cache's free tail;
4. the FFN kernel runs over every cached unit (the window's units are exact extra terms).

`mode="naive"` is the baseline: every token, each layer's whole FFN is read into one buffer.
Counters per token: bytes read, reads issued, unit hits and misses, predicted and measured I/O time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants
from torch import nn

from edgewise.errors import EdgewiseError
from edgewise.flash.cache import UnitCache
from edgewise.flash.io import CostModel, DirectReader, ProbeResult
from edgewise.flash.store import PROBE_FILE, Q4_1_BLOCK, QK, FlashStore, nibbles_to_codes
from edgewise.lm.model import gated
from edgewise.sizes import parse_size

Mode = Literal["flash", "naive"]
Reads = Literal["unit", "adjacent", "cost"]
NAIVE_MAX_READ = 256 << 10


def default_probe_path() -> Path:
    from edgewise.models import cache_root

    return cache_root() / "flash_probe.json"


@dataclass
class TokenCounters:
    bytes_read: int = 0
    reads: int = 0
    hits: int = 0  # active units found in the cache
    misses: int = 0  # active units read from flash
    predicted_io_s: float = 0.0
    measured_io_s: float = 0.0
    cached_units: int = 0  # units the FFN kernels ran over, summed over layers


@dataclass
class FlashStats:
    tokens: list[TokenCounters] = field(default_factory=list)

    def total(self, name: str) -> float:
        return sum(getattr(t, name) for t in self.tokens)

    def per_token(self, name: str) -> float:
        return self.total(name) / len(self.tokens) if self.tokens else 0.0

    @property
    def hit_rate(self) -> float:
        active = self.total("hits") + self.total("misses")
        return self.total("hits") / active if active else 0.0

    def line(self) -> str:
        return (
            f"flash {self.per_token('bytes_read') / 1e6:.2f} MB/token in {self.per_token('reads'):.0f} reads"
            f" | hit rate {self.hit_rate:.0%} | I/O {self.per_token('measured_io_s') * 1e3:.1f} ms/token"
            f" (predicted {self.per_token('predicted_io_s') * 1e3:.1f})"
        )


class FlashEngine:
    """Owns the store's FFN file, the reader, the cost model, the caches and the counters."""

    def __init__(
        self,
        store: FlashStore,
        resident: dict[str, np.ndarray],
        dram_budget: str | int = "50%",
        mode: Mode = "flash",
        window: int = 4,
        reads: Reads = "cost",
        active_fraction: float | None = None,
        threads: int | None = None,
        cost_model: CostModel | None = None,
    ):
        if mode not in ("flash", "naive"):
            raise EdgewiseError(f"unknown flash mode {mode!r}: choose flash or naive")
        if reads not in ("unit", "adjacent", "cost"):
            raise EdgewiseError(f"unknown read plan {reads!r}: choose unit, adjacent or cost")
        if window < 1:
            raise EdgewiseError(f"--window must be at least 1 (1: keep only this token's units; got {window})")
        self.store, self.layout, self.mode, self.window, self.reads = store, store.layout, mode, window, reads
        n_layers, layout = store.n_layers, store.layout
        self.cost_model = cost_model or load_cost_model(store.path)
        self.reader = DirectReader(store.ffn_path, threads=threads or self.cost_model.best_threads(16 << 10))
        self.down_scales = [(torch.from_numpy(resident[f"flash.blk.{i}.down_d"]), torch.from_numpy(resident[f"flash.blk.{i}.down_m"])) for i in range(n_layers)]
        self.down_scale_bytes = sum(d.numel() * 2 + m.numel() * 2 for d, m in self.down_scales)
        # What "100%" means: every unit of every layer cached, plus the down scales (the GGUF's FFN
        # bytes plus the units' 1.6% alignment padding).
        self.ffn_bytes = n_layers * layout.layer_bytes + self.down_scale_bytes
        self.budget_bytes = parse_size(dram_budget, of=self.ffn_bytes, what="--dram-budget")
        predictor = store.manifest["predictor"]
        if active_fraction is not None and not 0 < active_fraction <= 1:
            raise EdgewiseError(f"--active-fraction must be in (0, 1] (got {active_fraction})")
        self.k_units = [
            max(1, math.ceil(active_fraction * layout.n_units)) if active_fraction is not None else int(k) for k in predictor["k_units"]
        ]
        per_read = NAIVE_MAX_READ // layout.unit_bytes
        self.naive_runs = np.array([[a, min(per_read, layout.n_units - a)] for a in range(0, layout.n_units, per_read)], dtype=np.int64)
        if mode == "naive":
            shared = UnitCache(layout.n_units, layout.n_units, layout.unit_bytes)
            self.caches = [shared] * n_layers
            self.capacity = layout.n_units
        else:
            per_layer = (self.budget_bytes - self.down_scale_bytes) // (n_layers * layout.unit_bytes)
            need = max(self.k_units)
            if per_layer < need:
                minimum = need * n_layers * layout.unit_bytes + self.down_scale_bytes
                raise EdgewiseError(
                    f"--dram-budget {dram_budget} ({self.budget_bytes / 1e6:.1f} MB) cannot hold one token's active set: the operating point needs {need} of "
                    f"{layout.n_units} units per layer, so at least {minimum / 1e6:.1f} MB ({minimum / self.ffn_bytes:.0%} of the FFN weights, down scales included); "
                    "raise --dram-budget or lower --active-fraction"
                )
            self.capacity = min(per_layer, layout.n_units)
            self.caches = [UnitCache(layout.n_units, self.capacity, layout.unit_bytes) for _ in range(n_layers)]
        self.predictors = [
            (
                torch.from_numpy(resident[f"flash.blk.{i}.pred_a"]).float(),
                torch.from_numpy(resident[f"flash.blk.{i}.pred_b"]).float(),
                torch.from_numpy(resident[f"flash.blk.{i}.pred_c"]).float(),
            )
            for i in range(n_layers)
        ]
        self.oracle_all = False  # tests: every unit active (flash == dense)
        self.stats = FlashStats()
        self.clock = [0] * n_layers

    @property
    def cache_bytes(self) -> int:
        return len({id(c) for c in self.caches}) * self.caches[0].nbytes

    @property
    def predictor_bytes(self) -> int:
        return sum(sum(t.numel() * t.element_size() for t in p) for p in self.predictors)

    def reset(self) -> None:
        """Empty the caches and counters (a new sequence)."""
        for cache in {id(c): c for c in self.caches}.values():
            cache.clear()
        self.stats = FlashStats()
        self.clock = [0] * len(self.caches)

    def layer(self, i: int) -> "FlashFFN":
        return FlashFFN(self, i)

    # -- one token, one layer ------------------------------------------------------------------
    def _counters(self, layer: int) -> TokenCounters:
        t = self.clock[layer]
        while len(self.stats.tokens) <= t:
            self.stats.tokens.append(TokenCounters())
        return self.stats.tokens[t]

    def _read_units(self, layer: int, cache: UnitCache, runs: np.ndarray, stamp: int, counters: TokenCounters) -> None:
        """Read runs [n, 2] of (first unit, n units) into the cache's free tail."""
        if len(runs) == 0:
            return
        ub = self.layout.unit_bytes
        units = _units_of(runs)
        first_slot = cache.append(units, stamp)
        lengths = runs[:, 1] * ub
        buffer_offsets = (first_slot + np.concatenate([[0], np.cumsum(runs[:-1, 1])])) * ub
        plan = np.stack([self.store.layer_offset(layer) + runs[:, 0] * ub, lengths, buffer_offsets], axis=1).astype(np.int64)
        before_s, before_b, before_r = self.reader.read_seconds, self.reader.bytes_read, self.reader.reads_issued
        self.reader.read(plan, cache.buffer)
        counters.measured_io_s += self.reader.read_seconds - before_s
        counters.bytes_read += self.reader.bytes_read - before_b
        counters.reads += self.reader.reads_issued - before_r
        counters.predicted_io_s += self.cost_model.predict_seconds(lengths)

    def _plan(self, missing: np.ndarray, cache: UnitCache) -> np.ndarray:
        if self.reads == "unit":
            return np.stack([missing, np.ones_like(missing)], axis=1)
        ub = self.layout.unit_bytes
        runs = self.cost_model.plan(missing, ub) if self.reads == "cost" else self.cost_model.plan_adjacent(missing, ub)
        if self.reads == "cost" and len(runs):
            runs = _split_at_cached(runs, cache.slot_of)
        return runs

    def step(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [1, D] fp32 -> the FFN output [1, D] fp32."""
        cache, counters, t = self.caches[layer], self._counters(layer), self.clock[layer]
        n_units = self.layout.n_units
        if self.mode == "naive":
            cache.clear()
            self._read_units(layer, cache, self.naive_runs, t, counters)
            counters.misses += n_units
        else:
            if self.oracle_all:
                active = np.arange(n_units)
            else:
                a, b, c = self.predictors[layer]
                scores = (x @ a.T) @ b.T + c
                active = scores[0].topk(self.k_units[layer]).indices.numpy()
            slots = cache.slot_of[active]
            hit = slots >= 0
            cache.stamp[slots[hit]] = t
            counters.hits += int(hit.sum())
            missing = np.sort(active[~hit])
            counters.misses += len(missing)
            old = np.nonzero(cache.stamp[: cache.size] <= t - max(self.window, 1))[0]  # outside the window
            cache.delete(old)
            runs = self._plan(missing, cache)
            need = int(runs[:, 1].sum()) if len(runs) else 0
            if need > cache.free:  # make room: oldest window units first, never this token's
                candidates = np.nonzero(cache.stamp[: cache.size] < t)[0]
                order = candidates[np.argsort(cache.stamp[candidates], kind="stable")]
                cache.delete(order[: need - cache.free])
                if need > cache.free:  # gaps read by coalescing do not fit: read only the missing units, adjacent ones merged
                    runs = self.cost_model.plan_adjacent(missing, self.layout.unit_bytes) if self.reads != "unit" else np.stack([missing, np.ones_like(missing)], axis=1)
            self._read_units(layer, cache, runs, t, counters)
            if len(runs) and int(runs[:, 1].sum()) > len(missing):  # gap units came along: computed now, first to go next token
                read = _units_of(runs)
                gaps = read[~np.isin(read, missing)]
                cache.stamp[cache.slot_of[gaps]] = t - max(self.window, 1)
        counters.cached_units += cache.size
        d, m = self.down_scales[layer]
        y = ffn_over_units(x, cache.tensor, cache.size, self.layout.bundles_per_unit, d, m)
        self.clock[layer] += 1
        return y


def _units_of(runs: np.ndarray) -> np.ndarray:
    """Every unit that runs [n, 2] of (first unit, n units) cover, in order."""
    return np.concatenate([np.arange(a, a + n) for a, n in runs])


def _split_at_cached(runs: np.ndarray, slot_of: np.ndarray) -> np.ndarray:
    """Cut merged runs around units already cached (a unit must never be cached twice)."""
    out = []
    for first, n in runs:
        units = np.arange(first, first + n)
        absent = slot_of[units] < 0
        if absent.all():
            out.append((first, n))
            continue
        start = None
        for u, ok in zip(units, absent):
            if ok and start is None:
                start = u
            elif not ok and start is not None:
                out.append((start, u - start))
                start = None
        if start is not None:
            out.append((start, first + n - start))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def ffn_over_units(x: torch.Tensor, units: torch.Tensor, n_units: int, bpu: int, down_d: torch.Tensor, down_m: torch.Tensor) -> torch.Tensor:
    """The sparse FFN over the first n_units cached units: the native kernel, or `ffn_over_units_reference`."""
    from edgewise.lm.weights import native_kernels

    ops = native_kernels()
    if ops is not None:
        return ops.flash_ffn(x.contiguous(), units, n_units, bpu, down_d, down_m)
    return ffn_over_units_reference(x, units, n_units, bpu, down_d, down_m)


def ffn_over_units_reference(x: torch.Tensor, units: torch.Tensor, n_units: int, bpu: int, down_d: torch.Tensor, down_m: torch.Tensor) -> torch.Tensor:
    """The same math in torch, from the bytes (the kernel's reference, and the fallback without AVX2)."""
    D = x.shape[-1]
    rb = (D // QK) * Q4_1_BLOCK
    bb = 2 * rb + D // 2
    live = units[:n_units].numpy()
    ids = np.ascontiguousarray(live[:, bpu * bb : bpu * (bb + 4)]).view("<i4").reshape(-1)
    bundles = live[:, : bpu * bb].reshape(-1, bb)[ids >= 0]
    ids = torch.from_numpy(ids[ids >= 0].astype(np.int64))
    if len(ids) == 0:
        return torch.zeros(1, D)
    gate, up = (torch.from_numpy(quants.dequantize(np.ascontiguousarray(bundles[:, a : a + rb]), QT.Q4_1)) for a in (0, rb))
    codes = torch.from_numpy(nibbles_to_codes(bundles[:, 2 * rb :].reshape(len(bundles), D // QK, 16)).reshape(len(bundles), D).astype(np.float32))
    block = ids // QK
    down = codes * down_d.float()[block] + down_m.float()[block]  # [n, D]: column i of the down matrix
    h = gated(gate @ x[0].float(), up @ x[0].float())  # SwiGLU: the bundled store holds Q4_1 llama-style models
    return (h @ down)[None]


class FlashFFN(nn.Module):
    """`Block.ffn` for the flash engine: each token of [T, D] goes through `FlashEngine.step` in turn."""

    def __init__(self, engine: FlashEngine, layer: int):
        super().__init__()
        self.engine, self.layer = engine, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return torch.cat([self.engine.step(self.layer, x[t : t + 1]) for t in range(x.shape[0])])


def load_cost_model(store_path: Path) -> CostModel:
    """The store's probe, else this machine's cached probe, else the built-in default."""
    for path in (store_path / PROBE_FILE, default_probe_path()):
        if path.is_file():
            return CostModel.from_probe(ProbeResult.load(path))
    return CostModel.default()
