"""What personalization trains, how it attaches to the frozen base, and the adapter file that carries it.

A **term** is one trained piece, attached to the runtime's decoder (`edgewise.lm.model.Llama`) without touching the
base's quantized weights:
- `norm`: a delta added to an RMSNorm's gain (`blk.i.attn_norm`, `blk.i.ffn_norm`, `output_norm`);
- `bias`: a delta added to a projection's bias, where the architecture has one (Qwen2's Q, K and V);
- `lora`: a low-rank adapter on a projection, y += (x A^T) B^T (A [r, in], B [out, r], B starting at zero);
- `rows`: a dense fp32 delta on chosen output rows of a projection, y[:, rows] += x D^T (D [k, in], starting at
  zero): those rows of W become trainable as W[rows] + D, over the quantized base.

Every term starts at zero effect, so an untrained adapter is the base. Rows and the projections' outputs are in the
runtime's order (Q and K rows un-permuted for RoPE); `merge` maps them back to the GGUF's.

The **adapter file** is safetensors: the terms' tensors (`param/...`; rows terms' indices are in the plan), Adam's moments
(`exp_avg/...`, `exp_avg_sq/...`), and one JSON header in the metadata (`edgewise.adapter`): the base model (name,
bytes, sha256), the plan, the training settings and the training state (step, tokens, recent losses). It is the
training checkpoint as well: written through a temp file and a rename, so a kill at any moment leaves the previous
complete file. Nothing in it is pickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgewise.errors import EdgewiseError
from edgewise.files import atomic_path
from edgewise.models import model_sha256

FORMAT, VERSION = "edgewise-adapter", 1
HEADER_KEY = "edgewise.adapter"
KINDS = ("norm", "bias", "lora", "rows")
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
BIASED = ("attn_q", "attn_k", "attn_v")  # the projections an architecture with `qkv_bias` has biases on
LORA_SCALE = 2.0  # alpha / r with alpha = 2r, LoRA's common choice


@dataclass(frozen=True)
class Term:
    """One trained piece (see the module): `size` is the rank of a lora, the row count of rows, 0 otherwise."""

    kind: str
    target: str  # "blk.3.attn_q", "blk.3.ffn_norm", "output_norm"
    size: int = 0
    params: int = 0  # trained parameters
    gain: float = 0.0  # the contribution analysis' estimate (squared gradient norm in the term's span)
    nbytes: int = 0  # its trained state's bytes (`plan.term_bytes`)

    @property
    def name(self) -> str:
        return f"{self.target}.{self.kind}" + (str(self.size) if self.kind in ("lora", "rows") else "")

    @property
    def layer(self) -> int | None:
        """The block the term sits in; None for `output_norm` (above every block)."""
        return int(self.target.split(".")[1]) if self.target.startswith("blk.") else None


def projection_slot(model, layer: int, proj: str) -> tuple[nn.Module, str, int, int]:
    """Where projection `proj` of block `layer` lives in the runtime: (owner module, attribute, first output, last + 1);
    Q, K and V share one fused matrix, gate and up another."""
    cfg, block = model.cfg, model.blocks[layer]
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    slots = {
        "attn_q": (block.attn, "wqkv", 0, q),
        "attn_k": (block.attn, "wqkv", q, q + kv),
        "attn_v": (block.attn, "wqkv", q + kv, q + 2 * kv),
        "attn_output": (block.attn, "wo", 0, None),
        "ffn_gate": (block.ffn, "gate_up", 0, None),  # the first half of gate|up
        "ffn_up": (block.ffn, "gate_up", None, None),  # the second
        "ffn_down": (block.ffn, "down", 0, None),
    }
    owner, attr, lo, hi = slots[proj]
    width = getattr(owner, attr).out_features
    if attr == "gate_up":
        lo, hi = (0, width // 2) if proj == "ffn_gate" else (width // 2, width)
    return owner, attr, lo, width if hi is None else hi


def norm_slot(model, target: str) -> tuple[nn.Module, str]:
    if target == "output_norm":
        return model, "norm"
    _, i, name = target.split(".")
    return model.blocks[int(i)], name


class TunedNorm(nn.Module):
    """An RMSNorm whose gain is the base's plus a trained delta."""

    def __init__(self, base: nn.Module, delta: nn.Parameter):
        super().__init__()
        self.base, self.delta, self.eps = base, delta, base.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (self.base.weight + self.delta)


class Adapted(nn.Module):
    """A linear layer of the base plus the terms on slices of its output (a fused Q|K|V or gate|up carries several)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.out_features, self.in_features = base.out_features, base.in_features
        self.loras = nn.ModuleDict()
        self.slices: dict[str, tuple[int, int]] = {}
        self.deltas = nn.ParameterDict()  # bias and rows deltas
        self.row_ids: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.slices:
            return y
        y, xf = y.float(), x.float()
        for key, (lo, hi) in self.slices.items():
            slot = _slot(key)
            if slot in self.loras:
                lora = self.loras[slot]
                d = (xf @ lora.A.T) @ lora.B.T * LORA_SCALE
                y = y + F.pad(d, (lo, y.shape[-1] - hi))
            elif key in self.row_ids:
                y = y.index_add(-1, self.row_ids[key] + lo, xf @ self.deltas[slot].T)
            else:  # a bias delta
                y = y + F.pad(self.deltas[slot], (lo, y.shape[-1] - hi))
        return y


def _slot(name: str) -> str:
    """A term's name as a submodule key (torch refuses dots there)."""
    return name.replace(".", "/")


class LoRA(nn.Module):
    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.A, self.B = nn.Parameter(A), nn.Parameter(B)


def _adapted(owner: nn.Module, attr: str) -> Adapted:
    module = getattr(owner, attr)
    if not isinstance(module, Adapted):
        module = Adapted(module)
        setattr(owner, attr, module)
    return module


def term_shapes(term: Term, model) -> list[tuple[int, ...]]:
    """The shapes of `term`'s trained tensors on `model` (a LoRA's A [r, in] and B [out, r])."""
    if term.kind == "norm":
        return [(model.cfg.dim,)]
    owner, attr, lo, hi = projection_slot(model, term.layer, term.target.rsplit(".", 1)[1])
    n_in = getattr(owner, attr).in_features
    return {"bias": [(hi - lo,)], "lora": [(term.size, n_in), (hi - lo, term.size)], "rows": [(term.size, n_in)]}[term.kind]


def term_params(term: Term, model) -> int:
    """Trained parameters of `term` on `model`."""
    return sum(math.prod(shape) for shape in term_shapes(term, model))


def attach(model, terms: list[Term], rows: dict[str, list[int]] | None = None, tensors: dict[str, torch.Tensor] | None = None,
           seed: int = 0) -> dict[str, nn.Parameter]:
    """Attach `terms` to `model` in place: `rows` gives each rows term its row indices; with `tensors` (an adapter's
    `param/...`) their trained values, else fresh ones (zero effect; LoRA's A drawn from `seed`). Returns
    name -> parameter, in order."""
    rows = rows or {}
    gen = torch.Generator().manual_seed(seed)
    params: dict[str, nn.Parameter] = {}

    def value(key: str, fresh: torch.Tensor) -> torch.Tensor:
        if tensors is None:
            return fresh
        got = tensors.get(f"param/{key}")
        if got is None or got.shape != fresh.shape:
            raise EdgewiseError(f"adapter tensor param/{key}: expected shape {tuple(fresh.shape)}, found {None if got is None else tuple(got.shape)}")
        return got.float().clone()

    for term in terms:
        key = term.name
        if term.kind == "norm":
            owner, attr = norm_slot(model, term.target)
            base = getattr(owner, attr)
            p = nn.Parameter(value(key, torch.zeros(model.cfg.dim)))
            setattr(owner, attr, TunedNorm(base, p))
            params[key] = p
            continue
        proj = term.target.rsplit(".", 1)[1]
        owner, attr, lo, hi = projection_slot(model, term.layer, proj)
        adapted = _adapted(owner, attr)
        adapted.slices[key] = (lo, hi)
        if term.kind == "bias":
            adapted.deltas[_slot(key)] = params[key] = nn.Parameter(value(key, torch.zeros(hi - lo)))
        elif term.kind == "lora":
            a = torch.empty(term.size, adapted.in_features).uniform_(-1, 1, generator=gen) / math.sqrt(adapted.in_features)
            lora = LoRA(value(f"{key}.A", a), value(f"{key}.B", torch.zeros(hi - lo, term.size)))
            adapted.loras[_slot(key)] = lora
            params[f"{key}.A"], params[f"{key}.B"] = lora.A, lora.B
        elif term.kind == "rows":
            if key not in rows:
                raise EdgewiseError(f"rows term {key}: the plan lists no row indices for it")
            ids = torch.tensor(rows[key], dtype=torch.long)
            if ids.numel() != term.size or int(ids.min()) < 0 or int(ids.max()) >= hi - lo:
                raise EdgewiseError(f"rows term {key}: {term.size} row indices below {hi - lo} expected")
            adapted.row_ids[key] = ids
            adapted.deltas[_slot(key)] = params[key] = nn.Parameter(value(key, torch.zeros(term.size, adapted.in_features)))
        else:
            raise EdgewiseError(f"unknown adapter term kind '{term.kind}' (known: {', '.join(KINDS)})")
    return params


# -- the file ------------------------------------------------------------------------------------------
@dataclass
class AdapterHeader:
    base: dict  # {"name", "bytes", "sha256"}
    plan: dict  # Plan.to_json()
    training: dict  # settings: lr, steps, seq_len, batch, seed, text_sha256, text_tokens
    state: dict = field(default_factory=dict)  # step, tokens, seconds, losses (recent), complete

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, **asdict(self)}, sort_keys=True)


def save_adapter(path: Path, header: AdapterHeader, tensors: dict[str, torch.Tensor]) -> None:
    """Write the adapter through a temp file and a rename (never half-written)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata={HEADER_KEY: header.to_json()})


def load_adapter(path: str | Path) -> tuple[AdapterHeader, dict[str, torch.Tensor]]:
    """Read an adapter file; a damaged or foreign file is refused, naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EdgewiseError(f"{path}: no such adapter file (make one with `edgewise tune --text MY_TEXT --out {path.name}`)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors' own errors: a truncated or foreign file
        raise EdgewiseError(f"{path}: not a readable adapter file ({type(exc).__name__}: {exc}); it may be damaged: tune again") from None
    try:
        raw = json.loads(meta[HEADER_KEY])
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}")
        if raw.get("version") != VERSION:
            raise ValueError(f"version {raw.get('version')} (this edgewise reads {VERSION})")
        header = AdapterHeader(raw["base"], raw["plan"], raw["training"], raw.get("state", {}))
    except (KeyError, ValueError, TypeError) as exc:
        raise EdgewiseError(f"{path}: a safetensors file but not an edgewise adapter (header field {exc}); make one with `edgewise tune`") from None
    return header, tensors


def check_base(header: AdapterHeader, adapter: Path, base_path: Path, base_sha256: str) -> None:
    """Refuse an adapter trained on another base model, naming both."""
    if header.base.get("sha256") != base_sha256:
        raise EdgewiseError(
            f"{adapter} was trained on {header.base.get('name')} (sha256 {str(header.base.get('sha256'))[:12]}...), not on"
            f" {base_path.name} (sha256 {base_sha256[:12]}...): pass --model {header.base.get('name')}, or tune an adapter for this model"
        )


def detach(model) -> None:
    """Take every term off `model` in place: the base's own modules back."""
    if isinstance(model.norm, TunedNorm):
        model.norm = model.norm.base
    for block in model.blocks:
        for owner, attr in ((block, "attn_norm"), (block, "ffn_norm"), (block.attn, "wqkv"), (block.attn, "wo"), (block.ffn, "gate_up"), (block.ffn, "down")):
            module = getattr(owner, attr)
            if isinstance(module, (TunedNorm, Adapted)):
                setattr(owner, attr, module.base)


def apply_adapter(model, adapter: str | Path, base_path: Path) -> AdapterHeader:
    """Attach the trained terms of the adapter file to `model` (built from the GGUF at `base_path`), in place, after
    checking it was trained on that very file (sha256)."""
    header, tensors = load_adapter(adapter)
    check_base(header, Path(adapter), base_path, model_sha256(base_path))
    from edgewise.personalize.plan import Plan

    plan = Plan.from_json(header.plan)
    with torch.no_grad():
        params = attach(model, plan.terms, rows=plan.rows, tensors=tensors)
    for p in params.values():
        p.requires_grad_(False)
    return header
