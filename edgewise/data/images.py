"""Image datasets for transfer learning: Fashion-MNIST (Debian `dataset-fashion-mnist`), or any
pair of IDX files (the MNIST format: gzip or raw).

    images, labels = load_fashion_mnist("train")   # uint8 [60000, 28, 28], int64 [60000]
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from edgewise.errors import EdgewiseError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "sudo apt-get install --no-install-recommends dataset-fashion-mnist (scripts/setup.sh does, as root)"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IDX_IMAGES, IDX_LABELS = 2051, 2049  # magic numbers: unsigned bytes, 3 and 1 dimensions


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzip or raw) as a uint8 array, its header checked against its length."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise EdgewiseError(f"{path}: cannot read ({exc})") from exc
    if len(raw) < 8 or raw[:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] not in (1, 3):
        raise EdgewiseError(f"{path}: not an IDX file of unsigned bytes (header {raw[:4].hex()})")
    n_dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims))
    body = raw[4 + 4 * n_dims :]
    if len(body) != int(np.prod(shape)):
        raise EdgewiseError(f"{path}: header says {shape} = {int(np.prod(shape))} bytes, file has {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def load_idx_pair(images_path: str | Path, labels_path: str | Path, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise EdgewiseError(f"{images_path}, {labels_path}: expected images [N, H, W] and labels [N], got {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise EdgewiseError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if n_classes is not None and labels.max(initial=0) >= n_classes:
        raise EdgewiseError(f"{labels_path}: label {int(labels.max())} is outside the {n_classes} classes")
    return images, labels.astype(np.int64)


def load_fashion_mnist(split: str = "train", root: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("train", "test"):
        raise EdgewiseError(f"Fashion-MNIST split must be 'train' or 'test', got '{split}'")
    prefix = "train" if split == "train" else "t10k"
    root = Path(root)
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise EdgewiseError(f"Fashion-MNIST not found at {root}: install it with `{FASHION_MNIST_INSTALL}`")
    return load_idx_pair(images, labels, n_classes=len(FASHION_MNIST_CLASSES))
