"""The `intcoop train` entry point: config files, overrides and the command line around `train.Trainer`.

- `CONFIG_DIR` (the shipped configs, intcoop/configs), `resolve_config(name)` (a file or a shipped config's name),
  `parse_overrides(["section.field=value", ...])` (values parsed as YAML).
- `train_main(config_path, overrides, resume, **trainer_kwargs)`: load the config, `Trainer(...).fit()`.
- `add_train_arguments(parser)`, `run_from_args(args)` (used by `intcoop.cli`), `main(argv)` (`python -m
  intcoop.train`, also under torchrun). All of these are re-exported by `intcoop.train`.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Mapping

from .config import load_config

__all__ = ["CONFIG_DIR", "parse_overrides", "resolve_config", "train_main", "add_train_arguments", "run_from_args",
           "main"]

CONFIG_DIR = Path(__file__).with_name("configs")
DESCRIPTION = "Train IntCoOp prompts (CoOp's recipe) from a YAML config."


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
    from .train import Trainer        # here, not at the top: intcoop.train re-exports this module's names
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
    parser = add_train_arguments(argparse.ArgumentParser(prog="intcoop train", description=DESCRIPTION))
    run_from_args(parser.parse_args(argv))
