"""Shared fixtures: the real SmolLM2-135M GGUF, loaded once per session in each precision, and
transformers' own load of the same file as the independent reference."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers loads the local GGUF; never the network


@pytest.fixture(scope="session")
def model_path():
    from edgewise.models import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def gguf(model_path):
    from edgewise.gguf_io import read_gguf

    return read_gguf(model_path)


@pytest.fixture(scope="session")
def lm_fp32(model_path):
    from edgewise.lm.runtime import LanguageModel

    return LanguageModel.load(model_path, precision="fp32", compile=False)


@pytest.fixture(scope="session")
def lm_quant(model_path):
    from edgewise.lm.runtime import LanguageModel

    return LanguageModel.load(model_path, precision="quant", compile=False)


@pytest.fixture(scope="session")
def hf_model(model_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(model_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
