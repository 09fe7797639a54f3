#!/usr/bin/env bash
# One command that validates and benchmarks rlkern's GPU path on a lent GPU machine
# (H100/H200, no network), in under 8 minutes; on a machine without a GPU it runs the
# CPU-side parts (a dry run) and says that the GPU parts were skipped.
#
#   tools/gpu_check.sh [OUTDIR] [--dry-run] [--no-build] [--lean] [--bench-only] [--budget SECONDS]
#   tools/gpu_check.sh --fetch-wheels     # here, with network: the optional competitors' wheels into .whl/
#
# Parts, each timed and capped so that the whole fits the budget (default 420 s on a GPU, 1800 s
# for a dry run):
#   wheels    pip-installs any *.whl found in $RLKERN_WHEELS, wheels/ or .whl/ (Liger-Kernel,
#             mctx: pure Python) into a private folder put on PYTHONPATH; none is required
#   build     pip install --no-build-isolation against the preinstalled torch, CUDA for
#             sm_90 only, all cores (CMAKE_BUILD_PARALLEL_LEVEL); --no-build reuses what is installed
#   tests     GPU: every test marked `gpu`, at the bench's sizes (pytest -x, per-test timeout);
#             dry run: the GPU test modules on CPU tensors at small sizes (RLKERN_GPU_TESTS_ON_CPU,
#             Triton under the interpreter), the Triton-backend tests and the ahead-of-time compile
#             of every Triton kernel (--lean: the GPU test modules only, for CI, whose test step
#             already runs the other two)
#   memcheck  GPU: compute-sanitizer memcheck over a short run of every kernel
#             (tools/gpu_memcheck.py); dry run: the same script on the CPU
#   bench     GPU: rlkern bench --device cuda, one process per suite, each given a fair share of
#             the time left (--time-limit: cases that do not fit are listed as skipped);
#             --bench-only skips tests and memcheck (a second call for the rest of the numbers);
#             dry run: a --quick CPU run of the returns suite (the pipeline only, not GPU numbers)
#   summary   tools/gpu_summary.py: summary.md (printed last) and bench.json
#
# Writes at most 8 files into OUTDIR (default $OUT, else ./gpu-check-out): build.log,
# pytest.log, junit.xml, memcheck.log, bench.log, bench.json, parts.tsv, summary.md.
# Exit status: 0 when everything that ran passed; 1 when the build, a test, memcheck or an
# rlkern benchmark row failed. Environment: PYTHON (default python3), GPU_CHECK_MAXFAIL
# (pytest's --maxfail, default 1 = -x), GPU_CHECK_BENCH_BUDGET (seconds of timed repeats
# per implementation, default 0.2), GPU_CHECK_SUITES (default "returns logprobs losses gpu e2e"),
# GPU_CHECK_WORKERS (pytest-xdist workers for the GPU tests, default 4; 0 = none).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}

outdir="" dry=0 build=1 lean=0 bench_only=0 budget=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --no-build) build=0 ;;
    --lean) lean=1 ;;
    --bench-only) bench_only=1 ;;
    --budget) budget=$2; shift ;;
    --fetch-wheels)
      # Run where pip reaches PyPI; carry .whl to the GPU machine (see README, "GPU check").
      grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
      exec "$PY" -m pip download --no-deps --only-binary=:all: -d .whl "liger-kernel==0.8.5" "mctx==0.0.71" ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) outdir=$1 ;;
  esac
  shift
done
outdir=${outdir:-${OUT:-$ROOT/gpu-check-out}}
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
work=$(mktemp -d /tmp/rlkern-gpu-check.XXXXXX)
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The CUDA toolkit's tools (nvcc for the build, compute-sanitizer) where an image leaves them off PATH.
for d in /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer; do
  [ -d "$d" ] && case ":$PATH:" in *":$d:"*) ;; *) PATH="$PATH:$d" ;; esac
done
export PATH
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
start=$(date +%s)
parts="$outdir/parts.tsv"
printf 'part\tstatus\tseconds\tnote\n' > "$parts"
failed=0

now() { date +%s; }
left() { echo $((deadline - $(now))); }
# cap N: the smaller of N and the seconds left (at least 10, so a part still starts and says why it stopped).
cap() { local l; l=$(left); [ "$l" -lt "$1" ] && { [ "$l" -lt 10 ] && echo 10 || echo "$l"; } || echo "$1"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$parts"; echo "[gpu_check] $1: $2 (${3}s) $4"; }
# timed NAME LIMIT LOG CMD...: runs CMD under `timeout`, appending to LOG; sets rc and secs.
timed() {
  local name=$1 limit=$2 log=$3; shift 3
  local t0; t0=$(now)
  echo "[gpu_check] $name: start (limit ${limit}s)"
  { echo "### $name: $*"; } >> "$log"
  timeout --kill-after=15 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  secs=$(( $(now) - t0 ))
}

# ---- where we are ------------------------------------------------------------------------
gpu=0
if [ "$dry" -eq 0 ] && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  gpu=1
fi
mode=$([ "$gpu" -eq 1 ] && echo gpu || echo dry-run)
# The budget is the GPU lease's; a dry run on a small CPU machine only has to finish.
budget=${budget:-$([ "$gpu" -eq 1 ] && echo 420 || echo 1800)}
deadline=$((start + budget))
{
  echo "mode: $mode"
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cores: $(nproc)"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
} > "$outdir/build.log" 2>&1
cat "$outdir/build.log"
if [ "$gpu" -eq 0 ]; then
  echo "[gpu_check] DRY RUN: no CUDA device here (or --dry-run); the GPU parts (GPU tests, memcheck, GPU bench) are skipped"
fi

# ---- wheels --------------------------------------------------------------------------------
t0=$(now) found=""
for d in ${RLKERN_WHEELS:-} wheels .whl; do
  [ -d "$d" ] && ls "$d"/*.whl >/dev/null 2>&1 && found="$found $(ls "$d"/*.whl | tr '\n' ' ')"
done
if [ -n "$found" ]; then
  site="$work/site"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" $found >> "$outdir/build.log" 2>&1; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    record wheels ok $(( $(now) - t0 )) "$(for w in $found; do basename "$w"; done | tr '\n' ' ')"
  else
    record wheels failed $(( $(now) - t0 )) "pip could not install the carried wheels (see build.log); their competitors are skipped"
  fi
else
  record wheels none 0 "no wheels/ or .whl/: Liger-Kernel and mctx rows say they are not installed"
fi

# ---- build ---------------------------------------------------------------------------------
if [ "$build" -eq 1 ]; then
  cuda_opt=$([ "$gpu" -eq 1 ] && echo ON || echo AUTO)
  # On the GPU machine (16 cores, sm_90 only) about a minute; a 2-core dry run compiles much longer.
  timed build "$(cap "$([ "$gpu" -eq 1 ] && echo 240 || echo 1500)")" "$outdir/build.log" env RLKERN_CUDA="$cuda_opt" "$PY" -m pip install -v \
    --no-build-isolation --no-deps --no-index -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 .
  if [ "$rc" -ne 0 ]; then
    record build failed "$secs" "pip install exited $rc (see build.log)"
    failed=1
  else
    record build ok "$secs" "RLKERN_CUDA=$cuda_opt, sm_90, $CMAKE_BUILD_PARALLEL_LEVEL jobs"
  fi
else
  record build skipped 0 "--no-build: using the installed package"
fi
# The installed package, imported from outside the checkout (python/ must not shadow it).
info=$(cd /tmp && "$PY" -c "import json, rlkern; print(json.dumps(rlkern.info()))" 2>&1)
echo "rlkern.info(): $info" | tee -a "$outdir/build.log"
if [ "$gpu" -eq 1 ] && ! echo "$info" | grep -q '"runnable": \[[^]]*"cuda"[^]]*"triton"'; then
  record import failed 0 "rlkern.info() does not list cuda and triton as runnable"
  failed=1
fi

# ---- tests ---------------------------------------------------------------------------------
if [ "$bench_only" -eq 1 ]; then
  record tests skipped 0 "--bench-only"
  record memcheck skipped 0 "--bench-only"
else
timeout_opt=""
"$PY" -c "import pytest_timeout" 2>/dev/null && timeout_opt="--timeout=240"
common=(-q -rfEs -p no:cacheprovider --junitxml="$outdir/junit.xml" --maxfail="${GPU_CHECK_MAXFAIL:-1}" $timeout_opt)
if [ "$gpu" -eq 1 ]; then
  mapfile -t files < <(grep -l -E "pytest\.mark\.gpu" tests/test_*.py)
  # Several workers compile the Triton kernels' variants in parallel (the cold compile is
  # most of this part); the tests' memory (about 15 GB each at most) fits many times.
  workers=()
  if [ "${GPU_CHECK_WORKERS:-4}" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    workers=(-n "${GPU_CHECK_WORKERS:-4}")
  fi
  timed tests "$(cap 200)" "$outdir/pytest.log" env -u TRITON_INTERPRET "$PY" -m pytest "${common[@]}" \
    "${workers[@]}" -m gpu "${files[@]}"
  note="$(tail -1 "$outdir/pytest.log")"
else
  if [ "$lean" -eq 1 ]; then
    mapfile -t files < <(ls tests/test_gpu_*.py)
  else
    mapfile -t files < <( (ls tests/test_triton_aot.py tests/test_gpu_*.py tests/test_losses.py tests/test_logprobs.py \
      tests/test_kl.py tests/test_losses_equivalence.py; grep -l -E "pytest\.mark\.gpu" tests/test_*.py) 2>/dev/null \
      | sort -u)
  fi
  timed tests "$(cap 420)" "$outdir/pytest.log" env TRITON_INTERPRET=1 RLKERN_GPU_TESTS_ON_CPU=1 "$PY" -m pytest \
    "${common[@]}" -W ignore::RuntimeWarning -k "triton or gpu or cuda or aot" "${files[@]}"
  note="CPU side only: $(tail -1 "$outdir/pytest.log")"
fi
if [ "$rc" -eq 0 ]; then
  record tests ok "$secs" "$note"
elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  record tests timeout "$secs" "stopped at the part's limit: $note"; failed=1
else
  record tests failed "$secs" "pytest exited $rc: $note"; failed=1
fi

# ---- memcheck ------------------------------------------------------------------------------
if [ "$gpu" -eq 1 ]; then
  if command -v compute-sanitizer >/dev/null; then
    timed memcheck "$(cap 100)" "$outdir/memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool memcheck --leak-check no --print-limit 40 --error-exitcode 86 \
      "$PY" tools/gpu_memcheck.py
    summary_line=$(grep -E "ERROR SUMMARY" "$outdir/memcheck.log" | tail -1)
    if [ "$rc" -eq 0 ] && grep -q "memcheck run: ok" "$outdir/memcheck.log"; then
      record memcheck ok "$secs" "${summary_line:-no errors}"
    elif grep -q -i -E "device not supported|not supported on this|unable to (attach|initialize)" "$outdir/memcheck.log"; then
      record memcheck unavailable "$secs" "compute-sanitizer cannot instrument this device (gVisor runtime?): see memcheck.log"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      record memcheck timeout "$secs" "stopped at the part's limit"
    else
      record memcheck failed "$secs" "exit $rc; ${summary_line:-see memcheck.log}"; failed=1
    fi
  else
    record memcheck unavailable 0 "compute-sanitizer not on PATH"
  fi
else
  timed memcheck "$(cap 240)" "$outdir/memcheck.log" env TRITON_INTERPRET=1 "$PY" tools/gpu_memcheck.py cpu
  if [ "$rc" -eq 0 ]; then
    record memcheck skipped "$secs" "no GPU: the memcheck script ran on the CPU (interpreter) without the sanitizer"
  else
    record memcheck failed "$secs" "tools/gpu_memcheck.py cpu exited $rc"; failed=1
  fi
fi
fi  # bench_only

# ---- bench ---------------------------------------------------------------------------------
if [ "$gpu" -eq 1 ]; then
  suites=${GPU_CHECK_SUITES:-returns logprobs losses gpu e2e}
  bench_args=(--device cuda --budget "${GPU_CHECK_BENCH_BUDGET:-0.2}")
else
  suites=${GPU_CHECK_SUITES:-returns}
  bench_args=(--device cpu --quick --budget 0.05)
fi
set -- $suites
while [ $# -gt 0 ]; do
  s=$1; shift
  l=$(left)
  if [ "$l" -lt 25 ]; then
    record "bench $s" skipped 0 "no time left in the ${budget}s budget"
    continue
  fi
  # A fair share of what is left (unused time passes on); the case running when the share
  # ends finishes, so the process gets the rest of the budget plus a minute before it is killed.
  share=$(( (l - 10) / ($# + 1) ))
  limit=$(( share > 20 ? share - 10 : 10 ))
  timed "bench $s" "$((l + 60))" "$outdir/bench.log" "$PY" -m rlkern.cli bench --only "$s" "${bench_args[@]}" \
    --time-limit "$limit" --json "$work/bench-$s.json"
  skipped_n=$("$PY" -c "import json, sys; print(len(json.load(open(sys.argv[1])).get('skipped', [])))" \
    "$work/bench-$s.json" 2>/dev/null || echo "?")
  if [ "$rc" -eq 0 ]; then
    record "bench $s" ok "$secs" "$([ "$gpu" -eq 1 ] && echo cuda || echo 'cpu --quick (pipeline smoke run)'), \
time limit ${limit}s, ${skipped_n} cases skipped"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "bench $s" timeout "$secs" "killed past the budget; its rows are missing"
  else
    record "bench $s" failed "$secs" "exit $rc (an rlkern row failed, or the suite crashed: see bench.log)"; failed=1
  fi
done

# ---- summary -------------------------------------------------------------------------------
total=$(( $(now) - start ))
record total "$([ "$failed" -eq 0 ] && echo ok || echo failed)" "$total" "budget ${budget}s"
"$PY" tools/gpu_summary.py --mode "$mode" --out "$outdir" --parts "$parts" --junit "$outdir/junit.xml" \
  --bench "$work"/bench-*.json || failed=1
rm -rf "$work"
exit "$failed"
