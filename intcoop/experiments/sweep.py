"""Cell bookkeeping of experiment sweeps (`intcoop experiment`, `intcoop ablate`): train or resume one cell,
evaluate it, write its result atomically, skip what is done.

A *cell* is one training run and the evaluations made with the trained model:

    Cell(id, dataset, subset, shots, seed, overrides={...}, evals=(Eval(target, subset, attributes), ...), meta)

Files under the sweep's folder `out`:
    experiment.yaml            the sweep's base config; a rerun with another config is refused (names the field)
    runs/<run id>/             the Trainer's folder (last.pt, metrics.csv, config.yaml) and evals/<eval>.json
    cells/<cell id>.json       the cell's result, written atomically once all its evaluations are done
Cells whose training is the same (dataset, classes, shots, seed, training overrides) share one run: the
16-shot ImageNet run of the few-shot, domain and cross-dataset protocols, or the IntCoOp run behind the
`attributes=oracle` / `shuffled` rows of an ablation. A rerun skips finished cells, reuses finished runs and
evaluations, and continues a half-trained run from its last checkpoint (`Trainer.fit(resume=True)`).

Per cell the config is the base config with: data.dataset/shots/subsample of the cell, train.seed = model.seed =
the cell's seed, train.out = runs/<run id>, the cell's overrides, and data.labels with "{dataset}" filled in.
The model is `model_factory(model_config)` (default: the frozen CLIP loaded once per (clip, pretrained) and
shared by the cells; the prompt learner initialised under model.seed); the trainer is
`trainer_factory(config, model, train_items, classnames, template=, device=, progress=, callbacks=)`
(default `intcoop.train.Trainer`). Both are hooks for tests and custom engines.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import yaml

from ..clip import TINY_CLIP, register_tiny_clip
from ..config import SECTIONS, RunConfig
from ..evaluation.metrics import harmonic_mean
from .._io import atomic_write_bytes

__all__ = ["Cell", "Eval", "Sweep", "apply_overrides", "run_id", "CELL_FORMAT"]

CELL_FORMAT = "intcoop-cell-v1"
# Fields that may differ between the cells of one sweep, or between a sweep and its rerun.
CELL_FIELDS = {"data.dataset", "data.root", "data.shots", "data.subsample", "data.workers", "train.seed",
               "model.seed", "train.out", "train.log_every", "train.compile"}


@dataclass(frozen=True)
class Eval:
    """Accuracy on the test split of `target`, over its `subset` classes (all | base | novel), with the model's
    attribute mode switched to `attributes` (predicted | oracle | shuffled) for this evaluation when given."""

    target: str
    subset: str = "all"
    attributes: str | None = None

    @property
    def name(self) -> str:
        return f"{self.target}-{self.subset}" + (f"-{self.attributes}" if self.attributes else "")


@dataclass(frozen=True)
class Cell:
    """id: file name of the result. overrides: dotted config overrides of this cell ("eval.attributes" is not a
    config field: it is applied by the evaluations, see Eval). meta: copied into the result (protocol, variant)."""

    id: str
    dataset: str
    subset: str
    shots: int
    seed: int
    evals: tuple[Eval, ...]
    overrides: Mapping = field(default_factory=dict)
    meta: Mapping = field(default_factory=dict)

    @property
    def train_overrides(self) -> dict:
        return {k: v for k, v in self.overrides.items() if not k.startswith("eval.")}



def run_id(dataset: str, subset: str, shots: int, seed: int, changed: Mapping | None = None) -> str:
    """runs/<run id>: "<dataset>-<subset>-<K>shot-seed<S>", plus "-<field>-<value>_..." for each config field
    that the cell's overrides change with respect to the sweep's base config."""
    base = f"{dataset}-{subset}-{shots}shot-seed{seed}"
    parts = [f"{k.partition('.')[2]}-{v}" for k, v in sorted((changed or {}).items())]
    return base + ("-" + "_".join(parts) if parts else "")


def apply_overrides(cfg: RunConfig, overrides: Mapping) -> RunConfig:
    """A copy of `cfg` with {"section.field": value} applied: `intcoop.config.apply_overrides` (unknown keys with a
    "did you mean", values converted and range-checked, errors naming the override)."""
    from ..config import apply_overrides as checked
    return checked(cfg, overrides)


def _flat(cfg: RunConfig) -> dict:
    return {f"{s}.{k}": v for s in SECTIONS for k, v in dataclasses.asdict(getattr(cfg, s)).items()}


class _ClipCache:
    """Default model factory: each frozen CLIP is loaded once and shared (random weights: one per model.seed)."""

    def __init__(self):
        self.clips = {}

    def __call__(self, mc):
        from ..clip import load_clip
        from ..model import IntCoOp

        if mc.clip == TINY_CLIP:
            register_tiny_clip()
        key = (mc.clip, mc.pretrained, mc.seed if mc.pretrained is None else None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mc.seed)
            if key not in self.clips:
                self.clips[key] = load_clip(mc.clip, mc.pretrained)
            torch.manual_seed(mc.seed)
            return IntCoOp(self.clips[key], mc)


def _default_trainer(config, model, train_items, classnames, **kw):
    from ..train.trainer import Trainer
    return Trainer(config, model, train_items, classnames, **kw)


class Sweep:
    """Runs cells under `out` with the base config `config` (see the module docstring).

    labels: oracle evaluations read `config.data.labels` ("{dataset}" filled in). device: training and evaluation
    device (default: CUDA when available). progress: tqdm bars; `log` gets one line per cell.
    """

    def __init__(self, out, config: RunConfig, *, model_factory: Callable | None = None,
                 trainer_factory: Callable | None = None, callbacks: Sequence[Callable] = (), device=None,
                 progress: bool = True, eval_batch_size: int = 64, eval_workers: int | None = None,
                 log: Callable[[str], None] = print, overrides: Mapping | None = None):
        self.out, self.config = Path(out), config
        self.overrides = dict(overrides or {})      # the user's overrides in `config`, recorded in each cell file
        self._locked = False
        self.model_factory = model_factory or _ClipCache()
        self.trainer_factory = trainer_factory or _default_trainer
        self.callbacks, self.progress, self.log = list(callbacks), progress, log
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.eval_kw = dict(batch_size=eval_batch_size,
                            workers=config.data.workers if eval_workers is None else eval_workers)
        self._splits: dict = {}

    # ------------------------------------------------------------------------------------------- config
    def check_config(self, write: bool = True) -> None:
        """Check the config against <out>/experiment.yaml (a rerun must use the same settings), or write it when
        write=True (`run` writes it only once a cell starts work: a sweep that fails before any, e.g. without
        weights, locks nothing)."""
        path = self.out / "experiment.yaml"
        now = {k: v for k, v in _flat(self.config).items() if k not in CELL_FIELDS}
        if self._locked:
            return
        if path.exists():
            self._locked = True
            saved = yaml.safe_load(path.read_text()) or {}
            diff = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]
            if diff:
                raise ValueError(f"{self.out} holds a sweep run with other settings ({'; '.join(diff)}); use another "
                                 f"--out, or the same settings to continue it")
        elif write:
            atomic_write_bytes(path, yaml.safe_dump(now, sort_keys=True).encode())
            self._locked = True

    def run_name(self, cell: Cell) -> str:
        """The run folder of a cell: cells whose training config is the same share it."""
        base, mine = _flat(self.config), _flat(apply_overrides(self.config, cell.train_overrides))
        return run_id(cell.dataset, cell.subset, cell.shots, cell.seed,
                      {k: v for k, v in mine.items() if v != base[k] and k not in CELL_FIELDS})

    def cell_config(self, cell: Cell) -> RunConfig:
        cfg = apply_overrides(self.config, {
            "data.dataset": cell.dataset, "data.shots": cell.shots, "data.subsample": cell.subset,
            "train.seed": cell.seed, "model.seed": cell.seed, "train.out": str(self.out / "runs" / self.run_name(cell)),
            **cell.train_overrides})
        if cfg.data.labels and "{dataset}" in cfg.data.labels:
            cfg = apply_overrides(cfg, {"data.labels": cfg.data.labels.format(dataset=cell.dataset)})
        return cfg

    def splits(self, name: str):
        from ..data import load_dataset
        if name not in self._splits:
            self._splits[name] = load_dataset(name, self.config.data.root)
        return self._splits[name]

    # ---------------------------------------------------------------------------------------------- run
    def run(self, cells: Sequence[Cell]) -> list[dict]:
        """Every cell's result (read back when finished earlier), in order."""
        ids = [c.id for c in cells]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate cell ids: {sorted({i for i in ids if ids.count(i) > 1})}")
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_config(write=False)
        results = []
        for i, cell in enumerate(cells, 1):
            t0 = time.perf_counter()
            res, how = self._finished(cell), "done earlier"
            if res is None:
                res = self._run_cell(cell)
                how = f"{res['train']['status']}, {time.perf_counter() - t0:.1f} s"
            self.log(f"[{i}/{len(cells)}] {cell.id}: {summary(res['results'])} ({how})")
            results.append(res)
        return results

    def _finished(self, cell: Cell) -> dict | None:
        path = self.out / "cells" / f"{cell.id}.json"
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        ok = isinstance(doc, dict) and doc.get("format") == CELL_FORMAT and doc.get("id") == cell.id
        return doc if ok and len(doc.get("results", [])) == len(cell.evals) else None

    def _run_cell(self, cell: Cell) -> dict:
        run = self.run_name(cell)
        run_dir = self.out / "runs" / run
        cached = {ev: _read_json(run_dir / "evals" / f"{ev.name}.json") for ev in cell.evals}
        if all(v is not None for v in cached.values()):
            self.check_config()                     # work of this sweep exists: lock its settings
        model, status = None, "evaluations reused"
        metrics = {}
        for ev in cell.evals:
            if cached[ev] is None:
                if model is None:
                    model, status, metrics = self._trained(cell)
                cached[ev] = self._evaluate(model, ev, cell)
                atomic_write_bytes(run_dir / "evals" / f"{ev.name}.json", json.dumps(cached[ev], indent=1).encode())
        doc = {"format": CELL_FORMAT, "id": cell.id, "run": run, "dataset": cell.dataset, "subset": cell.subset,
               "shots": cell.shots, "seed": cell.seed, "overrides": {**self.overrides, **dict(cell.overrides)},
               "meta": dict(cell.meta),
               "results": [cached[ev] for ev in cell.evals],
               "train": {"status": status, "metrics": {k: v for k, v in metrics.items()
                                                      if isinstance(v, (int, float))}},
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_bytes(self.out / "cells" / f"{cell.id}.json", json.dumps(doc, indent=1).encode())
        return doc

    def _trained(self, cell: Cell):
        """(model on self.device, status, last metrics): trains, resumes, or loads the finished run."""
        from ..train.checkpoint import load_prompt_state, read_checkpoint
        from ..data import fewshot_subset

        cfg = self.cell_config(cell)
        last = Path(cfg.train.out) / "last.pt"
        ckpt = read_checkpoint(last) if last.exists() else None
        model = self.model_factory(cfg.model)
        if ckpt is not None and int(ckpt["epoch"]) >= cfg.train.epochs:
            load_prompt_state(model, ckpt, str(last))
            self.check_config()
            return model.to(self.device).eval(), "trained earlier", dict(ckpt.get("metrics", {}))
        splits = fewshot_subset(self.splits(cell.dataset), cell.shots, cell.seed, cell.subset)
        self.check_config()                         # the first cell starts work: lock the sweep's settings
        trainer = self.trainer_factory(cfg, model, splits.train, splits.classnames, template=splits.template,
                                       device=self.device, progress=self.progress, callbacks=list(self.callbacks))
        metrics = trainer.fit(resume=ckpt is not None)
        status = f"resumed from epoch {int(ckpt['epoch'])}" if ckpt is not None else "trained"
        return trainer.model.eval(), status, metrics

    def _evaluate(self, model, ev: Eval, cell: Cell) -> dict:
        from ..data import subsample_classes
        from ..evaluation.metrics import accuracy

        part = subsample_classes(self.splits(ev.target), ev.subset)
        items, labels = list(part.test), None
        before = model.config.attributes
        if ev.attributes == "oracle":
            labels = self._oracle_labels(ev.target, cell)
        if ev.attributes == "shuffled":       # the model swaps attributes within a batch: mix the classes first
            random.Random(f"shuffled:{cell.seed}").shuffle(items)
        if ev.attributes:
            model.set_attributes(ev.attributes)
        try:
            res = accuracy(model, items, part.classnames, labels_by_id=labels, progress=self.progress,
                           desc=f"{cell.id}/{ev.name}", **self.eval_kw)
        finally:
            model.set_attributes(before)
        return {"target": ev.target, "subset": ev.subset, "attributes": ev.attributes, "acc": res["acc"],
                "n": res["n"]}

    def _oracle_labels(self, target: str, cell: Cell) -> dict:
        from ..attributes.labels_file import attributes_by_id, read_labels

        path = self.cell_config(cell).data.labels
        if path and "{dataset}" in path:
            path = path.format(dataset=target)
        if not path:
            raise ValueError(f"{cell.id}: attributes=oracle needs BLIP-2 labels of the test images (--labels)")
        return attributes_by_id(read_labels(path))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def summary(results: Sequence[dict]) -> str:
    """'base 70.10  novel 65.00  HM 67.45' or 'imagenet 60.00  imagenetv2 52.00' or 'acc 55.00'."""
    subsets = [r["subset"] for r in results]
    if len(results) == 1:
        return f"acc {results[0]['acc']:.2f}"
    if subsets == ["base", "novel"]:
        b, n = results[0]["acc"], results[1]["acc"]
        return f"base {b:.2f}  novel {n:.2f}  HM {harmonic_mean(b, n):.2f}"
    return "  ".join(f"{r['target']} {r['acc']:.2f}" for r in results)
