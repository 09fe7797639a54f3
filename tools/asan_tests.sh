#!/usr/bin/env bash
# Builds the C++ core with ASan and UBSan (CPU only) and runs the test modules that drive
# the C++ core (kernels, MCTS, their property-based and crash-safety tests) against it;
# modules that exercise Python around the core (bench, examples, integrations, compile)
# add time, not coverage of C++ memory. Arguments replace the module list. The sanitizer runtimes are preloaded because python itself is not
# instrumented; leak detection is off because the interpreter never frees everything.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# ASAN_PREBUILT=1: build/dev-asan was built already (CI builds it in the background with
# its own tool environment, whose cmake settings a rebuild here would undo).
if [ -z "${ASAN_PREBUILT:-}" ]; then
  SANITIZE=1 RLKERN_CUDA=OFF BUILD_TYPE=RelWithDebInfo tools/dev_build.sh >/dev/null
fi
cp -r python/rlkern "$work/rlkern"
rm -f "$work"/rlkern/_C*.so
cp build/dev-asan/_C*.so "$work/rlkern/"
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
if [ "$#" -gt 0 ]; then
  modules=("$@")
else
  modules=()
  for f in "$root"/tests/test_{returns,losses,losses_equivalence,objectives,kl,logprobs,mcts,foundation,whiten}.py \
           "$root"/tests/test_property_*.py "$root"/tests/test_crash_safety_*.py; do
    [ -e "$f" ] && modules+=("$f")
  done
fi
cd "$work"
LD_PRELOAD="$asan:$ubsan" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 RLKERN_ASAN=1 PYTHONPATH="$work" \
  python -m pytest -q -p no:cacheprovider -m "not slow and not gpu" -k "not triton and not aot and not Triton" \
  "${modules[@]}" --rootdir="$root"
