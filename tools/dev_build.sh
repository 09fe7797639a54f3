#!/usr/bin/env bash
# Builds rlkern._C into python/rlkern/ for work in a checkout (PYTHONPATH=python).
# RLKERN_CUDA=OFF skips nvcc for a faster loop; SANITIZE=1 builds with ASan and UBSan.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=build/dev${SANITIZE:+-asan}
cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-Release} \
  -DRLKERN_CUDA="${RLKERN_CUDA:-AUTO}" -DRLKERN_SANITIZE="${SANITIZE:+ON}" \
  -Dpybind11_DIR="$(python3 -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DPython_EXECUTABLE="$(command -v python3)" >/dev/null
cmake --build "$dir" -j"${JOBS:-2}"
so=$(ls "$dir"/_C*.so)
if [ -n "${SANITIZE:-}" ]; then
  echo "built $so (instrumented; not copied into python/rlkern/)"
else
  cp "$so" python/rlkern/
  # The build's record (CUDA runtime, minimum driver, ISA) that `rlkern info` reports.
  cp "$dir/_build_config.py" python/rlkern/
  echo "built $(basename "$so") into python/rlkern/"
fi
