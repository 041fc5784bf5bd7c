"""The one-call GPU run (scripts/gpu_check.sh) rehearsed on this CPU, what its phases select, and the max_rows
sizing of fast_logits (intcoop.api) that the run relies on at B = 256, N = 1000.

The rehearsal (INTCOOP_BENCH_REHEARSE=1: toy sizes, Triton interpreted, a few tests per phase) runs the whole
script with a CUDA build that fails (GPU_CHECK_BUILD_CMD): the target and Triton phases, which come first and need
no build, must still run and write their rows and summary lines, the failure must be reported, the phases after
it must go on, and the exit status must say that something failed.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from intcoop.api import (CPU_MAX_ROWS, MAX_ROWS_CAP, bytes_per_packed_row, default_max_rows, fast_logits,
                         max_rows_for_memory)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
FAILING_BUILD = 'echo "nvcc fatal   : Unsupported gpu architecture compute_90 (simulated)" >&2; exit 1'


def _env(tmp_path, **extra):
    return dict(os.environ, PYTHON=sys.executable, INTCOOP_BENCH_TABLE=str(tmp_path / "table.md"),
                TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", **extra)


def test_rehearsal_goes_on_past_a_failing_build(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=_env(tmp_path, OUT=str(out), INTCOOP_BENCH_REHEARSE="1",
                                  GPU_CHECK_BUILD_CMD=FAILING_BUILD))
    log = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 1, log
    lines = (out / "summary.txt").read_text().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["prepare", "target", "triton", "build", "cuda", "baselines",
                                                   "total"], lines
    summary = dict(ln.split(":", 1) for ln in lines)
    assert summary["prepare"].strip().startswith("ok"), lines
    assert summary["target"].strip().startswith("ok") and "target: 8 passed, 0 failed" in summary["target"], lines
    assert re.search(r"tests ok \(2 passed.*benches ok \(1 passed", summary["triton"]), lines
    assert summary["build"].strip().startswith("FAILED (rc 1)"), lines
    assert "simulated" in (out / "build.txt").read_text()
    assert summary["cuda"].strip() == "skipped (the build failed)", lines
    assert re.search(r"forward ok \(1 passed.*backward ok \(1 passed", summary["baselines"]), lines
    assert "exit status 1" in summary["total"]

    rows = [json.loads(r) for r in (out / "rows.jsonl").read_text().splitlines()]
    target = [r for r in rows if r["bench"].startswith("target ")]
    assert [r["bench"] for r in target] == [f"target {c}" for c in ("env", "forward", "max_rows", "finite",
                                                                    "compare", "train", "grads", "repeat")]
    assert all(r["ok"] and r["rehearsal"] for r in target), [r for r in target if not r["ok"]]
    assert target[4]["images"] == [0, 1, 3, 4] and target[5]["micro_batches"] == 2
    kernels = [r for r in rows if r["bench"].startswith("kernel ")]
    assert [(r["bench"], r["provider"]) for r in kernels] == [
        ("kernel patch_pool", "torch"), ("kernel prefix_attention", "sdpa"), ("kernel prefix_attention", "sdpa")]
    assert (out / "target.txt").read_text().count("\nPASS ") == 8
    assert len(list(out.iterdir())) <= 8                  # what the device tool brings back


def _collected(tmp_path) -> dict[str, list[str]]:
    run = subprocess.run(["bash", str(SCRIPT), "--collect"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=_env(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    sections, name = {}, None
    for line in run.stdout.splitlines():
        if line.startswith("== rc "):
            assert line == "== rc 0", f"{name}: pytest --collect-only failed\n{run.stdout[-4000:]}"
        elif line.startswith("== "):
            name = line[3:]
            sections[name] = []
        elif "::" in line:
            sections[name].append(line.strip())
    return sections


def test_phase_selections_collect_what_they_mean(tmp_path):
    """The GPU selections (files, node ids, -k expressions) collect the intended tests, here (ids end in -cpu
    here and in -cuda there: no expression may depend on them)."""
    got = _collected(tmp_path)
    triton = got["TRITON_TESTS"]
    assert sum("test_kernels_triton.py::test_prefix_attention[" in t for t in triton) >= 10
    assert sum("test_kernels_triton.py::test_patch_pool[" in t for t in triton) >= 10
    assert any("test_prefix_attention_bwd_deterministic" in t for t in triton)
    assert not any("compile_for_sm90" in t for t in triton)
    e2e = sorted(t.split("::")[1] for t in triton if "test_backends_e2e" in t)
    assert e2e == ["test_bf16_within_tolerance[triton]", "test_compiled_step_equals_eager_on_gpu[triton]",
                   "test_fast_path_equals_plain_path[torch]", "test_fast_path_equals_plain_path[triton]",
                   "test_training_on_gpu_bf16_compiled"]

    benches = got["TRITON_BENCHES"]
    prefix = [t for t in benches if "bench_kernels.py::test_prefix_attention" in t]
    assert len(prefix) == 8 and not any("sdpa" in t for t in prefix)
    assert sum("bench_kernels.py::test_patch_pool" in t for t in benches) == 6
    for name in ("test_fast_logits_gpu_bf16[", "test_fast_logits_gpu_bf16_compiled", "bench_train.py::test_steps_agree",
                 "bench_train.py::test_train_step", "bench_encoder.py::test_fast_logits[",
                 "bench_encoder.py::test_encode_prompts["):
        assert any(name in t for t in benches), name
    assert benches[-1].endswith("test_fast_logits_gpu_bf16_compiled")        # the slow compile goes last

    cuda = got["CUDA_TESTS"]
    assert sum("test_compiled_ops.py::test_cuda_" in t for t in cuda) >= 50
    assert not any("emulated" in t for t in cuda)
    assert sorted(t.split("::")[1] for t in cuda if "test_backends_e2e" in t) == [
        "test_bf16_within_tolerance[cuda]", "test_compiled_step_equals_eager_on_gpu[cuda]",
        "test_fast_path_equals_plain_path[cuda]"]
    assert any("tests/ops/test_ops.py::" in t for t in cuda)

    assert sorted(got["BASELINES"]) == [f"benches/bench_sdpa_baseline.py::test_prefix_attention_sdpa_{d}[{layer}]"
                                        for d in ("bwd", "fwd") for layer in ("causal", "eot")]


# ---- max_rows sizing --------------------------------------------------------------------------------------------

GIB = 2**30


def test_max_rows_is_a_monotone_capped_power_of_two():
    rows = [max_rows_for_memory(f, 512, torch.bfloat16, 2048) for f in range(0, 400 * GIB, 3 * GIB)]
    assert rows == sorted(rows) and rows[0] == 1 and rows[-1] == MAX_ROWS_CAP
    assert all(r & (r - 1) == 0 for r in rows)                              # powers of two: stable between calls
    # the H200 target: ~135 GiB free, bf16 ViT-B-16 text (width 512, MLP 2048): B 256 x N 1000 (1.07 M rows) in one
    assert max_rows_for_memory(135 * GIB, 512, torch.bfloat16, 2048) >= 256 * 4192
    # half the bytes per value: twice the rows (below the cap); the chunk's estimate fits the budget
    fp32, bf16 = (max_rows_for_memory(20 * GIB, 512, dt, 2048) for dt in (torch.float32, torch.bfloat16))
    assert bf16 == 2 * fp32
    assert fp32 * bytes_per_packed_row(512, 2048, torch.float32) <= 0.5 * 20 * GIB
    assert max_rows_for_memory(20 * GIB, 2048, torch.float32) < fp32               # a wider model: fewer rows


def test_max_rows_keeps_one_class_of_the_batch():
    assert max_rows_for_memory(0, 512, torch.float32, min_rows=256 * 14) == 256 * 14
    assert max_rows_for_memory(10**15, 512, torch.float32, min_rows=MAX_ROWS_CAP + 3) == MAX_ROWS_CAP + 3


@pytest.mark.parametrize("kwargs,match", [
    (dict(free_bytes=-1), "free_bytes"), (dict(width=0), "width"), (dict(min_rows=0), "min_rows"),
    (dict(fraction=1.5), "fraction")])
def test_max_rows_rejects_bad_arguments(kwargs, match):
    args = dict(free_bytes=GIB, width=512, dtype=torch.float32) | kwargs
    with pytest.raises(ValueError, match=match):
        max_rows_for_memory(**args)


def test_fast_logits_sizes_max_rows_on_the_cpu(clip_tiny):
    import intcoop

    model = intcoop.IntCoOp.from_clip(clip_tiny)
    assert default_max_rows(model) == CPU_MAX_ROWS and default_max_rows(model, 10**6) == 10**6
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    names = ["cat", "dog", "a very long class name"]
    torch.testing.assert_close(fast_logits(x, names, model), fast_logits(x, names, model, max_rows=CPU_MAX_ROWS))
    with pytest.raises(ValueError, match="max_rows must be a positive"):
        fast_logits(x, names, model, max_rows=0)


def test_target_check_counts_chunks_as_the_encoder_does(clip_tiny, monkeypatch):
    """scripts/target_check.py reports the text chunks fast_logits makes: the same rule as TextTower.encode."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from target_check import text_chunks
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    import intcoop

    model = intcoop.IntCoOp.from_clip(clip_tiny)
    names = ["cat", "dog", "a very long class name", "crane", "t-shirt/top", "ox"]
    suf = model.suffixes(names)
    seen = []
    real = model.tower.suffix_pass
    monkeypatch.setattr(model.tower, "suffix_pass",
                        lambda kv, part, P, dt: seen.append(3 * sum(part.lengths)) or real(kv, part, P, dt))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for max_rows in (1, 20, 41, 10**6):
        seen.clear()
        fast_logits(x, names, model, max_rows=max_rows)
        assert seen == text_chunks(suf.lengths, 3, max_rows), max_rows
