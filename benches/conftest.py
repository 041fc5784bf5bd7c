"""Bench setup: names the machine and versions, pins threads, collects side-by-side ratios for a closing table.

Each bench stores its comparison in `benchmark.extra_info` and calls `record(...)`; the table of all records is
printed at the end of `pytest benches/` (and written to benches/last_run.md, or to $INTCOOP_BENCH_TABLE).
"""
import json
import os
import platform
import statistics

import pytest
import torch

if not torch.cuda.is_available():   # before intcoop is imported: Triton reads it when a kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from intcoop.testing import patch_triton_interpreter  # noqa: E402
from intcoop.benchmarking import wall_time  # noqa: E402

patch_triton_interpreter()   # old triton interpreters under numpy >= 2.4 (a no-op on triton >= 3.8)

THREADS = int(os.environ.get("INTCOOP_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)
# fp32 on a GPU means fp32: no TF32 in cuDNN convolutions (the patch embedding) or matmuls, whose kernel choice
# differs with the batch size and would move fp32 results by ~1e-4 between two batch sizes of the same images.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
_RECORDS: list[dict] = []


def machine() -> str:
    import open_clip
    import triton

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores ({THREADS} threads used), {gpu}; "
            f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"open_clip {open_clip.__version__}")


def pytest_report_header(config):
    return f"intcoop benches on: {machine()}"


BENCH_CLIP = "ViT-B-16-quickgelu"   # OpenAI's ViT-B/16 (the default model's weights) runs QuickGELU, not nn.GELU


@pytest.fixture(scope="session")
def vit_b16_model():
    """An IntCoOp on a ViT-B-16-shaped CLIP with QuickGELU (the real model's activation) and random weights,
    every learned part active, on the bench device. The CPU benches use it too: one model for every figure."""
    import open_clip

    import intcoop
    from intcoop.testing import perturb_prompt

    torch.manual_seed(0)
    clip = open_clip.create_model(BENCH_CLIP, pretrained=None)
    act = type(clip.transformer.resblocks[0].mlp.gelu).__name__
    assert act == "QuickGELU", f"{BENCH_CLIP} built with {act}, not QuickGELU"
    model = perturb_prompt(intcoop.IntCoOp.from_clip(clip), std=0.02)
    if torch.cuda.is_available():       # time the kernels, not a silent fallback to the torch backend
        from intcoop.ops import dispatch

        chosen = repr(dispatch.choose("prefix_attention", torch.ones(1, device="cuda")))
        assert "intcoop.kernels" in chosen, f"the Triton backend is not in use on the GPU: {chosen}\n" + \
            "\n".join(map(str, dispatch.report("cuda")))
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


@pytest.fixture
def timed(benchmark):
    """timed(fn, rounds=3, warmup=1, args=()) -> (median seconds, fn's last result).

    pytest-benchmark's pedantic rounds (so its table and JSON keep them), each one synchronised on a GPU and timed
    on our own clock too, so that `--benchmark-disable` (one run, no stats) still gives a figure."""
    def run(fn, rounds: int = 3, warmup: int = 1, args=()):
        times = []

        def once(*a):
            t, out = wall_time(fn, *a)
            times.append(t)
            return out
        out = benchmark.pedantic(once, tuple(args), rounds=rounds, warmup_rounds=warmup, iterations=1)
        return statistics.median(times[-rounds:]), out
    return run


@pytest.fixture
def record():
    """record(**row): one row of the closing table; also appended at once to $INTCOOP_BENCH_ROWS (JSON lines) if
    set, so that a run stopped by a time limit keeps what it measured."""
    def add(**row):
        _RECORDS.append(row)
        path = os.environ.get("INTCOOP_BENCH_ROWS")
        if path:
            with open(path, "a") as fh:
                fh.write(json.dumps(row, default=str) + "\n")
    return add


def pytest_terminal_summary(terminalreporter):
    if not _RECORDS:
        return
    from intcoop._io import markdown_table

    table = markdown_table(_RECORDS)
    terminalreporter.write_sep("=", "intcoop: side-by-side results (same run)")
    terminalreporter.write_line(f"machine: {machine()}")
    terminalreporter.write(table)
    path = os.environ.get("INTCOOP_BENCH_TABLE") or os.path.join(os.path.dirname(__file__), "last_run.md")
    with open(path, "w") as fh:
        fh.write(f"machine: {machine()}\n\n{table}")
