"""What benches and the prepared GPU run share: wall-clock timing (synchronised on a GPU), where the GPU benches
run (or rehearse on the CPU), and realistic suffix lengths for op inputs.

    wall_time(fn, *args) -> (seconds, result); wall_median(fn, rounds) -> (median seconds, last result)
    gpu_bench_device() -> "cuda" | "cpu" (INTCOOP_BENCH_REHEARSE=1) | None
    suffix_lengths(n, seed) -> n suffix lengths ("name . EOT" tokens) as ImageNet's class names give them
"""
from __future__ import annotations

import os
import statistics
import time

import torch

__all__ = ["wall_time", "wall_median", "REHEARSE_ENV", "gpu_bench_device", "suffix_lengths", "skip_slow_precision"]


def wall_time(fn, *args) -> tuple[float, object]:
    """(seconds, result) of one call of fn(*args), synchronised with the GPU before and after when there is one."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def wall_median(fn, rounds: int) -> tuple[float, object]:
    """(median seconds over `rounds` calls, the last result)."""
    runs = [wall_time(fn) for _ in range(rounds)]
    return statistics.median(t for t, _ in runs), runs[-1][1]


REHEARSE_ENV = "INTCOOP_BENCH_REHEARSE"


def gpu_bench_device() -> str | None:
    """Where the GPU benches run: "cuda" on a GPU; "cpu" when INTCOOP_BENCH_REHEARSE=1 on a machine without one
    (tiny sizes, Triton through its interpreter: this checks the bench code before a GPU run, its figures mean
    nothing); None otherwise (the benches skip)."""
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get(REHEARSE_ENV) == "1" else None


def suffix_lengths(n: int, seed: int) -> list[int]:
    """Suffix lengths ("name . EOT" tokens) of n prompts: 2..14, mean about 4.2 (ImageNet's class names)."""
    g = torch.Generator().manual_seed(seed)
    return (2 + torch.poisson(torch.full((n,), 2.2), generator=g)).clamp(max=14).long().tolist()


def skip_slow_precision(precision: str, device) -> None:
    """Skip a bench row in a precision whose matmuls this device runs in a plain loop (bf16 on a CPU without
    AVX512-BF16 or AMX: ~100x slower than fp32, hours at the real sizes, and no figure worth having); not when
    rehearsing at toy sizes (INTCOOP_BENCH_REHEARSE=1), where the code path is what is checked."""
    import pytest

    from .inference import slow_matmul_note

    note = slow_matmul_note(precision, device)
    if note and os.environ.get(REHEARSE_ENV) != "1":
        pytest.skip(note)
