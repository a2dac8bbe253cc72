"""The generated C training step against the int8 reference executor: for several steps on real
Fashion-MNIST images through the ImageNet MobileNetV2, the C library's logits, losses and every
trained parameter (int8 weight codes, int32 bias codes, the fp32 classifier, master copies) are
identical to the reference's, byte for byte; for each sub-LSB rule and each layout stage (so the
in-place, streamed and fused-gradient kernels are all exercised). Also: the generated arena is
exactly the plan's, errors name what is missing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from edgewise.tiny.cbackend import CTrainer
from edgewise.tiny.codegen import CodegenError, generate_c
from edgewise.tiny.int8_train import Int8Trainer
from edgewise.tiny.models import proxyless_mobile
from edgewise.tiny.plan import training_plan
from edgewise.tiny.sparse import Scheme
from tests.test_tiny_train import needs_fashion_mnist

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no host C compiler")
# biases of the last 8 convs, a partial pointwise weight, a whole one, a depthwise weight, the head conv at 1/8
SCHEME = Scheme(bias_depth=8, weights={"features.16.conv.0.0": 0.25, "features.15.conv.0.0": 1, "features.16.conv.1.0": 1, "features.18.0": 0.125})
RES = 32


@pytest.fixture(scope="module")
def data():
    from edgewise.tiny.transfer import load_transfer_data

    return load_transfer_data("fashion-mnist", None, RES, 48, 8, seed=0, log=lambda s: None)


@pytest.fixture(scope="module")
def backbone():
    from edgewise.tiny.transfer import imagenet_backbone

    torch.manual_seed(0)
    model = imagenet_backbone(10)
    torch.nn.init.normal_(model.classifier[1].weight, std=0.01)  # a live classifier, so gradients reach the convs at once
    return model


def reference_params(trainer: Int8Trainer, names) -> dict[str, np.ndarray]:
    st, out = trainer.state, {}
    for name, shape in names:
        if name.startswith("master:"):
            out[name] = st.masters[name.split(":", 1)[1]].numpy()
        elif name in st.weights:
            out[name] = st.weights[name][:, : shape[1]].numpy()
        elif name in st.biases:
            out[name] = st.biases[name].numpy()
        else:
            out[name] = st.fp32[name].numpy()
    return out


def assert_same_bits(c_params: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    for name, value in c_params.items():
        assert value.shape == ref[name].shape, name
        assert value.tobytes() == ref[name].astype(value.dtype).tobytes(), f"{name} differs: max |diff| {np.abs(value.astype(np.float64) - ref[name]).max()}"


def run_both(plan, data, tmp_path, rule: str, steps: int, qas: bool = True):
    ref = Int8Trainer(plan, data.x[:32], rule=rule, qas=qas, seed=3)
    project = generate_c(ref, tmp_path / "proj")
    c = CTrainer(project, ref.quantize_images)
    initial = c.params()
    codes = ref.quantize_images(data.x[:steps])
    names = [(p.name, p.shape) for p in project.params]
    for i in range(steps):
        _, logits = c.infer(codes[i])
        ref_logits = ref.logits(data.x[i : i + 1])[0].numpy()
        assert logits.tobytes() == ref_logits.tobytes(), f"step {i}: logits differ by up to {np.abs(logits - ref_logits).max()}"
        loss_c = c.train_step_codes(codes[i], int(data.y[i]))
        loss_ref = ref.train_step(data.x[i : i + 1], data.y[i : i + 1])
        assert np.float32(loss_c).tobytes() == np.float32(loss_ref).tobytes(), f"step {i}: loss {loss_c} != {loss_ref}"
        assert_same_bits(c.params(), reference_params(ref, names))
    return project, initial, c.params()


@needs_cc
@needs_fashion_mnist
@pytest.mark.parametrize("rule, stage", [("stochastic", "streamed"), ("master16", "streamed"), ("master32", "inplace_depthwise"), ("round", "layer_by_layer")])
def test_c_step_matches_the_reference_bit_for_bit(backbone, data, tmp_path, rule, stage):
    plan = training_plan(backbone, (1, 3, RES, RES), SCHEME, lr=0.02, precision="int8", update_rule=rule, layout_stage=stage)
    project, initial, final = run_both(plan, data, tmp_path, rule, steps=4)
    assert project.arena_bytes == plan.memory.peak
    moved = {name: int((initial[name] != final[name]).sum()) for name in final}
    # the updates ran: int8 weight codes moved (not only biases and the classifier)
    assert moved["features.15.conv.0.0.weight"] > 0 and moved["features.16.conv.0.0.weight"] > 0, moved
    assert moved["classifier.1.weight"] > 0 and moved["features.18.0.bias"] > 0
    meta = json.loads((project.dir / "ew_model.json").read_text())
    assert meta["arena_bytes"] == plan.memory.peak and meta["rule"] == rule


@needs_cc
@needs_fashion_mnist
def test_c_step_on_another_net_without_qas(data, tmp_path):
    """ProxylessNAS (other kernel sizes, chains closed by residual adds) with random weights, plain SGD."""
    torch.manual_seed(1)
    model = proxyless_mobile(0.3, n_classes=10)
    plan = training_plan(model, (1, 3, RES, RES), Scheme(bias_depth=6, weights={}), lr=0.05, precision="int8")
    assert plan.layout.chains and any(len(c) > 2 for c in plan.layout.chains)
    run_both(plan, data, tmp_path, "stochastic", steps=3, qas=False)


@needs_cc
def test_codegen_names_an_op_without_a_c_kernel(tmp_path):
    torch.manual_seed(0)
    plan = training_plan(proxyless_mobile(0.3, n_classes=4), (1, 3, RES, RES), Scheme(bias_depth=2), precision="int8")
    trainer = Int8Trainer(plan, torch.randn(4, 3, RES, RES))
    node = next(n for n in plan.graph.nodes if n.op == "mean_hw")
    node.op = "max_hw"
    with pytest.raises(CodegenError, match="no C kernel for op 'max_hw'"):
        generate_c(trainer, tmp_path / "proj")
    assert not (tmp_path / "proj").exists()
