"""The process-level plumbing of a training run (what `train.Trainer` runs inside, not what it learns).

- Processes: `init_distributed()` (torchrun's environment -> gloo on CPU / nccl on GPU), `no_buffer_sync()` (the
  DDP keyword that turns off the per-forward buffer broadcast, across torch versions).
- Precision: `autocast(precision, device)` (bf16 autocast for "bf16", or "auto" on GPU; fp32 otherwise).
- Metrics: `Window` (per-step loss parts between two metrics rows, on the device, reduced across ranks only when a
  row is written; finds the first non-finite step), the `metrics.csv` file (`METRIC_FIELDS`, `write_csv`,
  `read_csv`) and `tensorboard(folder)` (a SummaryWriter, or None when tensorboard does not import).
"""
from __future__ import annotations

import csv
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["METRIC_FIELDS", "init_distributed", "no_buffer_sync", "autocast", "Window", "tensorboard", "write_csv",
           "read_csv"]

log = logging.getLogger("intcoop.train")
METRIC_FIELDS = ("epoch", "step", "lr", "loss", "ce", "attr", "reg", "acc", "images_per_s", "val_acc")


def init_distributed():
    """(world, rank, local_rank, whether this call created the process group) from torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, 0, False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_world_size(), dist.get_rank(), local, True


def no_buffer_sync() -> dict:
    """DDP keyword that stops the per-forward buffer broadcast (the prompt learner's only buffer is the constant
    SOS embedding); newer torch renamed it."""
    import inspect
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def autocast(precision: str, device: torch.device):
    """A fresh autocast context for `precision` on `device` (nullcontext for fp32)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class Window:
    """Per-step loss parts since the last metrics row (device tensors, synchronised only at `reduce`)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.rows, self.images, self.steps, self.t0 = [], [], [], time.perf_counter()

    def add(self, step: int, parts: dict, n: int):
        self.steps.append(step)
        self.rows.append(torch.stack([parts["loss"], parts["ce"], parts["attr"], parts["reg"],
                                      parts["correct"].float()]))
        self.images.append(n)                       # a Python int: new_tensor(n) would be a synchronous copy

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def reduce(self, world: int):
        """(global sums [loss, ce, attr, reg, correct, images, steps, non-finite count], first bad local step)."""
        rows = torch.stack(self.rows).float()
        rows = torch.cat([rows, rows.new_tensor(self.images)[:, None]], 1)
        finite = torch.isfinite(rows[:, 0])
        sums = torch.cat([rows.sum(0), rows.new_tensor([len(self.rows), int((~finite).sum())])])
        if world > 1:
            dist.all_reduce(sums)
            sums[:4] /= world
            sums[6] /= world
        bad = None
        if not bool(finite.all()):
            j = int((~finite).nonzero()[0])
            bad = (self.steps[j], *rows[j, :4].tolist())
        return sums.tolist(), bad


def tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:                               # tensorboard not installed
        log.info("TensorBoard logging off (%s)", exc)
        return None
    return SummaryWriter(str(folder))


def write_csv(path: Path, rows: list[dict], append: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", newline="") as fh:
        w = csv.DictWriter(fh, METRIC_FIELDS, extrasaction="ignore")
        if not append:
            w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
