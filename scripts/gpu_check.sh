#!/usr/bin/env bash
# The one prepared GPU run, for a lent H100/H200 with no network: one device call, one command,
#   bash scripts/gpu_check.sh                 (timeout_s ~590; the phase limits below sum to 545 s)
# Phases, in this order; each has its own time limit, and each outcome is one line of $OUT/summary.txt. A phase
# that fails or runs out of time does not stop the next ones; the exit status is 1 when any phase failed.
#   prepare    30  carried wheels (.whl/) into /tmp/site; intcoop installed WITHOUT its compiled part
#                  (INTCOOP_SKIP_EXT=1), so intcoop.kernels imports; nvidia-smi, versions      -> console.txt
#   target    110  scripts/target_check.py: B 256 x N 1000, bf16, QuickGELU ViT-B-16, IntCoOp, Triton
#                  (forward, vs the fp32 77-token loop, train step, NaN scans, repeatability)    -> target.txt
#   triton     80  the tests that need no intcoop._C (Triton kernels, backends end to end)
#             140  + the benches: bf16 fast_logits, Triton kernels, train step, fp32 encoder, and last the
#                  compiled bf16 fast_logits                                                     -> triton.txt
#   build      90  the CUDA extension (pip install -e .); a failure is reported (its log's tail) and the run
#                  goes on                                                                       -> build.txt
#   cuda       45  the tests that need intcoop._C, only after a good build                      -> cuda.txt
#   baselines  50  torch SDPA at 256,000 prompts, which may fault the process: last, in its own processes
#                  (forward 25, backward 25)                                                    -> baselines.txt
# Every measured row (target checks, bench records) is appended at once to $OUT/rows.jsonl, so a phase cut by
# its limit keeps what it measured. $OUT holds 8 files at most (what the device tool brings back).
# Named phases run alone (`bash scripts/gpu_check.sh target triton`); `cuda` builds first if intcoop._C is missing.
# `bash scripts/gpu_check.sh --collect` lists, without running them, the tests each phase selects (checked in CI).
#
# Rehearsal on a CPU: INTCOOP_BENCH_REHEARSE=1 runs every phase at toy sizes (Triton interpreted), installs
# nothing, and runs a few tests per phase; the build runs $GPU_CHECK_BUILD_CMD if set (tests/test_gpu_check.py
# sets a failing one), else is skipped. PYTHON names the interpreter (default python3).
#
# The device image has torch, triton, pytest, pytest-benchmark, pytest-xdist, scikit-image, transformers; it lacks
# open_clip. Before the run, here (Python 3.12 there):
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
#       open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13
# and call the device tool with carry [".whl"].
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-gpu_out}
PY=${PYTHON:-python3}
REHEARSE=${INTCOOP_BENCH_REHEARSE:-0}
export PYTHONUNBUFFERED=1
[ -d .whl ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}     # the carried wheels (prepare installs)
L_PREPARE=30 L_TARGET=110 L_TRITON_TESTS=80 L_TRITON_BENCHES=140 L_BUILD=90 L_CUDA=45 L_BASELINE=25
if [ "$REHEARSE" = 1 ]; then                # a CPU shared with other work: the same phases, 3x the time
  x=${GPU_CHECK_LIMIT_SCALE:-3}
  L_PREPARE=$((L_PREPARE * x)) L_TARGET=$((L_TARGET * x)) L_TRITON_TESTS=$((L_TRITON_TESTS * x))
  L_TRITON_BENCHES=$((L_TRITON_BENCHES * x)) L_BUILD=$((L_BUILD * x)) L_CUDA=$((L_CUDA * x))
  L_BASELINE=$((L_BASELINE * x))
fi

# ---- what each phase runs (GPU); `--collect` shows what these select ----------------------------------------
E2E=tests/test_backends_e2e.py
TRITON_TESTS=(tests/ops/test_kernels_triton.py "$E2E::test_fast_path_equals_plain_path[triton]"
  "$E2E::test_fast_path_equals_plain_path[torch]" "$E2E::test_bf16_within_tolerance[triton]"
  "$E2E::test_compiled_step_equals_eager_on_gpu[triton]" "$E2E::test_training_on_gpu_bf16_compiled")
TRITON_TESTS_K="not compile_for_sm90"       # ptxas resource check: done without a GPU (scripts/kernel_resources.py)
TRITON_BENCHES=(benches/bench_encoder.py::test_fast_logits_gpu_bf16 benches/bench_kernels.py benches/bench_train.py
  benches/bench_encoder.py::test_fast_logits benches/bench_encoder.py::test_encode_prompts
  benches/bench_encoder.py::test_fast_logits_gpu_bf16_compiled)     # last: inductor's compile may take a minute
CUDA_TESTS=(tests/ops/test_compiled_ops.py "$E2E::test_fast_path_equals_plain_path[cuda]"
  "$E2E::test_bf16_within_tolerance[cuda]" "$E2E::test_compiled_step_equals_eager_on_gpu[cuda]" tests/ops/test_ops.py)
CUDA_TESTS_K="not emulated"                 # the CPU emulation of the CUDA kernels is for GPU-less machines
BASELINES=(benches/bench_sdpa_baseline.py::test_prefix_attention_sdpa_fwd
  benches/bench_sdpa_baseline.py::test_prefix_attention_sdpa_bwd)
if [ "${1:-}" = --collect ]; then           # the GPU selections (bench modules collected as in a rehearsal)
  for sel in TRITON_TESTS TRITON_BENCHES CUDA_TESTS BASELINES; do
    declare -n arr=$sel
    k=()
    [ "$sel" = TRITON_TESTS ] && k=(-k "$TRITON_TESTS_K")
    [ "$sel" = CUDA_TESTS ] && k=(-k "$CUDA_TESTS_K")
    echo "== $sel"
    INTCOOP_BENCH_REHEARSE=1 "$PY" -m pytest --collect-only -q -p no:cacheprovider "${k[@]}" "${arr[@]}" 2>&1
    echo "== rc $?"
  done
  exit 0
fi

if [ "$REHEARSE" = 1 ]; then                # a few cases of each, at toy sizes
  TRITON_TESTS=("tests/ops/test_kernels_triton.py::test_prefix_attention[B1-one-segment-torch.float32-cpu]"
    "tests/ops/test_kernels_triton.py::test_patch_pool[R1-L1-torch.float32-cpu]")
  TRITON_BENCHES=("benches/bench_kernels.py::test_patch_pool_fwd[torch]")
  CUDA_TESTS=("tests/ops/test_compiled_ops.py::test_cpu_prefix_attention_schema")
  BASELINES=("benches/bench_sdpa_baseline.py::test_prefix_attention_sdpa_fwd[eot]"
    "benches/bench_sdpa_baseline.py::test_prefix_attention_sdpa_bwd[eot]")
fi

# ---- phase bodies run as `bash gpu_check.sh __body NAME` under a time limit ------------------------------------
if [ "${1:-}" = __body ]; then
  case $2 in
    prepare)
      rc=0
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
      if [ "$REHEARSE" != 1 ]; then
        if ls .whl/*.whl >/dev/null 2>&1; then
          "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || rc=1
        fi
        INTCOOP_SKIP_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . || rc=1
      fi
      "$PY" -c "import sys, torch, triton, open_clip, intcoop.kernels; print('python', sys.version.split()[0],
        'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__,
        'open_clip', open_clip.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available()
        else 'none')" || rc=1
      exit $rc ;;
    build)
      if [ -n "${GPU_CHECK_BUILD_CMD:-}" ]; then bash -c "$GPU_CHECK_BUILD_CMD"; exit $?; fi
      TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || exit 1
      "$PY" -c "import sys; from intcoop.ops import _ext; e = _ext.load_error() or _ext.missing_kernels('cuda')
print(e or 'intcoop._C built with its CUDA kernels'); sys.exit(1 if e else 0)" ;;
  esac
  exit $?
fi

# ---- the run ------------------------------------------------------------------------------------------------
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export INTCOOP_BENCH_ROWS="$OUT/rows.jsonl"
SELF=$ROOT/scripts/gpu_check.sh
BUILD_LOG=$(mktemp /tmp/intcoop_build.XXXXXX)   # the build's whole log (its tail goes to build.txt)
trap 'rm -f "$BUILD_LOG"' EXIT
status=0
t_run=$(date +%s)
built=""                                     # ok / failed / skipped once the build phase ran
pytest_args=(-q -rs --durations=10 -p no:cacheprovider --continue-on-collection-errors)   # a broken file: not all lost
parallel=()
if [ "$REHEARSE" != 1 ]; then
  "$PY" -c "import xdist" 2>/dev/null && parallel=(-n 4)              # parallel cold Triton compiles in tests
  "$PY" -c "import pytest_timeout" 2>/dev/null && parallel+=(--timeout 90)
fi

say() { echo "$*" | tee -a "$OUT/summary.txt"; }

limited() {   # limited SECONDS LOG CMD...: CMD under a time limit, its output appended to $OUT/LOG and shown
  local limit=$1 log=$2
  shift 2
  echo "== $(date -u +%T) $*" >>"$OUT/$log"
  timeout -k 2 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
  return "${PIPESTATUS[0]}"
}

outcome() {   # outcome RC: sets OUTCOME to ok / TIMEOUT / FAILED (rc N); a failure sets the exit status
  case $1 in
    0) OUTCOME=ok ;;
    124|137) OUTCOME=TIMEOUT; status=1 ;;
    *) OUTCOME="FAILED (rc $1)"; status=1 ;;
  esac
}

run_pytest() {  # run_pytest SECONDS LOG ARGS...: one pytest process; RESULT = "outcome (counts), N s of M s"
  local limit=$1 log=$2 t0 mark rc counts
  shift 2
  t0=$(date +%s)
  mark=$(cat "$OUT/$log" 2>/dev/null | wc -l)
  limited "$limit" "$log" "$PY" -m pytest "${pytest_args[@]}" "$@"
  rc=$?
  outcome $rc
  counts=$(tail -n +"$((mark + 1))" "$OUT/$log" \
    | grep -aE '([0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran).* in [0-9.]+s' | tail -n 1 \
    | sed -E 's/^=+ //; s/ =+$//')
  RESULT="$OUTCOME${counts:+ ($counts)}, $(( $(date +%s) - t0 )) s of $limit s"
}

phase_prepare() {
  local t0 rc shim
  t0=$(date +%s)
  limited $L_PREPARE console.txt bash "$SELF" __body prepare
  rc=$?
  if ! "$PY" -c "import intcoop.kernels" 2>/dev/null; then    # the install failed: find intcoop.kernels anyway
    shim=$(mktemp -d /tmp/intcoop_shim.XXXXXX)
    {
      echo "import importlib.abc, importlib.util, sys"
      echo "class _Kernels(importlib.abc.MetaPathFinder):  # intcoop.kernels is kernels/ (setup.py package_dir)"
      echo "    def find_spec(self, name, path=None, target=None):"
      echo "        if name == 'intcoop.kernels':"
      echo "            return importlib.util.spec_from_file_location("
      echo "                name, '$ROOT/kernels/__init__.py', submodule_search_locations=['$ROOT/kernels'])"
      echo "sys.meta_path.append(_Kernels())"
    } >"$shim/sitecustomize.py"
    export PYTHONPATH=$shim:$ROOT${PYTHONPATH:+:$PYTHONPATH}
    echo "intcoop.kernels was not importable after the install: $shim/sitecustomize.py maps it" \
      | tee -a "$OUT/console.txt"
  fi
  outcome $rc
  say "prepare:   $OUTCOME, $(( $(date +%s) - t0 )) s of $L_PREPARE s"
}

phase_target() {
  local t0 rc last args=()
  t0=$(date +%s)
  [ "$REHEARSE" = 1 ] && args=(--rehearse)
  limited $L_TARGET console.txt "$PY" scripts/target_check.py --out "$OUT" "${args[@]}"
  rc=$?
  outcome $rc
  last=$(grep -a '^target: ' "$OUT/target.txt" 2>/dev/null | tail -n 1)
  say "target:    $OUTCOME, $(( $(date +%s) - t0 )) s of $L_TARGET s; ${last:-no summary line (cut short)}"
}

phase_triton() {
  local tests k=()
  [ "$REHEARSE" != 1 ] && k=(-k "$TRITON_TESTS_K")
  run_pytest $L_TRITON_TESTS triton.txt "${parallel[@]}" "${k[@]}" "${TRITON_TESTS[@]}"
  tests=$RESULT
  run_pytest $L_TRITON_BENCHES triton.txt "${TRITON_BENCHES[@]}"
  say "triton:    tests $tests; benches $RESULT"
}

phase_build() {
  local t0 rc note=""
  t0=$(date +%s)
  if [ "$REHEARSE" = 1 ] && [ -z "${GPU_CHECK_BUILD_CMD:-}" ]; then
    built=skipped
    say "build:     skipped (a rehearsal without GPU_CHECK_BUILD_CMD)"
    return
  fi
  timeout -k 2 $L_BUILD bash "$SELF" __body build >"$BUILD_LOG" 2>&1
  rc=$?
  { echo "== build: rc $rc, $(( $(date +%s) - t0 )) s of $L_BUILD s; the log's last 80 lines:"
    tail -n 80 "$BUILD_LOG"; } >"$OUT/build.txt"
  outcome $rc
  if [ $rc -eq 0 ]; then
    built=ok
    timeout 30 "$PY" -m intcoop info >>"$OUT/build.txt" 2>&1
  else
    built=failed
    note="; the phases that need no build go on (build.txt: the log's tail)"
    tail -n 25 "$BUILD_LOG"
  fi
  say "build:     $OUTCOME, $(( $(date +%s) - t0 )) s of $L_BUILD s$note"
}

has_build() {   # intcoop._C loads (with its CUDA kernels, unless rehearsing)
  "$PY" -c "import sys; from intcoop.ops import _ext
sys.exit(bool(_ext.load_error() or ('$REHEARSE' != '1' and _ext.missing_kernels('cuda'))))" 2>/dev/null
}

phase_cuda() {
  local k=()
  [ -z "$built" ] && ! has_build && phase_build
  if [ "$built" = failed ] || [ "$built" = skipped ]; then
    say "cuda:      skipped (the build $built)"
    return
  fi
  [ "$REHEARSE" != 1 ] && k=(-k "$CUDA_TESTS_K")
  run_pytest $L_CUDA cuda.txt "${parallel[@]}" "${k[@]}" "${CUDA_TESTS[@]}"
  say "cuda:      $RESULT"
}

phase_baselines() {   # each in its own process: a fault in the forward leaves the backward its chance
  local fwd
  run_pytest $L_BASELINE baselines.txt "${BASELINES[0]}"
  fwd=$RESULT
  run_pytest $L_BASELINE baselines.txt "${BASELINES[1]}"
  say "baselines: forward $fwd; backward $RESULT"
}

phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(prepare target triton build cuda baselines)
for phase in "${phases[@]}"; do
  case $phase in
    prepare|target|triton|build|cuda|baselines) "phase_$phase" ;;
    *) echo "unknown phase $phase (prepare, target, triton, build, cuda, baselines; or --collect)"; exit 2 ;;
  esac
done
say "total:     $(( $(date +%s) - t_run )) s; exit status $status"
exit $status
