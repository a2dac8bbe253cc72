"""The tiny-training models: torchvision's ImageNet MobileNetV2 weights load into ours and classify
real photos (scikit-image's samples), in PyTorch and through the IR with BatchNorm folded."""

from __future__ import annotations

import pytest
import torch

from edgewise.errors import EdgewiseError
from edgewise.tiny import executor
from edgewise.tiny.frontend import LOGITS, from_module
from edgewise.tiny.models import imagenet_mobilenet_v2, imagenet_preprocess, mobilenet_v2

skimage_data = pytest.importorskip("skimage.data")

# ImageNet classes: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso, 968 cup, 504 coffee mug
PHOTOS = {"chelsea": {281, 282, 285}, "coffee": {967, 968, 504}}


@pytest.fixture(scope="module")
def imagenet_model():
    return imagenet_mobilenet_v2()


def test_mobilenet_v2_matches_torchvision_size():
    assert sum(p.numel() for p in mobilenet_v2(1.0).parameters()) == 3_504_872  # torchvision's MobileNetV2


@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_imagenet_weights_classify_real_photos(imagenet_model, photo):
    x = imagenet_preprocess(torch.from_numpy(getattr(skimage_data, photo)().copy()))
    with torch.no_grad():
        logits = imagenet_model(x)
    assert int(logits.argmax()) in PHOTOS[photo]
    # the IR (BN folded into convs, fp32 executor) computes the same logits
    graph, params = from_module(imagenet_model, tuple(x.shape))
    env = executor.run(graph, params, {"image": x, "label": torch.zeros(1, dtype=torch.long)})
    torch.testing.assert_close(env[LOGITS], logits, rtol=1e-4, atol=1e-3)


def test_bad_weights_file_is_named(tmp_path):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EdgewiseError, match="weights.pth: not a loadable state_dict"):
        imagenet_mobilenet_v2(bad)
    torch.save({"features.0.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(EdgewiseError, match="not a MobileNetV2-1.0 state_dict"):
        imagenet_mobilenet_v2(tmp_path / "other.pth")
