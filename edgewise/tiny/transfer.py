"""Transfer learning with the compiled training step: the Python API behind `edgewise tiny train`,
the scheme search's fine-tunes and `benchmarks/tiny_accuracy.py`.

    data = load_transfer_data("fashion-mnist", None, resolution=64, train_samples=2000, val_samples=2000, seed=0)
    trainer = make_trainer(imagenet_backbone(data.n_classes), data, scheme, lr=0.01, precision="int8")
    history = fit(trainer, data, epochs=1, seed=0)        # [(epoch, mean loss, val accuracy)]

Both trainers run the compiled graph itself: `CompiledTrainer` (fp32 reference executor) and
`Int8Trainer` (int8 reference executor, QAS, a sub-LSB rule). For int8, `fit` computes the frozen
prefix of the step once per image (`Int8Trainer.prefix`), which gives identical results faster.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgewise.errors import EdgewiseError
from edgewise.tiny.int8_train import Int8Trainer
from edgewise.tiny.plan import training_plan
from edgewise.tiny.sparse import Scheme
from edgewise.tiny.train import CompiledTrainer, to_model_input

VAL_FRACTION = 0.2  # of a --data PATH held out for validation when no --val is given
CALIBRATION_IMAGES = 64  # int8: activation ranges from the first training images
DEFAULT_RULE = "stochastic"  # int8 sub-LSB rule: chosen by benchmarks/tiny_accuracy.py --rules (no extra RAM)


@dataclass
class TransferData:
    x: torch.Tensor  # model inputs [N, 3, R, R]
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    n_classes: int
    resolution: int
    description: str


def load_transfer_data(data: str, val: str | None, resolution: int, train_samples: int, val_samples: int, seed: int, log: Callable[[str], None] = print) -> TransferData:
    """Training and validation images of DATA (see `edgewise.data.images.load_image_dataset`):
    at most TRAIN_SAMPLES drawn with SEED, the first VAL_SAMPLES of the validation set (VAL, the
    test split of a built-in dataset, or a seeded hold-out of a PATH)."""
    from edgewise.data.images import (
        BUILTIN_DATASETS,
        holdout_split,
        image_folder_classes,
        load_image_dataset,
    )

    images, labels = load_image_dataset(data, "train")
    n_classes = class_count(labels, data)
    if val:
        # an image folder labels by sorted folder names: label the validation folder by the training folder's
        classes = image_folder_classes(data) if data not in BUILTIN_DATASETS and Path(data).is_dir() else None
        val_images, val_labels = load_image_dataset(val, "test", classes=classes)
        val_name = f"{val} (test split)" if val in BUILTIN_DATASETS else val
    elif data in BUILTIN_DATASETS:
        val_images, val_labels = load_image_dataset(data, "test")
        val_name = f"{data} (test split)"
    else:
        train_part, val_part = holdout_split(len(images), VAL_FRACTION, seed)
        images, labels, val_images, val_labels = images[train_part], labels[train_part], images[val_part], labels[val_part]
        val_name = f"{data} (held out)"
        log(f"validation: no --val, so the last {VAL_FRACTION:.0%} of a permutation of {data} seeded with --seed {seed} is held out ({len(val_part)} of {len(train_part) + len(val_part)} images)")
    unseen = np.setdiff1d(val_labels, labels)
    if len(unseen):
        known = np.unique(labels)
        raise EdgewiseError(
            f"{val_name}: validation label(s) {', '.join(map(str, unseen[:5].tolist()))} never occur in the training set {data} "
            f"(labels {', '.join(map(str, known[:10].tolist()))}{'...' if len(known) > 10 else ''}): "
            "give both sets the same classes, with training images of every class"
        )
    description = f"{data}, {len(images)} images {'x'.join(map(str, images.shape[1:]))}, {n_classes} classes; validation: {val_name}, {len(val_images)} images"
    chosen = np.random.default_rng(seed).permutation(len(images))[:train_samples]
    return TransferData(
        to_model_input(images[chosen], resolution), torch.from_numpy(labels[chosen]),
        to_model_input(val_images[:val_samples], resolution), torch.from_numpy(val_labels[:val_samples]),
        n_classes, resolution, description,
    )  # fmt: skip


def class_count(labels: np.ndarray, source: str | Path) -> int:
    """K, the number of classes of training labels that must be 0..K-1, each with at least one image;
    checked without allocating anything of size K (a label of 10^12 would otherwise ask for a
    classifier of petabytes)."""
    present = np.unique(labels)
    k = int(present[-1]) + 1
    if len(present) < 2:
        raise EdgewiseError(f"{source}: every training label is {int(present[0])}: need at least 2 classes (labels 0..K-1)")
    if len(present) != k:
        first_gap = int(np.flatnonzero(present != np.arange(len(present)))[0])
        raise EdgewiseError(
            f"{source}: the largest training label is {k - 1}, which would make {k} classes, but only {len(present)} labels occur"
            f" (class {first_gap} has no image): labels must be 0..K-1 with every class present;"
            " relabel with y = np.unique(y, return_inverse=True)[1]"
        )
    return k


def imagenet_backbone(n_classes: int) -> nn.Module:
    """torchvision's ImageNet MobileNetV2-1.0 with a new, zero-initialized N-way classifier."""
    from edgewise.tiny.models import imagenet_mobilenet_v2

    model = imagenet_mobilenet_v2()
    model.classifier[1] = nn.Linear(model.classifier[1].in_features, n_classes)
    nn.init.zeros_(model.classifier[1].weight)
    nn.init.zeros_(model.classifier[1].bias)
    return model


def make_trainer(model: nn.Module, data: TransferData, scheme: Scheme, lr: float, precision: str = "int8", rule: str = DEFAULT_RULE, qas: bool = True, seed: int = 0):
    """A trainer running the compiled step of `model` under `scheme`: fp32 or int8 (QAS, sub-LSB `rule`)."""
    shape = (1, 3, data.resolution, data.resolution)
    if precision == "fp32":
        return CompiledTrainer(model, data.resolution, scheme, lr)
    if precision == "int8":
        plan = training_plan(model, shape, scheme, lr=lr, precision="int8", update_rule=rule)
        return Int8Trainer(plan, data.x[:CALIBRATION_IMAGES], rule=rule, qas=qas, seed=seed)
    raise EdgewiseError(f"precision must be fp32 or int8, got '{precision}'")


def make_c_project(model: nn.Module, data: TransferData, scheme: Scheme, lr: float, out_dir: str | Path, rule: str = DEFAULT_RULE,
                   qas: bool = True, seed: int = 0, budget: int | None = None):
    """The int8 reference trainer of `model` under `scheme` and the C project generated from it
    (`codegen.generate_c`), after checking the planned step fits `budget` bytes of SRAM (nothing
    is written if it does not)."""
    from edgewise.tiny.codegen import generate_c

    reference = make_trainer(model, data, scheme, lr, "int8", rule, qas, seed)
    if budget is not None:
        reference.plan.check_fits(budget, "SRAM budget")
    return reference, generate_c(reference, out_dir)


def make_c_trainer(model: nn.Module, data: TransferData, scheme: Scheme, lr: float, out_dir: str | Path, rule: str = DEFAULT_RULE, qas: bool = True, seed: int = 0):
    """The generated C step, compiled for this host (`cbackend.CTrainer`); `fit` drives it like the others."""
    from edgewise.tiny.cbackend import CTrainer

    reference, project = make_c_project(model, data, scheme, lr, out_dir, rule, qas, seed)
    return CTrainer(project, reference.quantize_images, reference.plan)


def fit(trainer, data: TransferData, epochs: int, seed: int, progress: bool = True, on_epoch: Callable[[int, float, float], None] | None = None) -> list[tuple[int, float, float]]:
    """Batch-1 SGD over the training images, EPOCHS times in orders drawn with SEED; validation
    accuracy after each epoch. Returns [(epoch, mean training loss, val accuracy)]."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    int8 = isinstance(trainer, Int8Trainer)
    chunk = 256
    prefix = val_prefix = None
    if int8:  # the frozen layers, once per image
        images = [data.x[j : j + chunk] for j in range(0, len(data.x), chunk)] + [data.x_val[j : j + chunk] for j in range(0, len(data.x_val), chunk)]
        done = [trainer.prefix(x) for x in tqdm(images, desc="frozen layers", unit="chunk", file=sys.stderr, disable=not progress, leave=False)]
        n_train = (len(data.x) + chunk - 1) // chunk
        prefix, val_prefix = done[:n_train], done[n_train:]
    history = []
    for epoch in range(1, epochs + 1):
        losses = []
        with tqdm(rng.permutation(len(data.x)), desc=f"epoch {epoch}", unit="img", file=sys.stderr, disable=not progress) as bar:
            for i in bar:
                if int8:
                    p = prefix[i // chunk]
                    losses.append(trainer.train_step(None, data.y[i : i + 1], {k: v[i % chunk : i % chunk + 1] for k, v in p.items()}))
                else:
                    losses.append(trainer.train_step(data.x[i : i + 1], data.y[i : i + 1]))
                if len(losses) % 50 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        if int8:
            correct = sum(int((trainer.logits(None, p).argmax(-1) == data.y_val[j * chunk : (j + 1) * chunk]).sum()) for j, p in enumerate(val_prefix))
            val_acc = correct / len(data.x_val)
        else:
            val_acc = trainer.accuracy(data.x_val, data.y_val)
        history.append((epoch, float(np.mean(losses)), val_acc))
        if on_epoch:
            on_epoch(*history[-1])
    return history
