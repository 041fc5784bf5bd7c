"""Configuration dataclasses (a comment on every field) and their YAML files.

Where METHOD.md says "default", the value is this project's choice (the paper's hyper-parameters are not
public); every such choice is a field here and is listed in the README.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["ModelConfig", "TrainConfig", "DataConfig", "RunConfig", "load_config", "save_config",
           "atomic_write_bytes"]


@dataclass
class ModelConfig:
    clip: str = "ViT-B-16"                 # open_clip model name
    pretrained: str | None = "openai"      # open_clip pretrained tag or local checkpoint; None = random weights
    n_ctx: int = 4                         # M, number of learned context vectors
    ctx_init: str = "a photo of a"         # words whose token embeddings initialise the context ("" = random)
    conditioning: str = "attention"        # attention (IntCoOp) | additive (CoCoOp meta-net) | none (CoOp)
    heads: int = 8                         # H, heads of the cross-attention over patch tokens
    attributes: str = "predicted"          # predicted | oracle (BLIP-2 label at test time) | shuffled | off
    attr_tokens: int = 1                   # K, attribute tokens in the prompt
    attr_hidden: int = 512                 # hidden width of the attribute extractor E -> hidden -> D (ours)
    suffix: str = "{}."                    # text after the prefix; '{}' is the class name, EOT follows
    seed: int = 0                          # seed of any randomly initialised parameter


@dataclass
class DataConfig:
    dataset: str = "imagefolder"           # a name from intcoop.data (oxford_pets, imagenet, ..., imagefolder)
    root: str = "data"                     # the dataset's folder
    shots: int = 16                        # K images per class for training (0 = all)
    subsample: str = "all"                 # all | base | novel classes (base-to-novel protocol)
    labels: str | None = None              # BLIP-2 labels file (JSON lines) for the attribute loss / oracle
    workers: int = 2                       # data-loader worker processes
    augment: bool = True                   # CoOp's train augmentation (random resized crop + flip)


@dataclass
class TrainConfig:
    epochs: int = 10                       # training epochs
    batch_size: int = 32                   # images per step
    lr: float = 0.002                      # SGD learning rate
    momentum: float = 0.9                  # SGD momentum
    weight_decay: float = 5e-4             # SGD weight decay (CoOp's value)
    warmup_epochs: int = 1                 # constant warm-up epochs at warmup_lr (CoOp)
    warmup_lr: float = 1e-5                # learning rate during warm-up
    lambda_attr: float = 1.0               # weight of the attribute loss
    lambda_reg: float = 8.0                # weight of the knowledge-guided regulariser
    attr_loss: str = "cosine"              # cosine | mse
    regulariser: str = "class"             # off | class (hand-crafted template) | attribute ("a photo of a {a} {c}.")
    label_noise: float = 0.0               # fraction of training attribute labels replaced by random ones
    precision: str = "auto"                # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool = False                  # torch.compile around the training step
    cache_features: bool = False           # cache the frozen image tower's outputs (only without augmentation)
    seed: int = 1                          # run seed (data order, label noise, init)
    out: str = "runs/default"              # output folder: checkpoints, metrics.csv, config.yaml
    log_every: int = 10                    # steps between metric rows


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _build(cls, values: dict | None, where: str):
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown field(s) in {where}: {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**values)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> RunConfig:
    """A RunConfig from a YAML file (sections model, data, train), with dotted overrides {'train.lr': 0.01}."""
    raw = {}
    if path is not None:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping with sections model, data, train")
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    where = str(path or "config")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) in {where}: {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return RunConfig(**{s: _build(c, raw.get(s), f"{where}:{s}") for s, c in SECTIONS.items()})


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that a crash leaves the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)            # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:                                     # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def save_config(cfg, path: str | os.PathLike) -> None:
    atomic_write_bytes(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False).encode())
