"""Mixed precision under a size budget: a type per matrix, chosen to lose the least at a target size.

1. The ladder (`ladder`): the types a matrix may take, the K-quants where its rows are whole 256-blocks, else
   the 32-element formats, each smaller than the source's own bytes; the source itself is the top rung (its
   loss is zero: the source's fp32 dequantization is the reference).
2. Every rung quantized (`pipeline.quantize_tensor`) and its calibration loss tr(dW H dW^T) computed: the
   layer's output error, which ranks one matrix's rungs but not matrices against each other.
3. Sensitivity (`KLProbe`): the model's own answer to "what does lowering this tensor alone cost?" The mean
   KL divergence, per token of calibration text, from the reference's next-token distribution to that of
   the model with this one tensor at its lowest rung. Higher rungs are predicted from it by the ratio of
   their calibration losses (both are quadratic in the weight error: KL to second order, the loss exactly).
4. The choice (`choose`): the per-tensor losses summed (additive to second order when errors are small and
   independent), minimised under the byte budget: a multiple-choice knapsack, solved by dynamic programming.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from edgewise.errors import EdgewiseError
from edgewise.files import atomic_path, write_text_atomic
from edgewise.gguf_io import GGUFFile, GGUFTensor, tensor_nbytes

LADDER_K = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0)  # rows of whole 256-element super-blocks
LADDER_32 = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q8_0)  # rows of whole 32-element blocks
SENSITIVITY_TOKENS = 512  # calibration tokens the KL is measured on (one window of 512: SmolLM2-135M, ~1 s a tensor here)


@dataclass
class Rung:
    """One type a tensor may take: its bytes, and what taking it costs."""

    qtype: QT
    nbytes: int
    raw: np.ndarray | None = None  # the quantized bytes; None for the source's own (kept as they are)
    proxy: float = 0.0  # calibration loss tr(dW H dW^T) (0 for the source)
    kl: float = 0.0  # predicted KL (nats per token) of the model with this tensor alone at this rung

    @property
    def is_source(self) -> bool:
        return self.raw is None


def ladder(t: GGUFTensor) -> list[QT]:
    """The types below the source's bytes that matrix `t` may take (none for a vector), smallest first."""
    if len(t.shape) < 2:
        return []
    types = LADDER_K if t.shape[-1] % 256 == 0 else LADDER_32 if t.shape[-1] % 32 == 0 else ()
    fits = [q for q in types if q != t.qtype and tensor_nbytes(q, t.shape) < t.nbytes]
    return sorted(fits, key=lambda q: tensor_nbytes(q, t.shape))


def mixed_rungs(gguf: GGUFFile) -> dict[str, list[Rung]]:
    """Tensor name -> its rungs (`ladder`, then the source's own bytes), not yet quantized; a vector, or a matrix
    no type fits below its bytes, has only the source's."""
    return {t.name: [Rung(q, tensor_nbytes(q, t.shape)) for q in ladder(t)] + [Rung(t.qtype, t.nbytes)] for t in gguf.tensors.values()}


def size_range(gguf: GGUFFile) -> tuple[int, int]:
    """(smallest, largest) tensor bytes a mixed plan can reach: every matrix at its lowest rung; the source."""
    rungs = mixed_rungs(gguf).values()
    return sum(rs[0].nbytes for rs in rungs), sum(rs[-1].nbytes for rs in rungs)


def predict_kl(rungs: list[Rung], measured: float) -> None:
    """Set each rung's KL from the lowest rung's `measured` one, scaled by the ratio of calibration losses."""
    lowest = rungs[0]
    for r in rungs:
        r.kl = 0.0 if r.is_source else measured * (r.proxy / lowest.proxy if lowest.proxy > 0 else 1.0)


class RungStore:
    """The measurement kept on disk as it goes, so that an interrupted one resumes where it stopped (on
    Qwen2.5-Coder-1.5B it takes about two hours on 2 cores): `NAME.safetensors` holds a tensor's quantized rungs and
    their calibration losses once all of them are rounded; `kl.json` each measured lowest rung's KL;
    `identity.json` what was measured (the source, the rounding, the calibration text and windows). A folder
    that holds another measurement is refused, never mixed in."""

    def __init__(self, folder: str | Path, identity: dict):
        self.folder = Path(folder)
        self.folder.mkdir(exist_ok=True)
        ident = self.folder / "identity.json"
        if ident.exists():
            try:
                stored = json.loads(ident.read_text())
            except ValueError:
                stored = None
            if stored != json.loads(json.dumps(identity)):
                raise EdgewiseError(f"{self.folder}: rungs measured for another run (the source, rounding or calibration text differ); "
                                    "delete the folder to measure afresh")
        else:
            write_text_atomic(ident, json.dumps(identity, sort_keys=True))
        kl = self.folder / "kl.json"
        try:
            self.kls: dict[str, float] = json.loads(kl.read_text()) if kl.exists() else {}
        except ValueError:
            raise EdgewiseError(f"{kl}: unreadable (not JSON); delete it to measure the sensitivities again") from None

    @property
    def started(self) -> bool:
        """Whether an earlier run left any of its work here (a rerun resumes it)."""
        return bool(self.kls) or any(self.folder.glob("*.safetensors"))

    def load(self, name: str, rungs: list[Rung]) -> bool:
        """Fill `rungs` (below the source's) from the store; False when the tensor was not rounded yet."""
        from safetensors import safe_open

        path = self.folder / f"{name}.safetensors"
        if not path.exists():
            return False
        try:
            with safe_open(str(path), "np") as f:
                proxy = json.loads((f.metadata() or {})["proxy"])
                for r in rungs[:-1]:
                    r.raw, r.proxy = f.get_tensor(r.qtype.name), float(proxy[r.qtype.name])
        except Exception as exc:  # a damaged file: safetensors' header, a missing key
            raise EdgewiseError(f"{path}: unreadable stored rungs ({type(exc).__name__}: {exc}); delete it to round this tensor again") from None
        return True

    def save(self, name: str, rungs: list[Rung]) -> None:
        from safetensors.numpy import save_file

        with atomic_path(self.folder / f"{name}.safetensors") as tmp:
            save_file({r.qtype.name: r.raw for r in rungs[:-1]}, str(tmp), metadata={"proxy": json.dumps({r.qtype.name: r.proxy for r in rungs[:-1]})})

    def save_kl(self, name: str, kl: float) -> None:
        self.kls[name] = kl
        write_text_atomic(self.folder / "kl.json", json.dumps(self.kls, sort_keys=True))


RESOLUTION = 1 << 18  # budget cells of the knapsack's table: a cell is budget / RESOLUTION bytes (336 for SmolLM2)


def choose(rungs: dict[str, list[Rung]], budget: int) -> dict[str, Rung]:
    """A rung per tensor with total bytes <= `budget` and the least summed KL: a multiple-choice knapsack solved
    by dynamic programming over the budget in cells of budget / `RESOLUTION` bytes (each rung's bytes rounded up
    to whole cells, so the plan always fits), then the bytes the rounding left filled by the single upgrades
    that save the most loss."""
    fixed = {name: rs[0] for name, rs in rungs.items() if len(rs) == 1}
    free = [name for name in rungs if name not in fixed]
    room = budget - sum(r.nbytes for r in fixed.values())
    least = sum(min(r.nbytes for r in rungs[n]) for n in free)
    if room < least:
        raise EdgewiseError(f"the smallest plan takes {budget - room + least} bytes; the budget is {budget}")
    unit = max(1, -(-room // RESOLUTION))
    cells = room // unit
    best = np.zeros(cells + 1)  # least loss of the tensors so far within b cells
    choice = np.zeros((len(free), cells + 1), dtype=np.int8)
    for i, name in enumerate(free):
        new = np.full(cells + 1, np.inf)
        for j, r in enumerate(rungs[name]):
            w = -(-r.nbytes // unit)
            if w > cells:
                continue
            cand = np.full(cells + 1, np.inf)
            cand[w:] = best[: cells + 1 - w] + r.kl
            better = cand < new
            new[better], choice[i, better] = cand[better], j
        best = new
    pick, b = dict(fixed), cells
    if not np.isfinite(best[cells]):  # the smallest rungs fit in bytes but not once rounded up to cells: start from them
        pick.update({n: min(rungs[n], key=lambda r: (r.nbytes, r.kl)) for n in free})
    else:
        for i in range(len(free) - 1, -1, -1):
            r = rungs[free[i]][choice[i, b]]
            pick[free[i]] = r
            b -= -(-r.nbytes // unit)
    used = sum(r.nbytes for r in pick.values())
    while True:  # the cells' rounding left some bytes: the single upgrade that saves the most loss, while one fits
        up = max(
            ((pick[n].kl - r.kl, n, r) for n in free for r in rungs[n] if r.kl < pick[n].kl and used + r.nbytes - pick[n].nbytes <= budget),
            default=None, key=lambda c: c[0],
        )
        if up is None:
            return pick
        _, name, r = up
        used += r.nbytes - pick[name].nbytes
        pick[name] = r


class KLProbe:
    """The reference model on a few calibration windows, and the KL of its output when one tensor is replaced.

    The reference (the source's fp32 dequantization) runs once: the residual stream entering every block is kept
    ([W, T, D] fp32 each) with the output distribution. A tensor of block i is then measured by rebuilding block
    i with it and running blocks i.. from the kept stream; the token embedding (and a tied head) from the start."""

    def __init__(self, gguf: GGUFFile, windows: torch.Tensor, tick: Callable[[], object] | None = None):
        from edgewise.lm.layerwise import LayerWalk
        from edgewise.lm.model import load_norm
        from edgewise.lm.weights import dequantize

        self.gguf, self.windows, self.tick = gguf, windows, tick
        self.walk = LayerWalk(gguf, "fp32", tick=tick)
        self.cfg = self.walk.cfg
        self.head_name = "token_embd.weight" if self.cfg.tied_embeddings else "output.weight"
        self.blocks = [self.walk.block(i) for i in range(self.walk.n_layers)]
        self.norm = load_norm(gguf, self.cfg, "output_norm.weight")
        self.head = dequantize(gguf.tensor(self.head_name))  # [vocab, D] fp32
        h = self.walk.embed(windows)
        self.streams = [h]
        for block in self.blocks:
            h = self.walk.run_block(block, h)
            self.streams.append(h)
        self.ref = self._log_probs(h, self.head)

    @torch.no_grad()
    def _log_probs(self, h: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        x = self.norm(h.reshape(-1, h.shape[-1]))
        return torch.log_softmax(x @ head.T, dim=-1)  # [W * T, vocab]

    def _kl_from(self, h: torch.Tensor, first: int, head: torch.Tensor) -> float:
        for block in self.blocks[first:]:
            h = self.walk.run_block(block, h)
        logp = self._log_probs(h, head)
        return float((self.ref.exp() * (self.ref - logp)).sum(-1).mean())

    @torch.no_grad()
    def kl_skipping(self, layer: int) -> float:
        """Mean KL(reference || the model without block `layer`), nats per token (`prune`: which layers to drop)."""
        return self._kl_from(self.streams[layer], layer + 1, self.head)

    @torch.no_grad()
    def kl(self, tensor: GGUFTensor) -> float:
        """Mean KL(reference || model with `tensor` in place of the tensor of its name), nats per token."""
        from edgewise.lm.layerwise import LayerWalk
        from edgewise.lm.model import load_block
        from edgewise.lm.weights import dequantize

        name = tensor.name
        overlay = dataclasses.replace(self.gguf, tensors={**self.gguf.tensors, name: tensor})
        head = dequantize(tensor) if name == self.head_name else self.head
        if name.startswith("blk."):
            first = int(name.split(".")[1])
            h = self.walk.run_block(load_block(overlay, self.cfg, first, "fp32", self.walk.bits).eval(), self.streams[first])
            first += 1
        elif name == "token_embd.weight":
            h, first = LayerWalk(overlay, "fp32").embed(self.windows), 0
        elif name == self.head_name:
            h, first = self.streams[-1], len(self.blocks)
        else:
            raise EdgewiseError(f"{name}: no rule to measure this tensor's sensitivity (a matrix of a block, the embedding or the head)")
        return self._kl_from(h, first, head)
