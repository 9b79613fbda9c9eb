#!/usr/bin/env bash
# Compile-check csrc/cuda/*.cu with nvcc against the installed torch's headers, no GPU needed:
# the defines and flags torch.utils.cpp_extension.BuildExtension passes for
# hessian_service._C (COMMON_NVCC_FLAGS, -fPIC, -std=c++20, TORCH_EXTENSION_NAME=_C, WITH_CUDA,
# -O3 from setup.py), for sm_80 and sm_90 (+PTX), with every warning of our own code an error
# (torch's and Python's headers as system headers, so theirs are not). Objects go to a
# temporary directory and are discarded.
#
#   csrc/cuda/check_compile.sh [PYTHON]      (default: .venv/bin/python, else python3)
#
# A CPU-only torch ships no c10/cuda/impl/cuda_cmake_macros.h (a CUDA torch does), hence
# -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE, which only skips that include.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
TORCH_INC=$("$PY" -c 'import torch.utils.cpp_extension as c; print(c.include_paths()[0])')
PY_INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
CUDA_INC=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")/include
OUT_DIR=$(mktemp -d)
trap 'rm -rf "$OUT_DIR"' EXIT
status=0
for src in csrc/cuda/*.cu; do
  echo "== $src"
  if ! nvcc -c "$src" -o "$OUT_DIR/$(basename "$src").o" -DWITH_CUDA \
    -isystem "$TORCH_INC" -isystem "$TORCH_INC/torch/csrc/api/include" -isystem "$PY_INC" \
    -I"$CUDA_INC" -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
    --compiler-options "'-fPIC'" -O3 -DTORCH_API_INCLUDE_EXTENSION_H \
    -DTORCH_EXTENSION_NAME=_C -std=c++20 \
    -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
    -gencode=arch=compute_90,code=compute_90 \
    -Xcompiler -Wall -Xcompiler -Wextra -Werror all-warnings -Xptxas -v >"$OUT_DIR/log" 2>&1
  then
    status=1
  fi
  # diagnostics, plus each kernel's registers, spills and shared memory
  grep -v "Compile time\|Function properties\|bytes gmem" "$OUT_DIR/log" || true
done
echo "$([ "$status" -eq 0 ] && echo PASS || echo FAIL): nvcc $(nvcc --version | tail -1)"
exit "$status"
