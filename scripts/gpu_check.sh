#!/usr/bin/env bash
# The one prepared GPU check, for a lent H100/H200 machine with no network: build the extension, run the GPU tests,
# run the GPU benches, and write what they print under $OUT (default gpu_out/). Phases, in order, each well under
# the device tool's 10-minute limit per command:
#   bash scripts/gpu_check.sh build tests     (~1.5 min build for sm_90 only, tests <= 5 min)
#   bash scripts/gpu_check.sh benches         (<= 6 min; the editable build of the first call is reused while warm)
#   bash scripts/gpu_check.sh all             (the three, when one command has time)
#
# The device image has torch, triton, pytest, pytest-benchmark, scikit-image, transformers; it lacks open_clip.
# Before the run, here (Python 3.12 there):
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
#       open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13
# and call the device tool with carry [".whl"]. The GPU-only benches' code is rehearsed on the CPU in CI
# (tests/test_bench_rehearsal.py); tests/test_backends_e2e.py and tests/test_kernels_triton.py run on the CPU too.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(all)
[ "${phases[*]}" = all ] && phases=(build tests benches)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
t0=$(date +%s)
status=0
for phase in "${phases[@]}"; do
  case $phase in
    build)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
      TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
        python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee "$OUT/build.txt"
      echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.txt"
      python3 -m intcoop info | tee "$OUT/info.txt" || status=1
      ;;
    tests)
      # every GPU-relevant test file; the sm_90 compile test is for GPU-less machines (the kernels run here)
      timeout 300 python3 -m pytest -q -rs --durations=15 -p no:cacheprovider -k "not compile_for_sm90" \
        tests/test_compiled_ops.py tests/test_kernels_triton.py tests/test_backends_e2e.py tests/test_ops.py \
        2>&1 | tee "$OUT/tests.txt" || status=1
      ;;
    benches)
      timeout 420 python3 -m pytest -q --durations=15 -p no:cacheprovider benches/bench_kernels.py \
        benches/bench_encoder.py benches/bench_train.py --benchmark-json "$OUT/benches.json" 2>&1 \
        | tee "$OUT/benches.txt" || status=1
      cp benches/last_run.md "$OUT/" 2>/dev/null || true
      ;;
    *) echo "unknown phase $phase (build, tests, benches, all)"; exit 2 ;;
  esac
  echo "after $phase: $(( $(date +%s) - t0 )) s"
done
exit $status
