"""How long `intcoop --help` takes against `python -c "import torch"` (the floor: the CLI needs torch), interleaved
runs so that the machine's load hits both alike, median of 5 each. Target (printed, not asserted): at most 0.5 s
more than torch's import. What keeps it there is tested structurally (tests/test_startup.py: --help and the op
imports load none of open_clip, transformers, timm, matplotlib)."""
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 0.5


def _wall(cmd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, cwd=REPO,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def test_help_startup(record):
    script = Path(sys.executable).with_name("intcoop")
    help_cmd = ([str(script)] if script.exists() else [sys.executable, "-m", "intcoop"]) + ["--help"]
    torch_cmd = [sys.executable, "-c", "import torch"]
    _wall(torch_cmd)                                             # warm the file cache once
    pairs = [(_wall(torch_cmd), _wall(help_cmd)) for _ in range(5)]
    t_torch, t_help = (statistics.median(p[i] for p in pairs) for i in (0, 1))
    extra = t_help - t_torch
    record(bench="intcoop --help", import_torch_s=round(t_torch, 2), help_s=round(t_help, 2),
           extra_s=round(extra, 2), target=f"<= {TARGET_S} s: {'met' if extra <= TARGET_S else 'missed'}")
    assert t_torch > 0 and t_help > 0
