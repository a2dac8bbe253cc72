"""Adam with a factored second moment, its update rule in a few lines: torch.optim's step imports torch._dynamo on
first use (77 MB resident), more than a keyboard's whole training budget.

For each trained tensor p with gradient g, at step t (from 1), with b1 = 0.9, b2 = 0.999, eps = 1e-8:
    m = b1 m + (1 - b1) g,    v = b2 v + (1 - b2) g^2
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
No weight decay: every trained term starts at zero effect, and decay would pull it back there.

**The factored second moment** (Adafactor's, Shazeer and Stern 2018): for a matrix [R, C] (both sides above 1), v is
not stored whole but as the moving averages of g^2's row means r [R] and column means c [C], and estimated as
    v_ij = r_i c_j / mean(r)
(exact when g^2 is a rank-1 outer product; 1e-30 is added to g^2 so that an all-zero gradient gives no 0/0). The
first moment stays whole. A matrix's state is then 8 bytes per parameter instead of 12. Measured on SmolLM2 and
Austen, the same 64 MB plan trained 30 steps either way: held-out perplexity 35.77 factored, 35.79 whole. Vectors
(norm gains, biases) and rank-1 factors keep the whole v. `factored=False` is plain Adam (checked against
torch.optim.AdamW; the factored rule against a numpy reference: tests/test_personalize.py).

**The step inside the backward** (`in_backward=True`, as LOMO does; torch's tutorial "How to save memory by fusing the
optimizer step into the backward pass" shows the hook): each tensor is updated the moment its gradient is complete
(`register_post_accumulate_grad_hook`), and its gradient dropped at once, so a step never holds every gradient. The
update is the same, exactly (a test compares): with one window a step, each gradient is final when it is
accumulated, and a tensor changes only after the backward node that saved it has run (autograd's version counters
would refuse otherwise). With several windows a step, gradients are summed over the windows first, and the step
runs after them (`step`).

    opt = Adam(params, lr, in_backward=True)
    opt.begin_step(); loss.backward()            # updated during the backward
    opt = Adam(params, lr)
    opt.begin_step(); loss.backward(); opt.step()  # updated after it
"""

from __future__ import annotations


import torch
from torch import nn

from edgewise.errors import EdgewiseError

TINY = 1e-30  # added to g^2 in the factored moment


def is_factored(shape: tuple[int, ...]) -> bool:
    """Whether a tensor of this shape keeps its second moment factored (a matrix with both sides above 1)."""
    return len(shape) == 2 and min(shape) > 1


def moment_floats(shape: tuple[int, ...]) -> int:
    """The fp32 numbers Adam keeps for a tensor of this shape: the first moment whole, the second whole or factored."""
    n = 1
    for s in shape:
        n *= s
    return n + (sum(shape) if is_factored(shape) else n)


class Adam:
    def __init__(self, params: dict[str, nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 in_backward: bool = False, factored: bool = True):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.step_count = 0
        self.in_backward = in_backward
        self.exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
        self.factors = {n: (torch.zeros(p.shape[0]), torch.zeros(p.shape[1])) for n, p in params.items() if factored and is_factored(tuple(p.shape))}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items() if n not in self.factors}
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(n)) for n, p in params.items()] if in_backward else []

    def _hook(self, name: str):
        def update(p: torch.Tensor) -> None:
            self._update(name, p)
        return update

    def begin_step(self) -> None:
        """Start step t + 1: call before its backward(s)."""
        self.step_count += 1

    @torch.no_grad()
    def _update(self, name: str, p: torch.Tensor) -> None:
        if p.grad is None or self.step_count == 0:
            return
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.step_count, 1 - b2**self.step_count
        g, m = p.grad, self.exp_avg[name]
        m.mul_(b1).add_(g, alpha=1 - b1)
        if name in self.factors:
            r, c = self.factors[name]
            g2 = (g * g).add_(TINY)
            r.mul_(b2).add_(g2.mean(1), alpha=1 - b2)
            c.mul_(b2).add_(g2.mean(0), alpha=1 - b2)
            denom = torch.outer(r, c, out=g2).div_(r.mean() * c2)  # into g^2's buffer: one temporary the size of p
        else:
            v = self.exp_avg_sq[name]
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = v / c2
        p.addcdiv_(m, denom.sqrt_().add_(self.eps), value=-self.lr / c1)
        p.grad = None

    def step(self) -> None:
        """The update of every tensor with a gradient (after the backward(s); nothing to do `in_backward`)."""
        for n, p in self.params.items():
            self._update(n, p)

    def close(self) -> None:
        """Remove the backward hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"exp_avg/{n}": t for n, t in self.exp_avg.items()}, **{f"exp_avg_sq/{n}": t for n, t in self.exp_avg_sq.items()},
                **{f"exp_avg_sq_row/{n}": r for n, (r, _) in self.factors.items()}, **{f"exp_avg_sq_col/{n}": c for n, (_, c) in self.factors.items()}}

    def load(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        """Moments from an adapter's `exp_avg...` tensors, at `step`. A whole second moment where this optimizer keeps
        it factored (an adapter trained before factoring) gives its row and column means."""
        def take(key: str, like: torch.Tensor) -> torch.Tensor:
            got = tensors.get(key)
            if got is None or got.shape != like.shape:
                raise EdgewiseError(f"adapter tensor {key}: expected shape {tuple(like.shape)}, found {None if got is None else tuple(got.shape)}:"
                                    " the adapter is damaged; delete it (or pass another --out) to train afresh")
            return got

        for n, p in self.params.items():
            if f"exp_avg/{n}" not in tensors:
                continue
            self.exp_avg[n].copy_(take(f"exp_avg/{n}", p))
            if n in self.factors:
                r, c = self.factors[n]
                if f"exp_avg_sq/{n}" in tensors:
                    whole = take(f"exp_avg_sq/{n}", p)
                    r.copy_(whole.mean(1))
                    c.copy_(whole.mean(0))
                else:
                    r.copy_(take(f"exp_avg_sq_row/{n}", r))
                    c.copy_(take(f"exp_avg_sq_col/{n}", c))
            else:
                self.exp_avg_sq[n].copy_(take(f"exp_avg_sq/{n}", p))
        self.step_count = step
