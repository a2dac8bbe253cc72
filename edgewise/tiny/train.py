"""Training with the compiled step on the fp32 reference executor (transfer learning).

    step = CompiledTrainer(backbone_with_new_head, resolution=64, scheme=Scheme.load("s.json"), lr=0.05)
    for x, y in batches: step.train_step(x, y)
    accuracy = step.accuracy(val_images, val_labels)

Everything runs the compiled graph itself (forward, pruned backward, in-place updates), so what
is measured is what the planner planned.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgewise.errors import EdgewiseError
from edgewise.tiny import executor, schedule
from edgewise.tiny.frontend import IMAGE, LABEL, LOGITS, LOSS, forward_graph
from edgewise.tiny.ir import Graph
from edgewise.tiny.models import IMAGENET_MEAN, IMAGENET_STD
from edgewise.tiny.plan import training_plan
from edgewise.tiny.sparse import Scheme


def to_model_input(images: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 images [N, H, W] (grayscale) or [N, H, W, 3] -> ImageNet-normalized [N, 3, R, R]."""
    x = torch.as_tensor(np.array(images, copy=True))
    if x.dtype != torch.uint8 or x.dim() not in (3, 4) or (x.dim() == 4 and x.shape[-1] != 3):
        raise EdgewiseError(f"expected uint8 images [N, H, W] or [N, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    x = x.float() / 255
    x = x[:, None].expand(-1, 3, -1, -1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


class CompiledTrainer:
    def __init__(self, model: nn.Module, resolution: int, scheme: Scheme | None, lr: float, batch: int = 1):
        self.plan = training_plan(model, (batch, 3, resolution, resolution), scheme, lr)
        self.graph, self.params, self.trainable = self.plan.graph, self.plan.params, self.plan.trainable
        self._eval_graphs: dict[int, Graph] = {}

    def train_step(self, x: torch.Tensor, labels: torch.Tensor) -> float:
        env = executor.run(self.graph, self.params, {IMAGE: x, LABEL: labels})
        for p in self.trainable:
            self.params[p] = env[schedule.UPDATED_PREFIX + p]
        return float(env[LOSS])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) not in self._eval_graphs:
            self._eval_graphs[len(x)] = forward_graph(self.graph, len(x))
        return executor.run(self._eval_graphs[len(x)], self.params, {IMAGE: x})[LOGITS]

    def accuracy(self, x: torch.Tensor, labels: torch.Tensor, chunk: int = 256) -> float:
        correct = sum(int((self.logits(x[i : i + chunk]).argmax(-1) == labels[i : i + chunk]).sum()) for i in range(0, len(x), chunk))
        return correct / len(x)
