"""The GPU-only benches, rehearsed on this CPU (INTCOOP_BENCH_REHEARSE=1: toy sizes, Triton interpreted): the code
that a lent GPU machine runs (scripts/gpu_check.sh) is checked here first, since a GPU run is short and rare
(tests/test_gpu_check.py rehearses the script itself).
Every case must pass its own output checks and add its row to the closing table; the figures mean nothing.
benches/bench_methods.py (a CPU bench too, minutes at its sizes) is rehearsed the same way, on the tiny CLIP."""
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


def test_method_cost_bench_runs_at_toy_sizes(tmp_path):
    """benches/bench_methods.py (not GPU-only, but minutes at its real sizes): every method in fp32 and bf16
    through the Trainer and the inference loop, on the tiny CLIP (INTCOOP_BENCH_REHEARSE=1: B 2, N 5)."""
    from intcoop.experiments.protocols import BASELINES

    table = tmp_path / "table.md"
    env = dict(os.environ, INTCOOP_BENCH_REHEARSE="1", INTCOOP_BENCH_TABLE=str(table), TRITON_INTERPRET="1",
               CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benches/bench_methods.py",
                          "--benchmark-disable"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert f"{2 * len(BASELINES)} passed" in run.stdout, run.stdout[-3000:]
    lines = [r for r in table.read_text().splitlines() if r.startswith("| ")]
    head = [c.strip() for c in lines[0].split("|")[1:-1]]
    rows = [dict(zip(head, (c.strip() for c in r.split("|")[1:-1]))) for r in lines[1:]]
    assert sorted((r["method"], r["precision"]) for r in rows) == sorted(
        (m, p) for m in BASELINES for p in ("fp32", "bf16"))
    assert "error" not in head
    for r in rows:
        assert float(r["step_s_per_image"]) > 0 and float(r["eval_images_per_s"]) > 0, r
