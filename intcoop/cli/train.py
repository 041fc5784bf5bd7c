"""The `intcoop train` entry point: config files, overrides and the command line around `train.Trainer`.

- `CONFIG_DIR` (the shipped configs, intcoop/configs), `resolve_config(name)` (a file or a shipped config's name),
  `parse_overrides(["section.field=value", ...])` (values parsed as YAML).
- `train_main(config_path, overrides, resume, **trainer_kwargs)`: load the config, `Trainer(...).fit()`.
- `add_train_arguments(parser)`, `run_from_args(args)` (used by `intcoop.cli`), `main(argv)` (`python -m
  intcoop.train`, also under torchrun). All of these are re-exported by `intcoop.train`.
"""
from __future__ import annotations

import argparse

from ..config import CONFIG_DIR, load_config, parse_overrides, resolve_config

__all__ = ["CONFIG_DIR", "parse_overrides", "resolve_config", "train_main", "add_train_arguments", "run_from_args",
           "train_summary", "main"]

DESCRIPTION = "Train IntCoOp prompts (CoOp's recipe) from a YAML config."


def train_main(config_path=None, overrides=None, resume: bool = False, **trainer_kwargs) -> dict:
    """`intcoop train --config FILE [--set k=v ...] [--resume]`: read the config, train, return the last metrics."""
    return _train(config_path, overrides, resume, **trainer_kwargs)[1]


def _train(config_path, overrides, resume, **trainer_kwargs):
    from ..train.trainer import Trainer
    cfg = load_config(resolve_config(config_path), parse_overrides(overrides))
    trainer = Trainer(cfg, **trainer_kwargs)
    return trainer, trainer.fit(resume=resume)


def train_summary(trainer, metrics: dict, seconds: float) -> str:
    """The lines `intcoop train` closes with: epochs, final loss, accuracies, wall time, the files written."""
    from .._io import table

    out = trainer.out
    rows = [["epochs", f"{trainer.config.train.epochs} ({trainer.step} steps)"]]
    if "loss" in metrics:
        rows.append(["final loss", f"{metrics['loss']:.4f} (ce {metrics.get('ce', 0):.4f}, attr "
                                   f"{metrics.get('attr', 0):.4f}, reg {metrics.get('reg', 0):.4f})"])
    if "acc" in metrics:
        rows.append(["train accuracy", f"{100 * metrics['acc']:.1f} % (last logged steps)"])
    if "val_acc" in metrics:
        rows.append(["val accuracy", f"{100 * metrics['val_acc']:.1f} % (best {100 * metrics['best_val_acc']:.1f} "
                                     f"%: {out / 'best.pt'})"])
    else:
        rows.append(["val accuracy", "none (no validation items)"])
    rows += [["wall time", f"{seconds:.1f} s"], ["checkpoint", str(out / "last.pt")],
             ["config", str(out / "config.yaml")], ["metrics", str(out / "metrics.csv")]]
    return "trained:\n" + "\n".join("  " + line for line in table(rows, ["", ""]).splitlines()[2:])


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", "-c", default=None,
                        help="YAML config file, or a shipped one: " + ", ".join(
                            sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))))
    parser.add_argument("--set", "-o", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field (repeatable), e.g. --set train.lr=0.01")
    parser.add_argument("--out", default=None, help="output folder (same as --set train.out=DIR)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in an --out that holds a run (its last.pt / best.pt are deleted); without "
                             "it (or --resume) such a run is refused. Under torchrun an elastic restart resumes "
                             "by itself")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_from_args(args: argparse.Namespace, summary: bool = False) -> dict:
    """Train as the parsed flags say; summary=True prints `train_summary` at the end. Returns the last metrics."""
    import time

    overrides = parse_overrides(args.overrides, flag="--set")
    if args.out:
        overrides["train.out"], overrides.typed["train.out"] = args.out, f"--out {args.out}"
    start = time.perf_counter()
    trainer, metrics = _train(args.config, overrides, args.resume, progress=not args.no_progress,
                              overwrite=getattr(args, "overwrite", False))
    if summary and trainer.is_main:
        print(train_summary(trainer, metrics, time.perf_counter() - start))
    return metrics


def main(argv=None) -> None:
    """`python -m intcoop.train ...` (also under `torchrun --nproc_per_node R -m intcoop.train ...`)."""
    parser = add_train_arguments(argparse.ArgumentParser(prog="intcoop train", description=DESCRIPTION))
    run_from_args(parser.parse_args(argv), summary=True)
