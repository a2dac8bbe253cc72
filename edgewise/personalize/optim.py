"""Adam, its update rule in a few lines: torch.optim's step imports torch._dynamo on first use (77 MB resident),
more than a keyboard's whole training budget. Checked against torch.optim.AdamW (tests/test_personalize.py).

For each trained tensor p with gradient g, at step t (from 1), with b1 = 0.9, b2 = 0.999, eps = 1e-8:
    m = b1 m + (1 - b1) g,    v = b2 v + (1 - b2) g^2
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
No weight decay: every trained term starts at zero effect, and decay would pull it back there.
"""

from __future__ import annotations


import torch
from torch import nn


class Adam:
    def __init__(self, params: dict[str, nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.step_count = 0
        self.exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.step_count, 1 - b2**self.step_count
        for n, p in self.params.items():
            if p.grad is None:
                continue
            m, v = self.exp_avg[n], self.exp_avg_sq[n]
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"exp_avg/{n}": t for n, t in self.exp_avg.items()}, **{f"exp_avg_sq/{n}": t for n, t in self.exp_avg_sq.items()}}

    def load(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        """Moments from an adapter's `exp_avg/...` and `exp_avg_sq/...`, at `step`."""
        for n in self.params:
            if f"exp_avg/{n}" in tensors:
                self.exp_avg[n].copy_(tensors[f"exp_avg/{n}"])
                self.exp_avg_sq[n].copy_(tensors[f"exp_avg_sq/{n}"])
        self.step_count = step


