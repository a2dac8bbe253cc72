#!/usr/bin/env bash
# The CMake arguments every llama.cpp build of this project uses (llama-cpp-python in `scripts/setup.sh --bench`,
# the tools of `scripts/build-llama-tools.sh`): one definition. Printed on stdout.
# On a CPU with Intel AMX, -march=native compiles llama.cpp's AMX matrix kernels, and on the machine this project is
# developed on they crash (SIGSEGV in ggml_backend_amx_mul_mat, on the first eval of any model, llama-cpp-python
# 0.3.36). Explicit -mno-amx-* flags win over -march=native in GCC and Clang, so the build keeps every other native
# instruction (AVX-512, VNNI) and llama.cpp runs its AVX-512 kernels instead.
set -euo pipefail
args="-DGGML_NATIVE=ON"
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  args="$args -DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'"
fi
echo "$args"
