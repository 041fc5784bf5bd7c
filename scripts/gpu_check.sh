#!/usr/bin/env bash
# The one prepared GPU check (for a lent H100/H200 machine with no network): build the extension, run the GPU
# tests and the GPU benches in a few minutes, and write the figures under $OUT (default gpu_out/).
#
# The device image has torch, triton, transformers, scikit-image; it lacks open_clip. Before the run, here:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
#       open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13
# and call the device tool with carry [".whl"] and command `bash scripts/gpu_check.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5 | tee "$OUT/build.txt"
echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.txt"
python3 -m intcoop info | tee "$OUT/info.txt"
timeout 240 python3 -m pytest -q -x tests/test_compiled_ops.py tests/test_kernels_triton.py tests/test_ops.py \
    tests/test_text.py tests/test_model.py 2>&1 | tee "$OUT/tests.txt"
timeout 240 python3 -m pytest -q benches/bench_kernels.py "benches/bench_encoder.py::test_fast_logits" \
    2>&1 | tee "$OUT/benches.txt"
cp benches/last_run.md "$OUT/" 2>/dev/null || true
echo "total: $(( $(date +%s) - t0 )) s"
