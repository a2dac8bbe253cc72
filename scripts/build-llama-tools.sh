#!/usr/bin/env bash
# The compression benchmark's peer: llama.cpp's own quantizer, importance-matrix and perplexity tools
# (llama-quantize, llama-imatrix, llama-perplexity), built from the llama.cpp that llama-cpp-python's source
# distribution vendors (no other download). About 9 minutes on 2 cores; a benchmark extra, not a CI dependency.
#   scripts/build-llama-tools.sh            -> build/llama-tools/bin/llama-{quantize,imatrix,perplexity}
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml | cut -d= -f3)}  # the bench extra's pin
root=build/llama-tools
bin=$root/bin
tools=(llama-quantize llama-imatrix llama-perplexity)
if [ -x "$bin/llama-perplexity" ] && [ -x "$bin/llama-quantize" ] && [ -x "$bin/llama-imatrix" ]; then
  echo "[llama-tools] ready: $bin"; exit 0
fi
command -v cmake >/dev/null || { echo "[llama-tools] needs cmake (apt-get install cmake, or pip install cmake)" >&2; exit 1; }
mkdir -p "$root/src"
if [ ! -d "$root/src/llama_cpp_python-$VERSION" ]; then
  echo "[llama-tools] fetching the llama-cpp-python $VERSION source distribution"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check scikit-build-core  # to prepare the sdist's metadata
  .venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: -d "$root/src" "llama-cpp-python==$VERSION"
  tar -xzf "$root/src/llama_cpp_python-$VERSION.tar.gz" -C "$root/src"
fi
src="$root/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
echo "[llama-tools] building ${tools[*]} (about 9 minutes on 2 cores)"
eval "native=($(scripts/llama-cpp-cmake-args.sh))"  # -march=native, AMX kernels off where they crash (see that script)
cmake -S "$src" -B "$root/cmake" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF "${native[@]}" >"$root/cmake.log" 2>&1 \
  || { tail -20 "$root/cmake.log" >&2; exit 1; }
cmake --build "$root/cmake" -j"$(nproc)" --target "${tools[@]}" >>"$root/cmake.log" 2>&1 || { tail -30 "$root/cmake.log" >&2; exit 1; }
mkdir -p "$bin.tmp"
for t in "${tools[@]}"; do cp "$root/cmake/bin/$t" "$bin.tmp/"; done
cp -P "$root"/cmake/bin/*.so* "$bin.tmp/" 2>/dev/null || true  # shared ggml/llama libraries, where the build made them
rm -rf "$bin" && mv "$bin.tmp" "$bin"
echo "[llama-tools] ready: $bin"
