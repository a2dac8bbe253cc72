"""Adam, its update rule in a few lines: torch.optim's step imports torch._dynamo on first use (77 MB resident),
more than a keyboard's whole training budget. Checked against torch.optim.AdamW (tests/test_personalize.py).

For each trained tensor p with gradient g, at step t (from 1), with b1 = 0.9, b2 = 0.999, eps = 1e-8:
    m = b1 m + (1 - b1) g,    v = b2 v + (1 - b2) g^2
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
No weight decay: every trained term starts at zero effect, and decay would pull it back there.

**The step inside the backward** (`in_backward=True`, as LOMO does; torch's tutorial "How to save memory by fusing the
optimizer step into the backward pass" shows the hook): each tensor is updated the moment its gradient is complete
(`register_post_accumulate_grad_hook`), and its gradient dropped at once, so a step never holds every gradient: 12
bytes per trained parameter instead of 16. The update is Adam's, exactly (a test compares): with one window a step,
each gradient is final when it is accumulated, and a tensor changes only after the backward node that saved it has
run (autograd's version counters would refuse otherwise). With several windows a step, gradients are summed over
the windows first, and the step runs after them (`step`).

    opt = Adam(params, lr, in_backward=True)
    opt.begin_step(); loss.backward()            # updated during the backward
    opt = Adam(params, lr)
    opt.begin_step(); loss.backward(); opt.step()  # updated after it
"""

from __future__ import annotations


import torch
from torch import nn


class Adam:
    def __init__(self, params: dict[str, nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 in_backward: bool = False):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.step_count = 0
        self.in_backward = in_backward
        self.exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}
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
        m, v = self.exp_avg[name], self.exp_avg_sq[name]
        m.mul_(b1).add_(p.grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)
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
        return {**{f"exp_avg/{n}": t for n, t in self.exp_avg.items()}, **{f"exp_avg_sq/{n}": t for n, t in self.exp_avg_sq.items()}}

    def load(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        """Moments from an adapter's `exp_avg/...` and `exp_avg_sq/...`, at `step`."""
        for n in self.params:
            if f"exp_avg/{n}" in tensors:
                self.exp_avg[n].copy_(tensors[f"exp_avg/{n}"])
                self.exp_avg_sq[n].copy_(tensors[f"exp_avg_sq/{n}"])
        self.step_count = step
