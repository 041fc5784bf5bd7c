"""Training: `Trainer` and the `intcoop train` entry point (`train_main`, `add_train_arguments`, `main`).

    Trainer(config, model=None, train_items=None, classnames=None, labels=None, *, template=None, ...).fit()

What a run does (METHOD.md objective, CoOp's recipe):
- SGD (lr, momentum, weight decay) over the prompt learner's parameters only; CLIP stays frozen.
- Schedule, stepped once per EPOCH: `warmup_epochs` at the constant `warmup_lr`, then cosine from `lr` over the
  remaining epochs: lr(e) = lr * (1 + cos(pi * (e - W) / (E - W))) / 2.
- Precision "auto": bf16 autocast on GPU, fp32 on CPU ("bf16" / "fp32" force it). Losses are float32.
- `train.compile`: torch.compile around the step's forward (prompt learner, fast text encoder, logits, losses;
  AOTAutograd compiles its backward); if compiling fails, a warning and the eager step. The text side is the
  fast encoder (`model.text_features`) with the class suffixes tokenised once, outside the compiled region.
- Attributes: labels from a labels file (`labels.read_labels`) or a dict id -> word (or -> record); targets by
  `vocab.attribute_targets`, once per distinct word; `label_noise=p` gives a seeded fraction p of the labelled
  images another label's word; attributes="oracle" feeds the targets to `prompt_prefix` (NaN rows: no label).
  Without labels (or without an attribute slot) the attribute loss is skipped, with one warning.
- `train.cache_features` (with `data.augment` off): the frozen image tower runs once over the training set;
  (pooled feature, patch tokens) stay in CPU memory and batches are gathered from them: same batches, same result.
- Data parallel under `torchrun` (WORLD_SIZE > 1): DistributedDataParallel over the prompt learner, each rank a
  1/R share of every global batch (`train.batch_size` is the GLOBAL batch), gloo on CPU, nccl on GPU. The
  attribute loss is normalised by the global number of labelled images, so R ranks compute what one process
  would. Only rank 0 writes files.
- Checkpoints (see `checkpoint.py`): `<out>/last.pt` after every epoch, atomically; `--resume` continues from it to
  the same parameters as an uninterrupted run (a crash mid-epoch restarts that epoch from its saved RNG state).
  `<out>/best.pt` when validation items are given (best validation accuracy).
- Progress bar (tqdm: loss, images/s); `<out>/metrics.csv` (epoch, step, lr, loss parts, acc, images/s, val_acc)
  every `log_every` steps and at each epoch's end, TensorBoard under `<out>/tb` when `torch.utils.tensorboard`
  imports; `<out>/config.yaml` at the start. A non-finite loss stops the run with an error naming the first bad
  step (checked when a metrics row is written, so without a device sync per step; no checkpoint is written after).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import losses
from .backbone import image_size
from .checkpoint import load_prompt_state, load_trained, read_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import RunConfig, load_config, save_config
from .model import IntCoOp
from .train_parts import (AttributeData, StepModule, attribute_data, build_model, check_classes, load_training_data,
                          lr_factor)

__all__ = ["Trainer", "train_main", "add_train_arguments", "main", "parse_overrides", "resolve_config",
           "CONFIG_DIR", "build_model", "load_trained"]

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).with_name("configs")
METRIC_FIELDS = ("epoch", "step", "lr", "loss", "ce", "attr", "reg", "acc", "images_per_s", "val_acc")
RESUME_IGNORED = {"out", "log_every", "compile"}   # train fields that may change on --resume


class Trainer:
    """One training run. See the module docstring.

    config: RunConfig (default RunConfig()). model: an IntCoOp (default: built from config.model).
    train_items: `intcoop.data.Item`s (default: read from config.data: dataset, shots, subsample).
    classnames: the N class names, index = item.label (default: from the items). labels: labels file path,
    or {image id: word or None} (default: config.data.labels). template: hand-crafted prompt for the regulariser
    (default: the dataset's, else "a photo of a {}."). val_items: evaluated after each epoch (-> best.pt).
    progress: show a tqdm bar. callbacks: f(trainer, info) after every optimiser step (info: epoch, step,
    step_in_epoch, loss tensors); an exception raised there stops the run. compile_backend: torch.compile backend.
    """

    def __init__(self, config: RunConfig | None = None, model: IntCoOp | None = None,
                 train_items: Sequence | None = None, classnames: Sequence[str] | None = None,
                 labels: str | os.PathLike | Mapping | None = None, *, template: str | None = None,
                 val_items: Sequence | None = None, device=None, progress: bool = True,
                 callbacks: Sequence[Callable] = (), compile_backend: str = "inductor"):
        config = config or RunConfig()
        tc = config.train
        _check_train_config(tc)
        if train_items is None:
            data = load_training_data(config.data, tc.seed)
            train_items, classnames = data.train, classnames or data.classnames
            template = template or data.template
        if labels is None:
            labels = config.data.labels
        self.items = list(train_items)
        self.classnames = check_classes(classnames, self.items)
        self.template = template or "a photo of a {}."
        self.labels, self.val_items = labels, list(val_items) if val_items else []
        self.progress, self.callbacks, self.compile_backend = progress, list(callbacks), compile_backend
        self.world, self.rank, self.local_rank, self._own_group = _init_distributed()
        if tc.batch_size % self.world:
            raise ValueError(f"train.batch_size {tc.batch_size} (the global batch) is not divisible by the "
                             f"{self.world} processes")
        if device is None:
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = (model if model is not None else build_model(config.model)).to(self.device)
        self.config = dataclasses.replace(config, model=self.model.config)
        self.out = Path(tc.out)
        self.step, self.epoch = 0, 0
        self.metrics: dict = {}

    # ------------------------------------------------------------------------------------------ setup
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _prepare(self) -> None:
        tc, model = self.config.train, self.model
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        np.random.seed(tc.seed)
        model.eval()                                        # frozen CLIP in eval mode; the prompt learner has no
        model.prompt.train()                                # dropout / batch norm, but say what is trained
        self.attr: AttributeData | None = attribute_data(self, model)
        self.hand = None
        if tc.regulariser != "off" and tc.lambda_reg:
            self.hand = losses.HandFeatures(model.clip, model.tokenizer, self.classnames, self.template, self.device)
            self.hand.classes()
            if tc.regulariser == "attribute" and self.attr is not None:
                self.hand.precompute(self.attr.words)          # all words at once: the same bits on --resume
        self._cache_on = self._caching()
        self.loader = self._make_loader()
        self.cache = self._build_cache() if self._cache_on else None
        self.opt = torch.optim.SGD(model.prompt.parameters(), lr=tc.lr, momentum=tc.momentum,
                                   weight_decay=tc.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda e: lr_factor(e, tc))
        module = StepModule(model, model.suffixes(self.classnames), tc, self.attr is not None)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids, **_no_buffer_sync(),
                                                         find_unused_parameters=model.config.attributes == "oracle")
        self._eager = module
        self._forward = torch.compile(module, backend=self.compile_backend) if tc.compile else module
        self._compile_checked = not tc.compile

    def _caching(self) -> bool:
        tc = self.config.train
        if tc.cache_features and self.config.data.augment:
            warnings.warn("train.cache_features is ignored: data.augment is on (every epoch sees new crops)")
        return tc.cache_features and not self.config.data.augment

    def _transform(self, train: bool):
        from .data import clip_transforms
        cfg = getattr(self.model.clip.visual, "preprocess_cfg", None) or {}
        kw = {k: tuple(cfg[k]) for k in ("mean", "std") if k in cfg}
        return clip_transforms(image_size(self.model.clip)[0], train=train, **kw)

    def _make_loader(self):
        from .data import ImageDataset, make_loader
        tc, dc = self.config.train, self.config.data
        local = tc.batch_size // self.world
        if self._cache_on:
            dataset = _IndexDataset(self.items)
            workers = 0
        else:
            dataset, workers = ImageDataset(self.items, self._transform(dc.augment)), dc.workers
        share = math.ceil(len(self.items) / self.world)
        return make_loader(dataset, local, shuffle=True, workers=workers, seed=tc.seed, drop_last=share >= local,
                           pin_memory=self.device.type == "cuda", num_replicas=self.world, rank=self.rank)

    @torch.no_grad()
    def _image_features(self, images: torch.Tensor):
        with _autocast(self.config.train.precision, self.device):
            return self.model.image_features(images.to(self.device, non_blocking=True))

    def _build_cache(self):
        """(feats [n, E], tokens [n, L, Wv] or None) of every training item, in item order, on the CPU."""
        from torch.utils.data import DataLoader

        from .data import ImageDataset
        loader = DataLoader(ImageDataset(self.items, self._transform(False)), self.config.train.batch_size,
                            num_workers=self.config.data.workers)
        feats, tokens = [], []
        for images, _, _ in loader:
            f, t = self._image_features(images)
            feats.append(f.cpu())
            tokens.append(t.cpu() if t is not None else None)
        return torch.cat(feats), (torch.cat(tokens) if tokens[0] is not None else None)

    # --------------------------------------------------------------------------------------------- run
    def fit(self, resume: bool = False) -> dict:
        """Train for config.train.epochs epochs (from <out>/last.pt with resume=True). Returns the last metrics."""
        tc = self.config.train
        self._prepare()
        start = self._resume() if resume else 0
        if start == 0 and self.is_main:
            if (self.out / "last.pt").exists():
                warnings.warn(f"{self.out / 'last.pt'} exists and is overwritten (pass resume=True to continue)")
            save_config(self.config, self.out / "config.yaml")
            _write_csv(self.out / "metrics.csv", [])
        self._tb = _tensorboard(self.out / "tb") if self.is_main else None
        try:
            for epoch in range(start, tc.epochs):
                self.epoch = epoch
                self._run_epoch(epoch)
                self.sched.step()
                if not self.is_main:
                    continue
                improved = False
                if self.val_items:                          # rank 0 only; the others wait at the next collective
                    acc = self.metrics["val_acc"] = self.evaluate(self.val_items)
                    improved = acc > self.metrics.get("best_val_acc", -1.0)
                    if improved:
                        self.metrics["best_val_acc"] = acc
                    self._log_row({"epoch": epoch + 1, "step": self.step, "val_acc": acc})
                payload = self._payload(epoch + 1)
                save_checkpoint(self.out / "last.pt", payload)
                if improved:
                    save_checkpoint(self.out / "best.pt", payload)
            if self.world > 1:
                dist.barrier()
        finally:
            if self._tb is not None:
                self._tb.close()
            if self._own_group and dist.is_initialized():
                dist.destroy_process_group()
        return dict(self.metrics)

    def _run_epoch(self, epoch: int) -> None:
        from tqdm.auto import tqdm
        tc = self.config.train
        window = _Window()
        if hasattr(self.loader.sampler, "set_epoch"):        # the order and augmentations of pass `epoch`
            self.loader.sampler.set_epoch(epoch)
        bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="step", leave=False,
                   disable=not (self.progress and self.is_main))
        for i, batch in enumerate(bar):
            parts, n = self._train_step(batch)
            self.step += 1
            window.add(self.step, parts, n)
            info = {"epoch": epoch, "step": self.step, "step_in_epoch": i, **parts}
            for cb in self.callbacks:
                cb(self, info)
            if self.step % tc.log_every == 0 or i + 1 == len(self.loader):
                row = self._flush(window, epoch)
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")
        bar.close()

    def _batch_inputs(self, batch):
        x, labels, idx = batch
        if self.cache is not None:
            feats = self.cache[0][idx].to(self.device, non_blocking=True)
            tokens = self.cache[1][idx].to(self.device, non_blocking=True) if self.cache[1] is not None else None
        else:
            feats, tokens = self._image_features(x)
        a = self.attr
        target = valid = denom = hand = None
        if a is not None:
            target, valid = a.batch(idx, self.device)
            count = valid.sum().to(torch.float32)
            if self.world > 1:
                dist.all_reduce(count)
            denom = count / self.world
        if self.hand is not None:
            if self.config.train.regulariser == "attribute" and a is not None:
                hand = self.hand.for_words([a.words[j] for j in idx.tolist()])
            else:
                hand = self.hand.classes()
        return feats, tokens, labels.to(self.device, non_blocking=True), target, valid, denom, hand

    def _train_step(self, batch):
        inputs = self._batch_inputs(batch)
        for attempt in range(2):
            self.opt.zero_grad(set_to_none=True)
            try:
                with _autocast(self.config.train.precision, self.device):
                    parts = self._forward(*inputs)
                parts["loss"].backward()
                break
            except Exception as exc:                       # torch.compile failures: fall back to eager once
                if self._compile_checked or attempt:
                    raise
                warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:500]}); training without it")
                self._forward, self._compile_checked = self._eager, True
        self._compile_checked = True
        self.opt.step()
        return {k: v.detach() for k, v in parts.items()}, inputs[2].shape[0]

    # ----------------------------------------------------------------------------------------- metrics
    def _flush(self, window: "_Window", epoch: int) -> dict:
        sums, bad = window.reduce(self.world)
        if bad is not None or sums[-1] > 0:
            where = (f"at epoch {epoch + 1}, step {bad[0]} (loss {bad[1]:.4g}: ce {bad[2]:.4g}, attr {bad[3]:.4g}, "
                     f"reg {bad[4]:.4g})" if bad is not None else f"on another process, epoch {epoch + 1}")
            raise FloatingPointError(f"training stopped: non-finite loss {where}; lower train.lr, or check the "
                                     f"inputs (precision={self.config.train.precision})")
        loss, ce, attr, reg, correct, images, steps, _ = sums
        row = {"epoch": epoch + 1, "step": self.step, "lr": self.opt.param_groups[0]["lr"], "loss": loss / steps,
               "ce": ce / steps, "attr": attr / steps, "reg": reg / steps, "acc": correct / max(images, 1),
               "images_per_s": images / max(window.elapsed(), 1e-9)}
        window.reset()
        self.metrics.update(row)
        if self.is_main:
            self._log_row(row)
        return row

    def _log_row(self, row: dict) -> None:
        if not self.is_main:
            return
        _write_csv(self.out / "metrics.csv", [row], append=True)
        if self._tb is not None:
            for k in METRIC_FIELDS[2:]:
                if isinstance(row.get(k), (int, float)):
                    self._tb.add_scalar(f"train/{k}", row[k], row["step"])

    @torch.no_grad()
    def evaluate(self, items) -> float:
        """Top-1 accuracy of the current model on `items` (labels index self.classnames). An oracle model is
        evaluated with its predicted attributes here (`intcoop eval --labels` gives the oracle accuracy)."""
        from .data import ImageDataset, make_loader
        loader = make_loader(ImageDataset(items, self._transform(False)), self.config.train.batch_size,
                             workers=self.config.data.workers)
        suf, correct, m = self.model.suffixes(self.classnames), 0, self.model
        for x, y, _ in loader:
            feats, tokens = self._image_features(x)
            none = (torch.full((len(y), m.tower.width), float("nan"), device=self.device)
                    if m.attributes_mode == "oracle" else None)
            with _autocast(self.config.train.precision, self.device):
                logits = m.scores(feats, m.text_features(m.prompt_prefix(feats=feats, tokens=tokens,
                                                                         attr_targets=none), suf))
            correct += int((logits.argmax(-1).cpu() == y).sum())
        return correct / max(len(items), 1)

    # ------------------------------------------------------------------------------------- checkpoints
    def _payload(self, epochs_done: int) -> dict:
        return {"config": dataclasses.asdict(self.config),
                "prompt": {k: v.cpu() for k, v in self.model.learnable_state_dict().items()},
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "epoch": epochs_done, "step": self.step, "rng": rng_state(self.loader.generator),
                "classnames": list(self.classnames), "template": self.template,
                "metrics": {k: v for k, v in self.metrics.items() if isinstance(v, (int, float))},
                "versions": {"torch": str(torch.__version__), "intcoop": _version()}}

    def _resume(self) -> int:
        path = self.out / "last.pt"
        if not path.exists():
            warnings.warn(f"resume: {path} not found; starting from scratch")
            return 0
        ckpt = read_checkpoint(path)
        load_prompt_state(self.model, ckpt, str(path))
        if list(ckpt["classnames"]) != list(self.classnames):
            raise ValueError(f"resume: {path} was trained on other classes ({len(ckpt['classnames'])} names, "
                             f"first {ckpt['classnames'][:3]}) than this run ({self.classnames[:3]} ...)")
        saved, now = ckpt["config"]["train"], dataclasses.asdict(self.config.train)
        changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items()
                   if k not in RESUME_IGNORED and saved.get(k) != v]
        if changed:
            warnings.warn(f"resume: training settings differ from {path} ({'; '.join(changed)}); the result will "
                          f"not match an uninterrupted run")
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"], self.loader.generator)
        self.step, self.metrics = int(ckpt["step"]), dict(ckpt.get("metrics", {}))
        if self.is_main:
            rows = [r for r in _read_csv(self.out / "metrics.csv") if int(r["step"]) <= self.step]
            _write_csv(self.out / "metrics.csv", rows)
        return int(ckpt["epoch"])


# --------------------------------------------------------------------------------------------- helpers
class _IndexDataset(torch.utils.data.Dataset):
    """items[i] -> (i, label, i): the loader's batches when features are cached (gathered from the cache)."""

    def __init__(self, items):
        self.labels = [it.label for it in items]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return i, self.labels[i], i


class _Window:
    """Per-step loss parts since the last metrics row (device tensors, synchronised only at `reduce`)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.rows, self.steps, self.t0 = [], [], time.perf_counter()

    def add(self, step: int, parts: dict, n: int):
        self.steps.append(step)
        self.rows.append(torch.stack([parts["loss"], parts["ce"], parts["attr"], parts["reg"],
                                      parts["correct"].float(), parts["loss"].new_tensor(n)]))

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def reduce(self, world: int):
        """(global sums [loss, ce, attr, reg, correct, images, steps, non-finite count], first bad local step)."""
        rows = torch.stack(self.rows).float()
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


def _check_train_config(tc) -> None:
    if tc.attr_loss not in losses.ATTR_LOSSES:
        raise ValueError(f"train.attr_loss must be one of {losses.ATTR_LOSSES}, got {tc.attr_loss!r}")
    if tc.regulariser not in losses.REGULARISERS:
        raise ValueError(f"train.regulariser must be one of {losses.REGULARISERS}, got {tc.regulariser!r}")
    if tc.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"train.precision must be auto, fp32 or bf16, got {tc.precision!r}")
    if not 0 <= tc.label_noise <= 1:
        raise ValueError(f"train.label_noise must be in [0, 1], got {tc.label_noise}")
    if tc.epochs < 1 or tc.batch_size < 1 or tc.log_every < 1 or tc.warmup_epochs < 0:
        raise ValueError("train.epochs, batch_size and log_every must be >= 1 and warmup_epochs >= 0")


def _autocast(precision: str, device: torch.device):
    """A fresh autocast context for `precision` on `device` (nullcontext for fp32)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _init_distributed():
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


def _no_buffer_sync() -> dict:
    """DDP keyword that stops the per-forward buffer broadcast (the prompt learner's only buffer is the constant
    SOS embedding); newer torch renamed it."""
    import inspect
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:                               # tensorboard not installed
        log.info("TensorBoard logging off (%s)", exc)
        return None
    return SummaryWriter(str(folder))


def _write_csv(path: Path, rows: list[dict], append: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", newline="") as fh:
        w = csv.DictWriter(fh, METRIC_FIELDS, extrasaction="ignore")
        if not append:
            w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _version() -> str:
    from . import __version__
    return __version__


# ------------------------------------------------------------------------------------------------ CLI
def parse_overrides(overrides) -> dict:
    """["train.lr=0.01", "model.conditioning=none"] (values parsed as YAML) or a dict -> {dotted key: value}."""
    import yaml
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"override {item!r} must look like section.field=value (e.g. train.lr=0.01)")
        out[key.strip()] = yaml.safe_load(value)
    return out


def resolve_config(name: str | os.PathLike | None) -> Path | None:
    """A config file path, or the name of one shipped in intcoop/configs ("intcoop", "coop", "demo_cpu")."""
    if name is None:
        return None
    p = Path(name)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {str(name)!r} is neither a file nor a shipped config ({known})")


def train_main(config_path=None, overrides=None, resume: bool = False, **trainer_kwargs) -> dict:
    """`intcoop train --config FILE [--set k=v ...] [--resume]`: read the config, train, return the last metrics."""
    cfg = load_config(resolve_config(config_path), parse_overrides(overrides))
    return Trainer(cfg, **trainer_kwargs).fit(resume=resume)


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", "-c", default=None,
                        help="YAML config file, or a shipped one: " + ", ".join(
                            sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))))
    parser.add_argument("--set", "-o", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field (repeatable), e.g. --set train.lr=0.01")
    parser.add_argument("--out", default=None, help="output folder (same as --set train.out=DIR)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_from_args(args: argparse.Namespace) -> dict:
    overrides = list(args.overrides) + ([f"train.out={args.out}"] if args.out else [])
    return train_main(args.config, overrides, args.resume, progress=not args.no_progress)


def main(argv=None) -> None:
    """`python -m intcoop.train ...` (also under `torchrun --nproc_per_node R -m intcoop.train ...`)."""
    parser = add_train_arguments(argparse.ArgumentParser(prog="intcoop train", description=__doc__.split("\n")[0]))
    run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
