"""The process-level plumbing of a training run (what `train.Trainer` runs inside, not what it learns).

- Processes: `init_distributed()` (torchrun's environment -> gloo on CPU / nccl on GPU), `no_buffer_sync()` (the
  DDP keyword that turns off the per-forward buffer broadcast, across torch versions).
- Starting: `start_mode(out, resume, overwrite, ...)`: resume as asked; or by itself after an elastic restart
  (TORCHELASTIC_RESTART_COUNT > 0) from a last.pt written by this torchrun job (`elastic_run_id()`, recorded in
  every checkpoint); else refuse an out folder holding a run (`RunExistsError`) unless overwrite.
- Metrics: `Window` (per-step loss parts between two metrics rows, on the device, reduced across ranks only when a
  row is written; finds the first non-finite step), the `metrics.csv` file (`METRIC_FIELDS`, `write_csv`,
  `read_csv`) and `tensorboard(folder)` (a SummaryWriter, or None when tensorboard does not import).
"""
from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["METRIC_FIELDS", "init_distributed", "no_buffer_sync", "Window", "tensorboard", "write_csv",
           "read_csv", "RunExistsError", "start_mode", "elastic_run_id"]

log = logging.getLogger("intcoop.train")
METRIC_FIELDS = ("epoch", "step", "lr", "loss", "ce", "attr", "reg", "scl", "acc", "images_per_s", "val_acc")


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
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    store = _attempt_store(world)
    if store is None:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world)
    return dist.get_world_size(), dist.get_rank(), local, True


def _attempt_store(world: int):
    """Under torchrun: the rendezvous store, prefixed with this job's id and restart count (None elsewhere).

    torchrun's c10d rendezvous (--standalone) keeps ONE store server across elastic restarts and hands it to the
    workers unprefixed, so a restarted rank can read the address a killed rank published in the previous attempt
    and gloo's full-mesh connect fails ("Connection refused"); a per-attempt prefix gives every attempt fresh
    keys. The store is a client of the agent's server when torchrun says it serves one, else rank 0 hosts it."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    from torch.distributed.constants import default_pg_timeout

    addr, port, rank = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["RANK"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(addr, port, world, is_master=not agent and rank == 0, timeout=default_pg_timeout)
    prefix = f"/intcoop/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}"
    return dist.PrefixStore(prefix, store)


class RunExistsError(ValueError):
    """The output folder holds a run (last.pt / best.pt) and neither resume nor overwrite was asked for."""


def elastic_run_id() -> str | None:
    """torchrun's job id (the same across its elastic restarts), or None outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def start_mode(out: Path, resume: bool, overwrite: bool, epochs: int, is_main: bool) -> bool:
    """Whether a run in `out` resumes: as asked; or by itself after an elastic restart of this torchrun job; else
    an out folder holding a run is refused unless overwrite (its checkpoints are then deleted, by rank 0, so that
    a restart of this job cannot take them for its own). Every rank decides alike (they read the same files)."""
    from .checkpoint import read_checkpoint

    last, best = out / "last.pt", out / "best.pt"
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if not resume and restart > 0 and last.exists():
        try:
            ckpt = read_checkpoint(last)
        except Exception:                                    # unreadable: not taken for this job's
            ckpt = {}
        if ckpt.get("elastic_run_id") is not None and ckpt["elastic_run_id"] == elastic_run_id():
            import warnings
            warnings.warn(f"elastic restart {restart} of torchrun job {elastic_run_id()}: resuming from {last} "
                          f"(epoch {ckpt.get('epoch')} done)")
            return True
    if resume:
        return True
    held = [p for p in (last, best) if p.exists()]
    if held and not overwrite:
        try:
            done = f"{read_checkpoint(last)['epoch']} of {epochs} epochs done"
        except Exception:
            done = "a checkpoint"
        raise RunExistsError(f"{out} holds a run ({done}: {', '.join(p.name for p in held)}); pass --resume "
                             f"(fit(resume=True)) to continue it, --overwrite (Trainer(overwrite=True)) to start "
                             f"again, or another --out")
    if held and is_main:
        for p in held:
            p.unlink(missing_ok=True)
    return False


def no_buffer_sync() -> dict:
    """DDP keyword that stops the per-forward buffer broadcast (the prompt learner's only buffer is the constant
    SOS embedding); newer torch renamed it."""
    import inspect
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


class Window:
    """Per-step loss parts since the last metrics row (device tensors, synchronised only at `reduce`).
    The parts kept: PARTS (loss, ce, attr, reg, scl: "scl" the weighted sum of PromptSRC's terms) and correct."""

    PARTS = ("loss", "ce", "attr", "reg", "scl")

    def __init__(self):
        self.reset()

    def reset(self):
        self.rows, self.images, self.steps, self.t0 = [], [], [], time.perf_counter()

    def add(self, step: int, parts: dict, n: int):
        self.steps.append(step)
        zero = parts["loss"].new_zeros(())
        self.rows.append(torch.stack([parts.get(k, zero) for k in self.PARTS] + [parts["correct"].float()]))
        self.images.append(n)                       # a Python int: new_tensor(n) would be a synchronous copy

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def reduce(self, world: int):
        """(global sums [loss, ce, attr, reg, scl, correct, images, steps, non-finite count], first bad local step
        (step, loss, ce, attr, reg, scl) or None)."""
        P = len(self.PARTS)
        rows = torch.stack(self.rows).float()
        rows = torch.cat([rows, rows.new_tensor(self.images)[:, None]], 1)
        finite = torch.isfinite(rows[:, 0])
        sums = torch.cat([rows.sum(0), rows.new_tensor([len(self.rows), int((~finite).sum())])])
        if world > 1:
            dist.all_reduce(sums)
            sums[:P] /= world
            sums[P + 2] /= world
        bad = None
        if not bool(finite.all()):
            j = int((~finite).nonzero()[0])
            bad = (self.steps[j], *rows[j, :P].tolist())
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
