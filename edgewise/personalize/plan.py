"""What to train under a memory budget: a memory model of the training step, a contribution analysis on the user's
text, and a search (the language-model twin of `edgewise tiny compile --search`).

**The memory of a training step** above the inference footprint (`state_bytes` + `plan_fixed_bytes`):
- the trained state (`state_bytes`): each trained tensor's fp32 value and Adam's moments (`optim.py`: the second
  moment of a matrix factored into its row and column means, so about 8 bytes per parameter of a LoRA or a row
  slice, 12 of a norm gain or a bias), and while the largest term is updated, its gradient and a temporary its
  size: with one window a step, Adam steps inside the backward and drops each gradient as soon as it is applied.
  With several windows a step, every gradient is held until the step: 4 bytes more per parameter;
- activations. Gradients flow only down to the lowest trained block (the *cut*): the blocks below it run without
  autograd and keep nothing. Above it, either every block keeps what its backward needs (*kept*), or only each
  block's input is kept and the block is recomputed during the backward (*recomputed*: one block's activations
  at a time);
- the chunked cross-entropy's logits and the dequantized rows of the backward (`frozen.py`'s chunk sizes), and the
  step's K/V: one layer's, shared by the blocks below the cut, and those of the blocks above it that are alive at
  once (one recomputed, or every kept one);
- the inputs that the LoRA and rows terms save for their backward (`adapted_input_bytes`), in each block that
  has them (kept) or one at a time (recomputed);
- what the model does not count, measured: a fixed part and a part per block that takes gradients.
`benchmarks/personalize_memory.py` runs hand-made plans across cuts, window lengths, kept and recomputed
activations and trained-state sizes, each through tune's own path in a fresh process (the contribution analysis
included: it leaves a few MB resident), and prints this model's bytes against the measured peak RSS above the
inference footprint. The bytes per trained parameter hold; the activation formula counts slightly more than torch
keeps; the fixed constant is set so that the model stays above every measurement (see its results file).

**The contribution analysis** runs the user's text through the whole model once per window with gradients reaching
every block, and measures, for every candidate term, the squared norm of the loss gradient projected onto what the
term can change: for a norm gain or a bias, its gradient's squared norm; for k rows of a projection, the summed
squared norms of the k rows of dL/dW with the most; for a rank-r LoRA, the sum of dL/dW's r largest squared singular
values (the best rank-r direction). That is the first-order loss decrease of one normalized step in the term's span,
one yardstick for every kind; summed over the analysis windows (an empirical Fisher).

**The search**: for every cut (block 0 ... no block: the final norm only), the step's fixed bytes at that cut leave
a room; each projection offers a ladder of options (LoRA ranks, row counts), each norm and bias one; the options
are filled by gain per byte (a multiple-choice knapsack, greedy over each ladder's upper concave hull, which is
exact when a whole step fits). The cut with the most total gain wins; then activations are kept instead of
recomputed if the plan still fits that way (faster).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from edgewise.errors import EdgewiseError
from edgewise.lm.config import ModelConfig
from edgewise.personalize.adapter import BIASED, PROJECTIONS, Term, attach, detach, projection_slot, term_params, term_shapes
from edgewise.personalize.frozen import LOGIT_CHUNK_BYTES, ROW_CHUNK_BYTES
from edgewise.personalize.optim import moment_floats

GRAD_BYTES = 4  # a trained parameter's fp32 gradient
LORA_RANKS = (1, 2, 4, 8, 16, 32)
ROW_COUNTS = (4, 16, 64, 256, 1024)
MAX_RANK = max(LORA_RANKS)


def term_bytes(term: Term, model, batch: int) -> int:
    """`term`'s trained state on `model`: each tensor's fp32 value and Adam's moments, and its gradient when `batch`
    windows' gradients are held for the step."""
    return sum(4 * (math.prod(shape) + moment_floats(shape)) + (GRAD_BYTES * math.prod(shape) if batch > 1 else 0)
               for shape in term_shapes(term, model))


def with_bytes(term: Term, model, batch: int) -> Term:
    """`term` with its parameter count and state bytes on `model` filled in."""
    return replace(term, params=term_params(term, model), nbytes=term_bytes(term, model, batch))


def state_bytes(terms: list[Term], batch: int) -> int:
    """The trained state of `terms` (`with_bytes`; see the module)."""
    # while a tensor is updated: its gradient (at one window a step, the only one alive) and one temporary its size
    held = (2 if batch == 1 else 1) * GRAD_BYTES * max((t.params for t in terms), default=0)
    return sum(t.nbytes for t in terms) + held


def block_activation_bytes(cfg: ModelConfig, T: int) -> int:
    """What one block keeps for its backward on T tokens (fp32): what its norms, RoPE and gated activation save (the
    frozen matrices save nothing), and the attention's scores and probabilities [heads, T, T]. Measured on SmolLM2
    at 128 tokens: about 5.0 MB a block (the kept rows of benchmarks/results/personalize-memory.md), 5.2 MB here."""
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    per_token = 2 * cfg.dim + qkv + 3 * cfg.ffn_dim
    return 4 * (T * per_token + 3 * cfg.n_heads * T * T)


# Measured on SmolLM2 (benchmarks/personalize_memory.py), not modelled: resident memory that training adds beyond the
# terms above (torch's backward code paged in, autograd's graph, what the contribution analysis leaves, allocator
# slack): a fixed part, and a part per block the backward passes through. Set so that every measured step stays at
# least 2 MB below the model (run-to-run noise in those measurements: about 3 MB).
BASE_BYTES = 9 << 20
AUTOGRAD_BLOCK_BYTES = 1 << 18


def fixed_bytes(cfg: ModelConfig, T: int, cut: int, recompute: bool) -> int:
    """A training step's bytes at `cut` besides the trained state (see the module)."""
    above = cfg.n_layers - cut
    act = block_activation_bytes(cfg, T)
    if above == 0:
        blocks = 0
    elif recompute:
        blocks = above * T * cfg.dim * 4 + act  # block inputs, one block recomputed at a time
    else:
        blocks = above * act
    ce = 3 * LOGIT_CHUNK_BYTES + 3 * T * cfg.dim * 4
    kv_layer = 2 * cfg.n_kv_heads * cfg.head_dim * T * 2  # one layer's K/V for the window (bf16: the quantized runtime's)
    kv = kv_layer * (1 + (min(above, 1) if recompute else above))  # the blocks below the cut share one; each above writes its own
    return blocks + ce + kv + 2 * ROW_CHUNK_BYTES + BASE_BYTES + above * AUTOGRAD_BLOCK_BYTES


def adapted_input_bytes(cfg: ModelConfig, T: int) -> int:
    """What a block's LoRA and rows terms save for their backward on T tokens: each adapted projection's fp32 input
    (the attention's and the FFN's normed inputs, the attention output, the gated hidden state). The frozen matrices
    save nothing; these do. Measured: a 256 MB plan of LoRA on every projection with kept activations peaked 44 MB
    above the model that left this out (benchmarks/results/personalize-memory.md now has such a row)."""
    return 4 * T * (2 * cfg.dim + cfg.n_heads * cfg.head_dim + cfg.ffn_dim)


def plan_fixed_bytes(cfg: ModelConfig, T: int, cut: int, recompute: bool, terms: list[Term]) -> int:
    """A plan's bytes besides its trained state: `fixed_bytes`, and the inputs its matrix terms save, in every block
    that has them when activations are kept, in one block at a time when they are recomputed."""
    blocks = len({t.layer for t in terms if t.kind in ("lora", "rows")})
    return fixed_bytes(cfg, T, cut, recompute) + adapted_input_bytes(cfg, T) * (min(blocks, 1) if recompute else blocks)


def analysis_bytes(cfg: ModelConfig, T: int, cut: int = 0) -> int:
    """The contribution analysis' bytes down to block `cut`: those blocks recomputed, each frozen layer's input saved
    for the observer (one block at a time), and one projection's products with a and b (`top_energies`): never a
    whole dL/dW [out, in] (55 MB for one FFN matrix of Qwen2.5-1.5B, more than a 64 MB budget leaves)."""
    widest, width = max(2 * cfg.ffn_dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim), max(cfg.dim, cfg.ffn_dim)
    observer = 4 * (T * T + 2 * T * widest + 3 * MAX_RANK * width)
    return fixed_bytes(cfg, T, cut, recompute=True) + adapted_input_bytes(cfg, T) + observer


# -- the contribution analysis -----------------------------------------------------------------------
def row_energies(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The squared norms of the rows of g = a^T b (a [T, out], b [T, in]: a layer's output gradient and input, g its
    weight's gradient), without forming g: |g_i|^2 = a_i^T (b b^T) a_i, through the [T, T] Gram matrix."""
    return ((b @ b.T) @ a).mul_(a).sum(0)


def top_energies(a: torch.Tensor, b: torch.Tensor, r: int, iters: int = 4) -> torch.Tensor:
    """Estimates of the r largest squared singular values of g = a^T b (see `row_energies`), largest first, by
    orthogonal iteration on g^T g with Gram-Schmidt: matrix products only, and g never formed (g^T g q is
    b^T (a (a^T (b q))), each product [T or out or in, r]). (LAPACK's SVD would page 16 MB of the math library's code
    into the process, as much as a small training budget.) Each partial sum is a lower bound of the true one (Ky
    Fan), tight after a few iterations when the spectrum falls off."""
    k = min(r, a.shape[1], b.shape[1])
    q = torch.randn(b.shape[1], k, generator=torch.Generator().manual_seed(0))
    for _ in range(iters):
        q = _orthonormal(b.T @ (a @ (a.T @ (b @ q))))
    out = torch.zeros(r)
    out[:k] = (a.T @ (b @ q)).pow(2).sum(0).sort(descending=True).values
    return out


def _orthonormal(a: torch.Tensor) -> torch.Tensor:
    """a's columns orthonormalized in order (classical Gram-Schmidt, applied twice for stability)."""
    q = torch.empty_like(a)
    for j in range(a.shape[1]):
        v = a[:, j]
        for _ in range(2):
            v = v - q[:, :j] @ (q[:, :j].T @ v)
        q[:, j] = v / v.norm().clamp_min(1e-30)
    return q
@dataclass
class Contributions:
    """Per candidate, the squared gradient norm in its span, summed over windows (see the module)."""

    norms: dict[str, float]  # target -> gain
    biases: dict[str, float]  # "blk.i.attn_q" -> gain
    rows: dict[str, torch.Tensor]  # "blk.i.attn_q" -> per-row gains [out]
    spectra: dict[str, torch.Tensor]  # "blk.i.attn_q" -> squared singular values, largest first [MAX_RANK]
    windows: int = 0


def _norm_targets(cfg: ModelConfig) -> list[str]:
    return [f"blk.{i}.{n}" for i in range(cfg.n_layers) for n in ("attn_norm", "ffn_norm")] + ["output_norm"]


def analyse(model, frozen: list, windows: list[list[int]], loss_of: Callable, progress: Callable[[int, int], None] | None = None,
            cut: int = 0) -> Contributions:
    """The contribution analysis on `windows` (token lists): `model` is frozen (`frozen.freeze`), `loss_of(model,
    window, cut, recompute)` the training step's loss; blocks `cut` and above take gradients, recomputed (a budget
    too small to train lower blocks need not measure them)."""
    cfg = model.cfg
    probe_terms = [Term("norm", t) for t in _norm_targets(cfg) if not t.startswith("blk.") or int(t.split(".")[1]) >= cut]
    if cfg.traits.qkv_bias:
        probe_terms += [Term("bias", f"blk.{i}.{p}") for i in range(cut, cfg.n_layers) for p in BIASED]
    params = attach(model, probe_terms)
    c = Contributions({t.target: 0.0 for t in probe_terms if t.kind == "norm"}, {t.target: 0.0 for t in probe_terms if t.kind == "bias"}, {}, {})

    def observer(layer: int, slots: list[tuple[str, int, int]]):
        def see(x: torch.Tensor, grad_out: torch.Tensor) -> None:
            xf = x.float().reshape(-1, x.shape[-1])
            g_all = grad_out.float().reshape(-1, grad_out.shape[-1])
            for proj, lo, hi in slots:
                a = g_all[:, lo:hi]  # dL/dW of this projection [out, in] is a^T xf: never formed
                key = f"blk.{layer}.{proj}"
                rows = row_energies(a, xf)
                c.rows[key] = rows if key not in c.rows else c.rows[key] + rows
                s2 = top_energies(a, xf, MAX_RANK)
                c.spectra[key] = s2 if key not in c.spectra else c.spectra[key] + s2
        return see

    per_block = len(frozen) // cfg.n_layers
    for i in range(cut, cfg.n_layers):
        mods = frozen[i * per_block : (i + 1) * per_block]
        groups = {"wqkv": ("attn_q", "attn_k", "attn_v"), "wo": ("attn_output",), "gate_up": ("ffn_gate", "ffn_up"), "down": ("ffn_down",)}
        for module, (attr, projs) in zip(mods, groups.items()):
            slots = []
            for proj in projs:
                _, _, lo, hi = projection_slot(model, i, proj)
                slots.append((proj, lo, hi))
            module.observer = observer(i, slots)
    try:
        for n, window in enumerate(windows):
            loss = loss_of(model, window, cut, True)
            loss.backward()
            for term in probe_terms:
                p = params[term.name]
                gain = float(p.grad.pow(2).sum())
                (c.norms if term.kind == "norm" else c.biases)[term.target] += gain
                p.grad = None
            c.windows += 1
            if progress is not None:
                progress(n + 1, len(windows))
    finally:
        for module in frozen:
            module.observer = None
        detach(model)
    return c


# -- the search ----------------------------------------------------------------------------------------
@dataclass
class Plan:
    terms: list[Term]
    seq_len: int
    cut: int  # the lowest block that takes gradients (n_layers: only the final norm)
    recompute: bool
    budget: int  # bytes
    state_bytes: int  # trained state
    fixed_bytes: int  # activations, logits, K/V cache, workspace and the measured constants (plan_fixed_bytes())
    gain: float
    rows: dict[str, list[int]]  # rows term name -> the row indices it trains (in the projection's runtime order)
    batch: int = 1  # windows a step (state_bytes)

    @property
    def params(self) -> int:
        return sum(t.params for t in self.terms)

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.fixed_bytes

    def to_json(self) -> dict:
        d = asdict(self)
        d["terms"] = [asdict(t) for t in self.terms]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        return cls(**{**d, "terms": [Term(**t) for t in d["terms"]]})

    def table(self, cfg: ModelConfig) -> str:
        """What trains, grouped by kind and block, and the bytes of each part of the step."""
        lines = [f"| block | {' | '.join(('norms', 'biases', 'LoRA', 'rows'))} | parameters | state MB |", "|---:|---|---|---|---|---:|---:|"]
        by_layer: dict[int | None, list[Term]] = {}
        for t in self.terms:
            by_layer.setdefault(t.layer, []).append(t)
        for layer in sorted(by_layer, key=lambda v: cfg.n_layers if v is None else v):
            ts = by_layer[layer]
            cell = lambda kind: ", ".join(t.target.split(".")[-1] + (f" r{t.size}" if kind == "lora" else f" x{t.size}" if kind == "rows" else "") for t in ts if t.kind == kind) or "-"  # noqa: E731
            n = sum(t.params for t in ts)
            lines.append(f"| {'final' if layer is None else layer} | {cell('norm')} | {cell('bias')} | {cell('lora')} | {cell('rows')} | {n:,} | {sum(t.nbytes for t in ts) / 2**20:.2f} |")
        mb = lambda b: f"{b / 2**20:.1f} MB"  # noqa: E731
        lines.append(
            f"trains {self.params:,} parameters in {len(self.terms)} terms, blocks {self.cut}-{cfg.n_layers - 1} take gradients"
            f" ({'each recomputed in the backward' if self.recompute else 'activations kept'}), {self.seq_len}-token windows;"
            f" memory {mb(self.state_bytes)} trained state + {mb(self.fixed_bytes)} activations and workspace"
            f" = {mb(self.total_bytes)} of a {mb(self.budget)} budget"
        )
        return "\n".join(lines)


@dataclass(frozen=True)
class _Option:
    term: Term | None  # None: nothing on this projection
    nbytes: int
    gain: float


def _ladders(model, c: Contributions, batch: int) -> dict[str, list[_Option]]:
    """Per group (a projection, a norm, a bias), its options from none upward, as the upper concave hull of
    (bytes, gain)."""
    cfg = model.cfg
    groups: dict[str, list[_Option]] = {}
    for target, gain in list(c.norms.items()) + list(c.biases.items()):
        kind = "norm" if target in c.norms else "bias"
        t = with_bytes(Term(kind, target, 0, 0, gain), model, batch)
        groups[f"{target}.{kind}"] = [_Option(None, 0, 0.0), _Option(t, t.nbytes, gain)]
    for i in range(cfg.n_layers):
        for proj in PROJECTIONS:
            key = f"blk.{i}.{proj}"
            if key not in c.rows:
                continue
            options = [_Option(None, 0, 0.0)]
            spectrum = c.spectra[key].cumsum(0)
            for r in LORA_RANKS:
                t = with_bytes(Term("lora", key, r, 0, float(spectrum[r - 1])), model, batch)
                options.append(_Option(t, t.nbytes, t.gain))
            energies = c.rows[key].sort(descending=True).values.cumsum(0)
            for k in ROW_COUNTS:
                if k <= energies.numel() // 2:
                    t = with_bytes(Term("rows", key, k, 0, float(energies[k - 1])), model, batch)
                    options.append(_Option(t, t.nbytes, t.gain))
            groups[key] = _hull(options)
    return groups


def _hull(options: list[_Option]) -> list[_Option]:
    """The options on the upper concave hull of (bytes, gain), from the smallest: each step's gain per byte below
    the one before it."""
    pts = sorted(options, key=lambda o: (o.nbytes, -o.gain))
    hull: list[_Option] = []
    for o in pts:
        if hull and o.gain <= hull[-1].gain:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (b.gain - a.gain) * (o.nbytes - a.nbytes) <= (o.gain - a.gain) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def _fill(groups: dict[str, list[_Option]], room: int) -> tuple[list[Term], int, float]:
    """Greedy over the hulls' steps by gain per byte; a group whose next step does not fit takes no later one."""
    steps = []
    for name, hull in groups.items():
        for j in range(1, len(hull)):
            d_bytes, d_gain = hull[j].nbytes - hull[j - 1].nbytes, hull[j].gain - hull[j - 1].gain
            steps.append((d_gain / max(d_bytes, 1), name, j, d_bytes))
    steps.sort(key=lambda s: -s[0])
    at = {name: 0 for name in groups}
    blocked: set[str] = set()
    used = 0
    for _, name, j, d_bytes in steps:
        if name in blocked or at[name] != j - 1:
            continue
        if used + d_bytes > room:
            blocked.add(name)
            continue
        at[name], used = j, used + d_bytes
    terms = [groups[n][j].term for n, j in at.items() if j > 0]
    return terms, used, sum(groups[n][j].gain for n, j in at.items())


def _layer_of(group: str) -> int | None:
    return int(group.split(".")[1]) if group.startswith("blk.") else None


def search(model, c: Contributions, budget: int, seq_len: int, batch: int = 1) -> Plan:
    """The plan with the most gain whose step fits `budget` bytes, `batch` windows a step (see the module)."""
    cfg = model.cfg
    groups = _ladders(model, c, batch)
    best = None
    for cut in range(cfg.n_layers, -1, -1):
        room = budget - fixed_bytes(cfg, seq_len, cut, recompute=True)
        if room <= 0:
            continue
        eligible = {n: h for n, h in groups.items() if (_layer_of(n) is None or _layer_of(n) >= cut)}
        terms, filled, gain = _fill(eligible, room)
        used, fixed = state_bytes(terms, batch), plan_fixed_bytes(cfg, seq_len, cut, True, terms)
        if used + fixed > budget:  # the largest term's gradient, or the matrix terms' inputs, did not fit: fill again, leaving them room
            terms, _, gain = _fill(eligible, budget - fixed - (used - filled))
            used, fixed = state_bytes(terms, batch), plan_fixed_bytes(cfg, seq_len, cut, True, terms)
        if terms and used + fixed <= budget and (best is None or gain > best[0]):
            best = (gain, cut, terms, used, fixed)
    if best is None:
        smallest = min_budget(cfg, seq_len, batch)
        raise EdgewiseError(f"a budget of {budget / 2**20:.1f} MB cannot hold the smallest training step at {seq_len}-token windows;"
                            f" the smallest feasible budget is {smallest / 2**20:.1f} MB (or shorten --seq-len)")
    gain, cut, terms, used, fixed = best
    kept = plan_fixed_bytes(cfg, seq_len, cut, False, terms)
    recompute = used + kept > budget
    rows = {}
    for t in terms:
        if t.kind == "rows":
            rows[t.name] = c.rows[t.target].sort(descending=True).indices[: t.size].sort().values.tolist()
    return Plan(terms, seq_len, cut, recompute, budget, used, fixed if recompute else kept, gain, rows, batch)


def min_budget(cfg: ModelConfig, seq_len: int, batch: int = 1) -> int:
    """The smallest budget that holds a plan: the final norm alone, above every block."""
    return fixed_bytes(cfg, seq_len, cfg.n_layers, recompute=True) + 4 * cfg.dim * (1 + 2) + 2 * GRAD_BYTES * cfg.dim  # value, moments; gradient, temporary
