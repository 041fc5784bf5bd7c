"""The GPU-only benches, rehearsed on this CPU (INTCOOP_BENCH_REHEARSE=1: toy sizes, Triton interpreted): the code
that a lent GPU machine runs (scripts/gpu_check.sh) is checked here first, since a GPU run is short and rare
(tests/test_gpu_check.py rehearses the script itself).
Every case must pass its own output checks and add its row to the closing table; the figures mean nothing."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_BENCHES = ["benches/bench_kernels.py", "benches/bench_sdpa_baseline.py",
               "benches/bench_encoder.py::test_fast_logits_gpu_bf16"]


def test_gpu_benches_run_at_toy_sizes(tmp_path):
    table = tmp_path / "table.md"
    env = dict(os.environ, INTCOOP_BENCH_REHEARSE="1", INTCOOP_BENCH_TABLE=str(table), TRITON_INTERPRET="1",
               CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_BENCHES,
                          "--benchmark-disable"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "19 passed" in run.stdout, run.stdout[-3000:]
    rows = table.read_text().splitlines()
    assert sum(r.startswith("| kernel prefix_attention") for r in rows) == 12     # 8 here + 4 SDPA baselines
    assert sum(r.startswith("| kernel prefix_attention") and "| sdpa |" in r for r in rows) == 4
    assert sum(r.startswith("| kernel patch_pool") for r in rows) == 6
    assert sum(r.startswith("| fast_logits bf16 GPU") for r in rows) == 1
