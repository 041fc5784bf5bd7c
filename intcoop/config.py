"""Configuration dataclasses (a comment on every field), their YAML files, and overrides checked before any work.

`load_config(path, overrides)` / `apply_overrides(cfg, overrides)`: unknown keys get the nearest known one ("did
you mean train.epochs?"), values are converted to the field's type ("1e-3" -> 0.001; none / None / null -> None
for optional fields) and checked (CHOICES, RANGES, model.n_ctx against model.ctx_init); errors name the source:
the YAML file for its entries, the override as typed for overrides (`parse_overrides(items, flag="--set")`).

Where METHOD.md says "default", the value is this project's choice (the paper's hyper-parameters are not
public); every such choice is a field here and is listed in the README.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import yaml

from ._io import atomic_write_bytes

__all__ = ["ModelConfig", "TrainConfig", "DataConfig", "RunConfig", "load_config", "save_config", "CONFIG_DIR",
           "resolve_config", "parse_overrides", "apply_overrides", "Overrides", "convert_value", "check_value"]

CONFIG_DIR = Path(__file__).with_name("configs")   # the shipped configs


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
    precision: str = "fp32"                # fp32 | bf16 | fp16: the frozen CLIP's stored and compute dtype
    # deep prompts (IVLP, VPT, MaPLe, PromptSRC; README "Deep prompts")
    text_depth: int = 1                    # J_t: 0 = context fixed at ctx_init (not learned), 1 = learned at the
                                           # input only (CoOp), J >= 2 = own learned tokens at layers 1..J-1 too
    visual_prompts: str = "off"            # off | independent (IVLP, VPT) | coupled (MaPLe: Linear of text tokens)
    visual_ctx: int = 2                    # learned visual tokens (coupled: n_ctx)
    visual_depth: int = 12                 # J_v: layers 0..J_v-1 get their own visual tokens (coupled: text_depth)

    @property
    def prefix_len(self) -> int:
        """Tokens before the class name: SOS, the M context vectors, the words of ctx_init after the first M
        (fixed, as the deep-prompt methods keep them) and the K attribute tokens (none when off)."""
        fixed = max(_ctx_tokens(self.ctx_init) - self.n_ctx, 0) if self.ctx_init else 0
        return 1 + self.n_ctx + fixed + (0 if self.attributes == "off" else self.attr_tokens)

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
    # PromptSRC's self-regularisation (0 = off) and Gaussian prompt aggregation (README "Deep prompts")
    lambda_scl_text: float = 0.0           # L1 of the text features to frozen CLIP's template-ensemble features
    lambda_scl_image: float = 0.0          # L1 of the image features to frozen CLIP's
    lambda_scl_logits: float = 0.0         # KL of zero-shot CLIP's class distribution to the model's
    gpa_mean: float = 0.0                  # GPA: epoch e's prompts weighted by N(e; gpa_mean, gpa_std), 1-based
    gpa_std: float = 0.0                   # 0 = no aggregation (the last epoch's prompts are used)
    out: str = "runs/default"              # output folder: checkpoints, metrics.csv, config.yaml
    log_every: int = 10                    # steps between metric rows


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}

# Allowed values, checked (with the source of the value named) before any model is built.
CHOICES = {
    "model.conditioning": ("attention", "additive", "none"), "model.attributes": ("predicted", "oracle", "shuffled",
                                                                                  "off"),
    "data.subsample": ("all", "base", "novel"), "train.attr_loss": ("cosine", "mse"),
    "train.regulariser": ("off", "class", "attribute"), "train.precision": ("auto", "fp32", "bf16"),
    "model.precision": ("fp32", "bf16", "fp16"), "model.visual_prompts": ("off", "independent", "coupled")}
RANGES = {  # key: (lowest, highest, lowest is allowed)
    "model.n_ctx": (1, None, True), "model.heads": (1, None, True), "model.attr_tokens": (1, None, True),
    "model.attr_hidden": (1, None, True), "data.shots": (0, None, True), "data.workers": (0, None, True),
    "train.epochs": (1, None, True), "train.batch_size": (1, None, True), "train.lr": (0, None, False),
    "train.momentum": (0, 1, True), "train.weight_decay": (0, None, True), "train.warmup_epochs": (0, None, True),
    "train.warmup_lr": (0, None, True), "train.lambda_attr": (0, None, True), "train.lambda_reg": (0, None, True),
    "train.label_noise": (0, 1, True), "train.log_every": (1, None, True), "model.text_depth": (0, None, True),
    "model.visual_ctx": (1, None, True), "model.visual_depth": (1, None, True),
    "train.lambda_scl_text": (0, None, True), "train.lambda_scl_image": (0, None, True),
    "train.lambda_scl_logits": (0, None, True), "train.gpa_std": (0, None, True)}
NONE_WORDS = ("none", "null", "~", "")     # what "no value" may be typed as, for optional (str | None) fields


class Overrides(dict):
    """{dotted key: value} from `parse_overrides`, remembering each override as typed so that errors quote it:
    `flag` (e.g. "--set") is how the user gave them; without it errors say "override 'train.lr=-1'"."""

    def __init__(self, values=(), typed: Mapping | None = None, flag: str | None = None):
        super().__init__(values)
        self.typed, self.flag = dict(typed or {}), flag

    def label(self, key: str) -> str:
        typed = self.typed.get(key)
        if typed is None:
            return f"override {key!r}"
        if typed.startswith("--"):                      # given by its own flag ("--out DIR")
            return typed
        return f"{self.flag} {typed}" if self.flag else f"override {typed!r}"


def _known_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)]


def _unknown_key(key: str, where: str) -> ValueError:
    """'<where>: unknown field train.epoch; did you mean train.epochs?' (or the known fields of its section)."""
    section = key.partition(".")[0]
    if section not in SECTIONS:
        near = difflib.get_close_matches(section, list(SECTIONS), n=1)
        hint = f"did you mean {near[0]}?" if near else f"the sections are {', '.join(SECTIONS)}"
        return ValueError(f"{where}: unknown section {section!r} in {key}; {hint}")
    name = key.partition(".")[2]
    fields = {s: [f.name for f in dataclasses.fields(c)] for s, c in SECTIONS.items()}
    near = [f"{section}.{n}" for n in difflib.get_close_matches(name, fields[section], n=1, cutoff=0.7)]
    near = near or [f"{s}.{n}" for s in SECTIONS if s != section
                    for n in difflib.get_close_matches(name, fields[s], n=1, cutoff=0.85)]
    if near:
        return ValueError(f"{where}: unknown field {key}; did you mean {near[0]}?")
    names = ", ".join(f.name for f in dataclasses.fields(SECTIONS[section]))
    return ValueError(f"{where}: unknown field {key}; the fields of {section} are {names}")


def _field_type(key: str) -> str:
    section, _, name = key.partition(".")
    return {f.name: str(f.type) for f in dataclasses.fields(SECTIONS[section])}[name]


def convert_value(key: str, value, where: str):
    """`value` as the type of field `key` ("train.lr"): "1e-3" -> 0.001, "none" / "None" / "null" -> None for
    optional fields, "5" -> 5; ValueError '<where>: train.epochs expects an integer, got 'abc''."""
    kind = _field_type(key)
    text = value.strip() if isinstance(value, str) else value
    if kind == "str | None":
        if text is None or (isinstance(text, str) and text.lower() in NONE_WORDS):
            return None
        return str(value)
    if kind == "str":
        if value is None and key == "model.ctx_init":
            return ""                                   # "model.ctx_init=" : random initialisation
        if value is None or isinstance(value, (dict, list)):
            raise ValueError(f"{where}: {key} expects text, got {value!r}")
        return str(value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False,
                 "0": False}
        if str(text).lower() in words:
            return words[str(text).lower()]
        raise ValueError(f"{where}: {key} expects true or false, got {value!r}")
    number = {"int": "an integer", "float": "a number"}[kind]
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        raise ValueError(f"{where}: {key} expects {number}, got {value!r}")
    try:
        out = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key} expects {number}, got {value!r}") from None
    if kind == "float":
        return out
    if not out.is_integer():
        raise ValueError(f"{where}: {key} expects {number}, got {value!r}")
    return int(out)


def check_value(key: str, value, where: str) -> None:
    """ValueError '<where>: train.lr must be > 0, got -1' for a value outside CHOICES / RANGES."""
    if key in CHOICES and value not in CHOICES[key]:
        raise ValueError(f"{where}: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in RANGES:
        low, high, inclusive = RANGES[key]
        if value < low or (value == low and not inclusive) or (high is not None and value > high):
            rule = (f"in [{low}, {high}]" if high is not None else f">= {low}" if inclusive else f"> {low}")
            raise ValueError(f"{where}: {key} must be {rule}, got {value!r}")


@functools.lru_cache(maxsize=64)
def _ctx_tokens(text: str) -> int:
    """Tokens of model.ctx_init in CLIP's BPE (the word count when each word is one token, the common case)."""
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError:                                 # pragma: no cover - open_clip is a dependency
        return len(text.split())
    return len(SimpleTokenizer().encode(text))


def _check_together(cfg: "RunConfig", where, given=frozenset()) -> None:
    """Fields that must agree (errors name both): model.n_ctx against the token count of model.ctx_init (more
    tokens are legal: the first n_ctx start the context, the rest stay fixed words, as the deep-prompt methods
    do); visual prompts against the feature cache; MaPLe's coupling against the text prompts."""
    mc = cfg.model

    def blame(*keys):                                   # the override that made the conflict, else the file
        return next((where(k) for k in keys if k in given), where(keys[0]))

    if mc.ctx_init and len(mc.ctx_init.split()) < mc.n_ctx:
        n = _ctx_tokens(mc.ctx_init)
        if n < mc.n_ctx:
            src = where("model.n_ctx") if where("model.n_ctx") != where("model.ctx_init") else where("model.ctx_init")
            raise ValueError(f"{src}: model.n_ctx = {mc.n_ctx} but model.ctx_init {mc.ctx_init!r} has {n} tokens; "
                             f"change model.ctx_init to {mc.n_ctx} word(s) or more (or '' for a random start), or "
                             f"set model.n_ctx={n}")
    if mc.visual_prompts != "off" and cfg.train.cache_features:
        raise ValueError(f"{blame('model.visual_prompts', 'train.cache_features')}: train.cache_features needs a frozen image tower, but "
                         f"model.visual_prompts={mc.visual_prompts} learns prompts inside it (set one of them off)")
    if mc.visual_prompts == "coupled" and mc.text_depth < 1:
        raise ValueError(f"{blame('model.text_depth', 'model.visual_prompts')}: model.visual_prompts=coupled (MaPLe) projects the learned "
                         f"text tokens: it needs model.text_depth >= 1, got {mc.text_depth}")
    if cfg.train.gpa_std == 0 and cfg.train.gpa_mean:
        raise ValueError(f"{blame('train.gpa_mean', 'train.gpa_std')}: train.gpa_mean is set but train.gpa_std = 0 (no aggregation); "
                         f"set train.gpa_std > 0")


def apply_overrides(cfg: "RunConfig", overrides: Mapping | None, base: str = "config",
                    base_keys: frozenset = frozenset()) -> "RunConfig":
    """A copy of `cfg` with {"section.field": value} applied: each key checked (with a "did you mean"), each value
    converted to the field's type and range-checked; errors name the override as given (`Overrides.label`).
    Values not overridden that came from a file (`base_keys`, from `base`) are checked in its name."""
    ov = overrides if isinstance(overrides, Overrides) else Overrides(overrides or {})
    known = set(_known_keys())
    flat = {f"{s}.{k}": v for s in SECTIONS for k, v in dataclasses.asdict(getattr(cfg, s)).items()}
    for key, value in ov.items():
        if key not in known:
            raise _unknown_key(key, ov.label(key) if "." in key else f"{ov.label(key)} (expected section.field)")
        flat[key] = convert_value(key, value, ov.label(key))

    def where(key):
        return ov.label(key) if key in ov else base if key in base_keys else "config"

    for key, value in flat.items():
        check_value(key, value, where(key))
    sections = {s: {} for s in SECTIONS}
    for key, value in flat.items():
        s, _, name = key.partition(".")
        sections[s][name] = value
    out = RunConfig(**{s: SECTIONS[s](**v) for s, v in sections.items()})
    _check_together(out, where, frozenset(ov))
    return out


def load_config(path: str | os.PathLike | None = None, overrides: Mapping | None = None) -> RunConfig:
    """A RunConfig from a YAML file (sections model, data, train), with dotted overrides {'train.lr': 0.01}
    (or `parse_overrides([...])`). ValueError naming the file for a bad entry in it, the override for a bad one."""
    raw, where = {}, str(path or "config")
    if path is not None:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping with sections model, data, train")
    values = {}
    for section, fields in raw.items():
        if section not in SECTIONS or not isinstance(fields, (dict, type(None))):
            raise _unknown_key(f"{section}.", where) if section not in SECTIONS else ValueError(
                f"{where}: section {section} must be a mapping of fields")
        for name, value in (fields or {}).items():
            key = f"{section}.{name}"
            if key not in _known_keys():
                raise _unknown_key(key, where)
            values[key] = convert_value(key, value, where)
    sections = {s: dataclasses.asdict(getattr(RunConfig(), s)) for s in SECTIONS}
    for key, value in values.items():
        s, _, name = key.partition(".")
        sections[s][name] = value
    cfg = RunConfig(**{s: SECTIONS[s](**v) for s, v in sections.items()})
    return apply_overrides(cfg, overrides, base=where, base_keys=frozenset(values))


def parse_overrides(overrides, flag: str | None = None) -> dict:
    """["train.lr=0.01", "model.conditioning=none"] (values parsed as YAML) or a dict -> {dotted key: value}, an
    `Overrides` that remembers each as typed; `flag` ("--set") is how a command line gave them, for its errors."""
    if overrides is None:
        return Overrides(flag=flag)
    if isinstance(overrides, Overrides):
        return overrides
    if isinstance(overrides, Mapping):
        return Overrides(overrides, flag=flag)
    out, typed = {}, {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or "." not in key or not key.partition(".")[2]:
            label = f"{flag} {item}" if flag else f"override {item!r}"
            raise ValueError(f"{label}: expected SECTION.FIELD=VALUE (e.g. train.lr=0.01)")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key] = value
        if isinstance(out[key], (dict, list)) or out[key] is None and value.strip().lower() not in NONE_WORDS:
            out[key] = value                            # "a: b" or "[x" read as text, converted per field later
        typed[key] = str(item)
    return Overrides(out, typed, flag)


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


def save_config(cfg, path: str | os.PathLike) -> None:
    atomic_write_bytes(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False).encode())
