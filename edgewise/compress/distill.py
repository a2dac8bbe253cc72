"""Distillation: a pruned (or low-bit) student trained to match its teacher's next-token distribution on
calibration text, on this CPU.

The loss is KL(teacher || student) per token, over windows of `ctx` calibration tokens. The teacher is the
source, dequantized to fp32, without gradients, and never whole in memory (`TeacherAnswers`: 6 GB in fp32 for a
1.5B model, beside a student that trains in fp32 with AdamW): its final hidden states for the windows are computed
once, a block at a time (`LayerWalk`), and each step's next-token distribution comes from them through its output
head (the student's own where the two heads are the same tensor). The student is the runtime's own decoder (`Llama`, fp32) built
from the student GGUF, with every block matrix replaced by a trainable copy of its GGUF tensor (`TrainableRows`:
the same rows, in the runtime's order); norms, the embedding and the output head stay as they are. AdamW, a
linear warm-up over the first 10% of steps and a linear decay to zero.

Training survives being stopped: every `every` steps the trained tensors, AdamW's moments and the step are
written to the checkpoint (safetensors, through a temp file and a rename), and a rerun with the same checkpoint
resumes from it. The result is the student GGUF with its trained matrices in F32: `compress` then quantizes it
into the target type, calibrated on the student itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT
from torch import nn

from edgewise.compress.gguf_write import tensor_bytes, write_gguf
from edgewise.errors import EdgewiseError
from edgewise.files import atomic_path
from edgewise.gguf_io import GGUFFile

DISTILL_CTX = 256  # tokens a step trains on (one window): the longest `compress` uses
DISTILL_LR = 1e-4  # AdamW's peak learning rate: suits SmolLM2-135M; on Qwen2.5-Coder-1.5B it raised the KL, 1e-5 lowered it
TRAINED = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class TrainableRows(nn.Module):
    """A linear layer whose weight is GGUF tensors' rows stacked, each permuted into the runtime's row order (Q and
    K of a llama model), every tensor an `nn.Parameter` in the GGUF's own layout."""

    def __init__(self, weights: list[nn.Parameter], orders: list[np.ndarray | None]):
        super().__init__()
        self.weights = nn.ParameterList(weights)
        self.orders = [None if o is None else torch.from_numpy(np.asarray(o)) for o in orders]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.cat([p if o is None else p.index_select(0, o) for p, o in zip(self.weights, self.orders)])
        return F.linear(x.float(), w)


def trainable_student(student: GGUFFile) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """The student as the runtime's fp32 decoder with its block matrices trainable; (model, GGUF name -> parameter)."""
    from edgewise.compress.pipeline import source_weight
    from edgewise.lm.model import Llama
    from edgewise.lm.weights import rope_row_order

    model = Llama.from_gguf(student, "fp32")
    cfg = model.cfg
    q_order = rope_row_order(cfg.n_heads, cfg.head_dim) if cfg.traits.rope_permuted else None
    k_order = rope_row_order(cfg.n_kv_heads, cfg.head_dim) if cfg.traits.rope_permuted else None
    params: dict[str, nn.Parameter] = {}

    def rows(i: int, names: list[str], orders: list[np.ndarray | None]) -> TrainableRows:
        ps = []
        for name in names:
            key = f"blk.{i}.{name}.weight"
            params[key] = nn.Parameter(torch.from_numpy(source_weight(student.tensor(key))))
            ps.append(params[key])
        return TrainableRows(ps, orders)

    for p in model.parameters():
        p.requires_grad_(False)
    for i, block in enumerate(model.blocks):
        block.attn.wqkv = rows(i, ["attn_q", "attn_k", "attn_v"], [q_order, k_order, None])
        block.attn.wo = rows(i, ["attn_output"], [None])
        block.ffn.gate_up = rows(i, ["ffn_gate", "ffn_up"], [None, None])
        block.ffn.down = rows(i, ["ffn_down"], [None])
    return model, params


class TeacherAnswers:
    """The teacher's next-token log-probabilities for windows [W, T] of token ids, computed as `Llama`'s fp32
    forward computes them, with one block of the teacher in memory at a time: its final hidden states ([W, T, D]
    fp32) once, by `LayerWalk`; then, per window asked, the output head over them. `head`: the student's fp32 output
    layer, used when the teacher's head and final norm are the same tensors as the student's (pruning leaves them);
    else the teacher's own head is dequantized (4 bytes a weight, held)."""

    def __init__(self, teacher: GGUFFile, windows: torch.Tensor, student: GGUFFile | None = None, head: nn.Module | None = None,
                 progress: Callable[[int, int], None] | None = None):
        from edgewise.lm.layerwise import LayerWalk
        from edgewise.lm.model import load_norm
        from edgewise.lm.weights import DenseLinear, dequantize

        walk = LayerWalk(teacher, "fp32")
        cfg = walk.cfg
        with torch.no_grad():
            h = walk.embed(windows)
            for i in range(walk.n_layers):
                h = walk.run_block(walk.block(i), h)
                if progress is not None:
                    progress(i + 1, walk.n_layers)
        self.hidden = h
        self.norm = load_norm(teacher, cfg, "output_norm.weight")
        names = ("output_norm.weight", "token_embd.weight" if cfg.tied_embeddings else "output.weight")
        if head is None or student is None or not all(_same_tensor(teacher, student, n) for n in names):
            head = DenseLinear(dequantize(teacher.tensor(names[1])))
        self.head = head

    @torch.no_grad()
    def log_probs(self, window: int) -> torch.Tensor:
        """[T, vocab] fp32: the teacher's log-probabilities at every position of window `window`."""
        return torch.log_softmax(self.head(self.norm(self.hidden[window])).float(), dim=-1)


def _same_tensor(a: GGUFFile, b: GGUFFile, name: str) -> bool:
    ta, tb = a.tensors.get(name), b.tensors.get(name)
    return ta is not None and tb is not None and ta.qtype == tb.qtype and ta.shape == tb.shape and np.array_equal(ta.raw, tb.raw)


def _log_probs(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    from edgewise.lm.model import causal_mask

    n = tokens.shape[0]
    cache = model.new_cache(n)
    return torch.log_softmax(model(tokens, torch.arange(n), causal_mask(0, n), cache.keys, cache.values), dim=-1)


@dataclass(frozen=True)
class DistillResult:
    out: Path
    steps: int  # trained in all (resumed runs included)
    resumed_at: int  # 0: a fresh start
    first_kl: float  # mean KL of the first window this run trained on, before its step
    last_kl: float  # mean KL over the last 10% of this run's steps


def _save(checkpoint: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, step: int, identity: dict) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, p in params.items():
        tensors[f"param/{name}"] = p.detach().contiguous()
        state = opt.state.get(p)
        if state:
            tensors[f"exp_avg/{name}"], tensors[f"exp_avg_sq/{name}"] = state["exp_avg"].contiguous(), state["exp_avg_sq"].contiguous()
    with atomic_path(checkpoint) as tmp:
        save_file(tensors, str(tmp), metadata={"step": str(step), "identity": json.dumps(identity, sort_keys=True)})


def _resume(checkpoint: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, identity: dict) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(checkpoint), "pt") as f:
            meta = f.metadata() or {}
            if json.loads(meta.get("identity", "{}")) != identity:
                raise EdgewiseError(f"{checkpoint}: a checkpoint of another distillation (student, teacher or settings differ); delete it to start over")
            step = int(meta["step"])
            for name, p in params.items():
                p.data.copy_(f.get_tensor(f"param/{name}"))
                if f"exp_avg/{name}" in f.keys():
                    opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": f.get_tensor(f"exp_avg/{name}"), "exp_avg_sq": f.get_tensor(f"exp_avg_sq/{name}")}
    except EdgewiseError:
        raise
    except Exception as exc:  # a damaged file: safetensors' header or a missing key
        raise EdgewiseError(f"{checkpoint}: unreadable distillation checkpoint ({type(exc).__name__}: {exc}); delete it to start over") from None
    return step


def distill(
    teacher: GGUFFile,
    student: GGUFFile,
    out: str | Path,
    ids: list[int],
    steps: int,
    ctx: int = 256,
    lr: float = DISTILL_LR,
    checkpoint: str | Path | None = None,
    every: int = 20,
    progress: Callable[[int, int, float], None] | None = None,
    teacher_progress: Callable[[int, int], None] | None = None,
) -> DistillResult:
    """Train `student` to match `teacher` on windows of `ctx` tokens of `ids` for `steps` steps (one window each),
    then write it to `out` with its trained matrices in F32 (see the module). `progress(step, steps, kl)`;
    `teacher_progress(layer, layers)` while the teacher's answers are computed (`TeacherAnswers`)."""

    if steps < 1:
        raise EdgewiseError(f"distillation steps must be at least 1, got {steps}")
    n_windows = len(ids) // ctx
    if n_windows < 1:
        raise EdgewiseError(f"distillation needs at least one window of {ctx} calibration tokens; the text has {len(ids)}")
    if teacher.metadata.get("tokenizer.ggml.tokens") != student.metadata.get("tokenizer.ggml.tokens"):
        raise EdgewiseError(f"{student.path}: its vocabulary differs from the teacher's ({teacher.path}); distillation compares their next-token distributions")
    windows = torch.tensor(ids[: n_windows * ctx]).reshape(n_windows, ctx)[: min(n_windows, steps)]  # step s trains on window s % n_windows
    model, params = trainable_student(student)
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)

    def schedule(s: int) -> float:  # the learning rate at step s, a share of `lr`
        return min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    identity = {"student": [student.path.name, student.path.stat().st_size], "teacher": [teacher.path.name, teacher.path.stat().st_size],
                "steps": steps, "ctx": ctx, "lr": lr, "tokens": len(ids)}
    start = 0
    if checkpoint is not None and Path(checkpoint).exists():
        start = _resume(Path(checkpoint), params, opt, identity)
        sched.last_epoch = start  # the schedule where it stood
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * schedule(start)
    teacher_answers = TeacherAnswers(teacher, windows, student, model.output, teacher_progress) if start < steps else None
    kls = []
    for step in range(start, steps):
        tokens = windows[step % n_windows]
        target = teacher_answers.log_probs(step % n_windows)
        logp = _log_probs(model, tokens)
        loss = (target.exp() * (target - logp)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        kls.append(float(loss.detach()))
        if checkpoint is not None and ((step + 1) % every == 0 or step + 1 == steps):
            _save(Path(checkpoint), params, opt, step + 1, identity)
        if progress is not None:
            progress(step + 1, steps, kls[-1])
    tensors = {n: (t.qtype, tensor_bytes(t.raw, t.shape)) for n, t in student.tensors.items()}
    for name, p in params.items():
        w = p.detach().numpy().astype(np.float32)
        tensors[name] = (QT.F32, tensor_bytes(w, w.shape))
    write_gguf(student, out, tensors)
    tail = kls[-max(1, len(kls) // 10) :] if kls else [float("nan")]
    return DistillResult(Path(out), steps, start, kls[0] if kls else float("nan"), float(np.mean(tail)))
