"""Training: the `Trainer` class, one run's loop (setup, epochs, steps, metrics rows, validation, checkpoints, resume).

Around it, in this room: `step` (config checks, schedule, the StepModule that is compiled and DDP-wrapped),
`inputs` (model / data / attribute-label pieces), `runtime` (distributed init, autocast, metrics window, CSV /
TensorBoard), `checkpoint` (the checkpoint format, `load_trained`), `losses`. The command line around it is
`intcoop.cli.train`.

    Trainer(config, model=None, train_items=None, classnames=None, labels=None, *, template=None, ...).fit()

What a run does (METHOD.md objective, CoOp's recipe):
- SGD (lr, momentum, weight decay) over the prompt learner's parameters only; CLIP stays frozen.
- Schedule, stepped once per EPOCH: `warmup_epochs` at the constant `warmup_lr`, then cosine from `lr` over the
  remaining epochs: lr(e) = lr * (1 + cos(pi * (e - W) / (E - W))) / 2.
- Precision (`step.step_precision`): a model stored in bf16 / fp16 (model.precision) trains in it; a float32 one
  by train.precision, "auto": bf16 autocast on GPU, fp32 on CPU ("bf16" / "fp32" force it). Losses are float32.
- `train.compile`: torch.compile around the step's forward (prompt learner, fast text encoder, logits, losses;
  AOTAutograd compiles its backward) and around validation's logits (`model.logits_function`); if compiling
  fails, a warning and the eager path. The text side is the
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
  Under `torchrun --standalone --max-restarts N`, a restarted job resumes by itself from the last.pt it wrote; a
  folder holding another run is refused without `--resume` or `--overwrite`.
  `<out>/best.pt` when validation items are given (best validation accuracy).
- PromptSRC (`selfreg`): train.lambda_scl_* > 0 adds its self-regularisation to the objective (the template-
  ensemble text targets are computed once at the start); train.gpa_std > 0 turns on Gaussian prompt
  aggregation: after epoch e (1-based) the prompt learner's parameters, weighted by w_e ~ N(e; gpa_mean,
  gpa_std) (sum 1 over the epochs), are added to an accumulator that every checkpoint carries ("gpa"), so that a
  resumed run aggregates what an uninterrupted one does. After the last epoch the aggregate REPLACES the
  parameters: the last epoch's validation, last.pt and the returned model are the aggregate's. With GPA, best.pt
  (when validation items are given) is not the best epoch: it is the final aggregate, written at the end, and
  its metrics' best_val_acc is the aggregate's val_acc (intermediate epochs' prompts are not the method's model).
- Progress bar (tqdm: loss, images/s); `<out>/metrics.csv` (epoch, step, lr, loss parts, acc, images/s, val_acc)
  every `log_every` steps and at each epoch's end, TensorBoard under `<out>/tb` when `torch.utils.tensorboard`
  imports; `<out>/config.yaml` at the start. A non-finite loss stops the run with an error naming the first bad
  step (checked when a metrics row is written, so without a device sync per step; no checkpoint is written after).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import losses, selfreg
from ..clip import image_size
from .checkpoint import clip_record, load_prompt_state, read_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..config import RunConfig, save_config
from ..inference import autocast, warn_slow_matmuls
from ..model import IntCoOp
from .inputs import AttributeData, IndexDataset, attribute_data, build_model, check_classes, load_training_data
from .step import StepModule, check_train_config, lr_factor, step_precision
from .runtime import METRIC_FIELDS, RunExistsError
from .runtime import elastic_run_id as _elastic_run_id
from .runtime import start_mode as _start_mode
from .runtime import Window as _Window
from .runtime import init_distributed as _init_distributed
from .runtime import no_buffer_sync as _no_buffer_sync
from .runtime import read_csv as _read_csv
from .runtime import tensorboard as _tensorboard
from .runtime import write_csv as _write_csv

__all__ = ["Trainer", "RunExistsError"]

log = logging.getLogger(__name__)
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
    overwrite: start again in an out folder that holds a run (its last.pt / best.pt are deleted first); without it
    `fit()` refuses such a folder (RunExistsError) unless resume=True, or unless this is an elastic restart of
    the same torchrun job (TORCHELASTIC_RESTART_COUNT > 0 and last.pt written by this TORCHELASTIC_RUN_ID), which
    resumes by itself.
    """

    def __init__(self, config: RunConfig | None = None, model: IntCoOp | None = None,
                 train_items: Sequence | None = None, classnames: Sequence[str] | None = None,
                 labels: str | os.PathLike | Mapping | None = None, *, template: str | None = None,
                 val_items: Sequence | None = None, device=None, progress: bool = True,
                 callbacks: Sequence[Callable] = (), compile_backend: str = "inductor", overwrite: bool = False):
        config = config or RunConfig()
        tc = config.train
        check_train_config(tc)
        step_precision((model.config if model is not None else config.model).precision, tc.precision)
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
        self.overwrite = bool(overwrite)
        self.world, self.rank, self.local_rank, self._own_group = _init_distributed()
        if tc.batch_size % self.world:
            raise ValueError(f"train.batch_size {tc.batch_size} (the global batch) is not divisible by the "
                             f"{self.world} processes")
        if device is None:
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = (model if model is not None else build_model(config.model)).to(self.device)
        self.config = dataclasses.replace(config, model=self.model.config)
        self.precision = step_precision(self.model.config.precision, tc.precision)   # what autocast gets
        warn_slow_matmuls(self.precision, self.device)
        self.out = Path(tc.out)
        self.step, self.epoch = 0, 0
        self.metrics: dict = {}
        self._clip_record: dict | None = None                # computed once (the CLIP is frozen)

    @property
    def clip_record(self) -> dict:
        """The frozen CLIP's record (name, pretrained, activation, architecture, fingerprint): in every checkpoint
        and, as a comment, in config.yaml."""
        if self._clip_record is None:
            self._clip_record = clip_record(self.model)
        return self._clip_record

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
        self.frozen_text = None                             # PromptSRC's template-ensemble text targets [N, E]
        if tc.lambda_scl_text or tc.lambda_scl_logits:
            self.frozen_text = selfreg.ensemble_text_features(model.clip, model.tokenizer, self.classnames,
                                                              device=self.device)
        self.gpa = selfreg.GaussianAggregate(tc.epochs, tc.gpa_mean, tc.gpa_std) if tc.gpa_std > 0 else None
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
        """CoOp's augmentation (train=True, with the model's mean / std), else the model's own preprocess: the
        one that evaluation applies."""
        if not train:
            return self.model.preprocess
        from ..data import clip_transforms
        cfg = getattr(self.model.clip.visual, "preprocess_cfg", None) or {}
        kw = {k: tuple(cfg[k]) for k in ("mean", "std") if k in cfg}
        return clip_transforms(image_size(self.model.clip)[0], train=train, **kw)

    def _make_loader(self):
        from ..data import ImageDataset, make_loader
        tc, dc = self.config.train, self.config.data
        local = tc.batch_size // self.world
        if self._cache_on:
            dataset = IndexDataset(self.items)
            workers = 0
        else:
            dataset, workers = ImageDataset(self.items, self._transform(dc.augment)), dc.workers
        share = math.ceil(len(self.items) / self.world)
        return make_loader(dataset, local, shuffle=True, workers=workers, seed=tc.seed, drop_last=share >= local,
                           pin_memory=self.device.type == "cuda", num_replicas=self.world, rank=self.rank)

    @torch.no_grad()
    def _image_features(self, images: torch.Tensor):
        with autocast(self.precision, self.device):
            return self.model.image_features(images.to(self.device, non_blocking=True))

    def _build_cache(self):
        """(feats [n, E], tokens [n, L, Wv] or None) of every training item, in item order, on the CPU."""
        from torch.utils.data import DataLoader

        from ..data import ImageDataset
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
        resume = _start_mode(self.out, resume, self.overwrite, tc.epochs, self.is_main)   # before any work
        self._prepare()
        start = self._resume() if resume else 0
        if start == 0 and self.is_main:
            save_config(self.config, self.out / "config.yaml")
            r = self.clip_record
            with open(self.out / "config.yaml", "a") as fh:
                fh.write(f"# clip built: {r['name']} pretrained={r['pretrained']!r} ({r['source']}) activation="
                         f"{r['activation']} dtype={r['dtype']} fingerprint={r['fingerprint']}\n")
            _write_csv(self.out / "metrics.csv", [])
        self._tb = _tensorboard(self.out / "tb") if self.is_main else None
        try:
            for epoch in range(start, tc.epochs):
                self.epoch = epoch
                self._run_epoch(epoch)
                self.sched.step()
                if self.gpa is not None:                    # every rank alike (their parameters are equal)
                    self._aggregate(epoch + 1)
                if not self.is_main:
                    continue
                improved = False
                if self.val_items:                          # rank 0 only; the others wait at the next collective
                    acc = self.metrics["val_acc"] = self.evaluate(self.val_items)
                    improved = (acc > self.metrics.get("best_val_acc", -1.0) if self.gpa is None
                                else epoch + 1 == tc.epochs)   # GPA: best.pt is the final aggregate
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

    @torch.no_grad()
    def _aggregate(self, epoch: int) -> None:
        """GPA after epoch `epoch` (1-based); after the last, the aggregate replaces the learned parameters."""
        params = dict(self.model.prompt.named_parameters())
        self.gpa.accumulate({k: p.detach() for k, p in params.items()}, epoch)
        if epoch == self.config.train.epochs:
            for k, v in self.gpa.result().items():
                params[k].copy_(v)

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
        images = feats = tokens = None
        if self.cache is not None:
            feats = self.cache[0][idx].to(self.device, non_blocking=True)
            tokens = self.cache[1][idx].to(self.device, non_blocking=True) if self.cache[1] is not None else None
        elif self.model.visual_prompted:                     # the prompted tower runs inside the step
            images = x.to(self.device, self.model.dtype, non_blocking=True)
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
        return images, feats, tokens, labels.to(self.device, non_blocking=True), target, valid, denom, hand

    def _train_step(self, batch):
        inputs = self._batch_inputs(batch)
        for attempt in range(2):
            self.opt.zero_grad(set_to_none=True)
            try:
                with autocast(self.precision, self.device):
                    parts = self._forward(*inputs, frozen_text=self.frozen_text)
                parts["loss"].backward()
                break
            except Exception as exc:                       # torch.compile failures: fall back to eager once
                if self._compile_checked or attempt:
                    raise
                warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:500]}); training without it")
                self._forward, self._compile_checked = self._eager, True
        self._compile_checked = True
        self.opt.step()
        return {k: v.detach() for k, v in parts.items()}, inputs[3].shape[0]

    # ----------------------------------------------------------------------------------------- metrics
    def _flush(self, window: "_Window", epoch: int) -> dict:
        sums, bad = window.reduce(self.world)
        if bad is not None or sums[-1] > 0:
            where = (f"at epoch {epoch + 1}, step {bad[0]} (loss {bad[1]:.4g}: ce {bad[2]:.4g}, attr {bad[3]:.4g}, "
                     f"reg {bad[4]:.4g}, scl {bad[5]:.4g})" if bad is not None
                     else f"on another process, epoch {epoch + 1}")
            raise FloatingPointError(f"training stopped: non-finite loss {where}; lower train.lr, or check the "
                                     f"inputs (precision={self.precision})")
        loss, ce, attr, reg, scl, correct, images, steps, _ = sums
        row = {"epoch": epoch + 1, "step": self.step, "lr": self.opt.param_groups[0]["lr"], "loss": loss / steps,
               "ce": ce / steps, "attr": attr / steps, "reg": reg / steps, "scl": scl / steps,
               "acc": correct / max(images, 1),
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

    def evaluate(self, items) -> float:
        """Top-1 accuracy (fraction) of the current model on `items` (labels index self.classnames), computed as
        `intcoop eval` computes it (`evaluation.metrics.accuracy`: the model's preprocess, the one inference loop).
        An oracle model is evaluated with its predicted attributes here (`intcoop eval --labels` gives the oracle
        accuracy)."""
        from ..evaluation.metrics import accuracy

        compile = self.compile_backend if self.config.train.compile else False
        labels = {} if self.model.attributes_mode == "oracle" else None     # {}: no label -> predicted attribute
        res = accuracy(self.model, items, self.classnames, batch_size=self.config.train.batch_size,
                       workers=self.config.data.workers, labels_by_id=labels, progress=False, compile=compile,
                       precision=self.precision)
        return res["acc"] / 100.0

    # ------------------------------------------------------------------------------------- checkpoints
    def _payload(self, epochs_done: int) -> dict:
        return {"config": dataclasses.asdict(self.config),
                "prompt": {k: v.cpu() for k, v in self.model.learnable_state_dict().items()},
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "epoch": epochs_done, "step": self.step, "rng": rng_state(self.loader.generator),
                "classnames": list(self.classnames), "template": self.template, "clip": self.clip_record,
                "metrics": {k: v for k, v in self.metrics.items() if isinstance(v, (int, float))},
                "elastic_run_id": _elastic_run_id(), "gpa": self.gpa.state_dict() if self.gpa is not None else None,
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
        if self.gpa is not None:                            # the accumulator of the epochs done
            if ckpt.get("gpa") is None:
                raise ValueError(f"resume: {path} was written without prompt aggregation (train.gpa_std 0): its "
                                 f"epochs cannot be aggregated; resume with train.gpa_std=0 or start again")
            self.gpa.load_state_dict(ckpt["gpa"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"], self.loader.generator)
        self.step, self.metrics = int(ckpt["step"]), dict(ckpt.get("metrics", {}))
        if self.is_main:
            rows = [r for r in _read_csv(self.out / "metrics.csv") if int(r["step"]) <= self.step]
            _write_csv(self.out / "metrics.csv", rows)
        return int(ckpt["epoch"])


def _version() -> str:
    from .. import __version__
    return __version__

