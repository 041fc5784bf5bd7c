#!/usr/bin/env bash
# The one prepared GPU check, for a lent H100/H200 machine with no network: build the extension, run the GPU tests,
# run the GPU benches, writing everything under $OUT (default gpu_out/) as it goes. One device call, one command:
#   bash scripts/gpu_check.sh            (= build tests benches; about 9 minutes at most, by the phase limits)
# Device time is 15 minutes a session, a machine takes 1-2 minutes to start and stays warm only 30 s after a call,
# so plan one call with timeout_s ~580. Phases can be named (`bash scripts/gpu_check.sh benches`): a phase that
# needs the build makes it first when intcoop.kernels or intcoop._C is missing (a fresh machine).
# Limits (s): build 150, tests 170, benches 240 (the most wanted benches first; each row is also appended to
# $OUT/rows.jsonl at once, so a run cut by its limit keeps what it measured).
#
# The device image has torch, triton, pytest, pytest-benchmark, scikit-image, transformers; it lacks open_clip.
# Before the run, here (Python 3.12 there):
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
#       open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13
# and call the device tool with carry [".whl"]. The GPU benches' code is rehearsed on the CPU in CI
# (tests/test_bench_rehearsal.py); tests/test_backends_e2e.py and tests/test_kernels_triton.py run on the CPU too.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 INTCOOP_BENCH_ROWS="$OUT/rows.jsonl"
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(all)
[ "${phases[*]}" = all ] && phases=(build tests benches)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
t0=$(date +%s)
status=0
xdist=()
python3 -c "import xdist" 2>/dev/null && xdist=(-n 4)       # parallel cold Triton compiles in the tests

build() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 timeout 150 \
    python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.txt" 2>&1
  local rc=$?
  echo "build: rc $rc, $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.txt"
  python3 -m intcoop info | tee "$OUT/info.txt"
  [ $rc -eq 0 ] || { tail -40 "$OUT/build.txt"; echo "the build failed: stopping"; exit 1; }
}

built() { python3 -c "import intcoop.kernels, intcoop._C" 2>/dev/null; }

for phase in "${phases[@]}"; do
  case $phase in
    build) build ;;
    tests)
      built || build
      # the GPU-relevant files; not the sm_90 compile check nor the CPU emulation of the CUDA kernels (for
      # GPU-less machines: the real kernels run here)
      timeout 170 python3 -m pytest -q -rs --durations=15 -p no:cacheprovider "${xdist[@]}" \
        -k "not compile_for_sm90 and not emulated" tests/test_compiled_ops.py tests/test_kernels_triton.py \
        tests/test_backends_e2e.py tests/test_ops.py 2>&1 | tee "$OUT/tests.txt" || status=1
      ;;
    benches)
      built || build
      timeout 240 python3 -m pytest -q --durations=15 -p no:cacheprovider \
        benches/bench_encoder.py::test_fast_logits_gpu_bf16 benches/bench_kernels.py benches/bench_train.py \
        benches/bench_encoder.py::test_fast_logits benches/bench_encoder.py::test_encode_prompts --benchmark-json "$OUT/benches.json" 2>&1 | tee "$OUT/benches.txt" || status=1
      cp benches/last_run.md "$OUT/" 2>/dev/null || true
      ;;
    *) echo "unknown phase $phase (build, tests, benches, all)"; exit 2 ;;
  esac
  echo "after $phase: $(( $(date +%s) - t0 )) s"
done
exit $status
