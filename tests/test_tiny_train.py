"""Fashion-MNIST (IDX files) and transfer learning with the compiled training step."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from edgewise import cli
from edgewise.data.images import FASHION_MNIST_DIR, load_fashion_mnist, load_idx_pair, read_idx
from edgewise.errors import EdgewiseError


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def test_idx_round_trip_and_bad_files(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "img.gz", images)
    write_idx(tmp_path / "lab", np.array([1, 9]), compress=False)
    got, labels = load_idx_pair(tmp_path / "img.gz", tmp_path / "lab")
    np.testing.assert_array_equal(got, images)
    assert labels.tolist() == [1, 9] and labels.dtype == np.int64
    (tmp_path / "short").write_bytes((tmp_path / "lab").read_bytes()[:-1])
    with pytest.raises(EdgewiseError, match="short: header says"):
        read_idx(tmp_path / "short")
    (tmp_path / "text").write_text("hello world")
    with pytest.raises(EdgewiseError, match="text: not an IDX file"):
        read_idx(tmp_path / "text")
    write_idx(tmp_path / "three", np.array([1, 2, 3]))
    with pytest.raises(EdgewiseError, match="has 2 images but .*three has 3 labels"):
        load_idx_pair(tmp_path / "img.gz", tmp_path / "three")
    with pytest.raises(EdgewiseError, match="label 9 is outside the 5 classes"):
        load_idx_pair(tmp_path / "img.gz", tmp_path / "lab", n_classes=5)


needs_fashion_mnist = pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="Debian dataset-fashion-mnist not installed")


@needs_fashion_mnist
def test_fashion_mnist_loads():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert sorted(np.unique(labels).tolist()) == list(range(10))
    with pytest.raises(EdgewiseError, match="split must be"):
        load_fashion_mnist("validation")


def run_tiny_train(argv, capsys) -> dict[str, float]:
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("epoch 1: loss ") for line in out)
    last = out[-1]
    fields = dict(zip(last.split()[0::3], last.split()[2::3]))  # "val_acc = X peak_kb = Y"
    return {k: float(v) for k, v in fields.items()}


@needs_fashion_mnist
@pytest.mark.parametrize("precision, samples, lr, floor", [("fp32", 300, 0.003, 0.4), ("int8", 150, 0.003, 0.3)])
def test_tiny_train_transfers_imagenet_features_to_fashion_mnist(tmp_path, capsys, precision, samples, lr, floor):
    scheme = tmp_path / "scheme.json"
    scheme.write_text(json.dumps({"bias_depth": 4, "weights": {"features.17.conv.0.0": 0.25}}))
    argv = ["tiny", "train", "--scheme", str(scheme), "--resolution", "32", "--train-samples", str(samples), "--val-samples", "300", "--lr", str(lr), "--precision", precision]
    fields = run_tiny_train(argv, capsys)
    assert fields["val_acc"] > floor  # 10 classes: chance is 0.1
    assert fields["peak_kb"] > 0
