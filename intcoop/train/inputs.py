"""What a training run reads: the model, the training items and the attribute labels (`Trainer` puts them together).

- `build_model(model_config)`, `load_training_data(data_config, seed)`, `check_classes(classnames, items)`.
- `IndexDataset(items)`: the loader's dataset when features are cached (indices, not images).
- Attribute labels: `resolve_labels(labels, items)` (labels file or dict id -> word), `add_label_noise`,
  `attribute_data(trainer, model)` -> `AttributeData` (per item a row of the target table, once per word).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import warnings
from typing import Mapping

import torch

from ..model import IntCoOp

__all__ = ["build_model", "IndexDataset", "TrainingData", "load_training_data",
           "check_classes", "resolve_labels", "add_label_noise", "AttributeData", "attribute_data"]

log = logging.getLogger("intcoop.train")


def build_model(mc) -> IntCoOp:
    """The IntCoOp of a ModelConfig (CLIP from its clip name and pretrained tag). torch's global RNG is seeded with
    mc.seed before the CLIP is built (random weights when pretrained is None) and again before the prompt learner
    (its layers draw from it), then restored: the same config gives the same model (as `sweep` builds it)."""
    from ..clip import load_clip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mc.seed)
        clip = load_clip(mc.clip, mc.pretrained)
        torch.manual_seed(mc.seed)
        return IntCoOp(clip, mc)


@dataclasses.dataclass
class TrainingData:
    train: list
    val: list
    classnames: list
    template: str


def load_training_data(dc, seed: int) -> TrainingData:
    """config.data -> the training items: dataset, `shots` per class (drawn with the run seed, CoOp's cache file
    in the dataset folder when it is writable), then the `subsample` classes (CoOp's order)."""
    from ..data import fewshot_subset, load_dataset
    splits = fewshot_subset(load_dataset(dc.dataset, dc.root), dc.shots, seed, dc.subsample)
    return TrainingData(splits.train, splits.val, list(splits.classnames), splits.template)


class IndexDataset(torch.utils.data.Dataset):
    """items[i] -> (i, label, i): the loader's batches when features are cached (gathered from the cache)."""

    def __init__(self, items):
        self.labels = [it.label for it in items]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return i, self.labels[i], i


def check_classes(classnames, items) -> list[str]:
    """The class list (from the items when None), checked against the items' labels."""
    if not items:
        raise ValueError("no training items")
    if classnames is None:
        names = {}
        for it in items:
            names.setdefault(it.label, it.classname)
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"cannot infer the class list: the items' labels {sorted(names)[:10]} are not 0..n-1; "
                             f"pass classnames=")
        classnames = [names[i] for i in range(len(names))]
    if isinstance(classnames, str):
        raise TypeError("classnames must be a list of names, not one string")
    classnames = list(classnames)
    if not classnames:
        raise ValueError("the class list is empty")
    bad = [it for it in items if not 0 <= it.label < len(classnames)]
    if bad:
        raise ValueError(f"{len(bad)} training item(s) have labels outside 0..{len(classnames) - 1}, e.g. "
                         f"{bad[0].id!r} with label {bad[0].label}")
    return classnames


def resolve_labels(labels, items) -> list[str | None] | None:
    """Per item, its attribute word (None: no label) from a labels file or a dict id -> word / record."""
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        from ..attributes.labels_file import attributes_by_id, read_labels
        mapping = attributes_by_id(read_labels(labels))
    elif isinstance(labels, Mapping):
        mapping = {str(k): (v.get("attribute") if isinstance(v, Mapping) else v) for k, v in labels.items()}
    else:
        raise TypeError(f"labels must be a labels file path or a dict id -> word, got {type(labels).__name__}")
    ids = {it.id for it in items}
    extra = [k for k in mapping if k not in ids]
    if extra:
        warnings.warn(f"{len(extra)} of {len(mapping)} attribute label id(s) are not training items (ignored), "
                      f"e.g. {extra[:3]}")
    words = [mapping.get(it.id) for it in items]
    return [w.strip().lower() if isinstance(w, str) and w.strip() else None for w in words]


def add_label_noise(words: list, p: float, seed: int) -> tuple[list, int]:
    """A seeded fraction p of the labelled images get another label's word. Returns (words, number changed)."""
    rng = random.Random(f"label_noise:{seed}")
    labelled = [i for i, w in enumerate(words) if w is not None]
    pool = sorted(set(words[i] for i in labelled))
    if p <= 0 or not labelled:
        return list(words), 0
    if len(pool) < 2:
        warnings.warn("label_noise: every label has the same word; nothing to swap")
        return list(words), 0
    out = list(words)
    chosen = rng.sample(labelled, round(p * len(labelled)))
    for i in chosen:
        out[i] = rng.choice([w for w in pool if w != words[i]])
    return out, len(chosen)


@dataclasses.dataclass
class AttributeData:
    """Per training item its word (after label noise) and its row of the target table emb [U, D] (-1: none)."""

    words: list
    row: torch.Tensor
    emb: torch.Tensor

    def batch(self, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(target [B, D] float32, valid [B] bool) of the items idx."""
        r = self.row[idx.to(self.row.device)]
        if self.emb.shape[0] == 0:                 # no usable label at all: every row is masked out
            return self.emb.new_zeros(len(idx), self.emb.shape[-1]).to(device), (r >= 0).to(device)
        r = r.to(self.emb.device, non_blocking=True)   # index on the table's device: no implicit blocking copy
        return self.emb[r.clamp_min(0)].to(device, non_blocking=True), (r >= 0).to(device, non_blocking=True)


def attribute_data(trainer, model: IntCoOp) -> AttributeData | None:
    tc, mode = trainer.config.train, model.config.attributes
    words = resolve_labels(trainer.labels, trainer.items)
    if words is None:
        if mode == "oracle":
            raise ValueError("attributes='oracle' trains with the BLIP-2 word in the prompt: it needs labels "
                             "(data.labels or labels=)")
        if mode != "off" and tc.lambda_attr:
            warnings.warn("no attribute labels given: the attribute loss is skipped")
        return None
    if mode == "off" and tc.regulariser != "attribute":
        warnings.warn("attribute labels are not used: the model has no attribute slot (attributes='off')")
        return None
    if tc.label_noise:
        words, changed = add_label_noise(words, tc.label_noise, tc.seed)
        log.info("label_noise=%s: %d labels replaced", tc.label_noise, changed)
    from ..attributes.vocab import attribute_targets
    uniq = sorted({w for w in words if w is not None})
    tg = attribute_targets(uniq, model.clip, model.tokenizer)
    index = {w: i for i, w in enumerate(uniq) if bool(tg.valid[i])}
    row = torch.tensor([index.get(w, -1) if w is not None else -1 for w in words], dtype=torch.long)
    if int((row >= 0).sum()) == 0:
        warnings.warn("no training image has a usable attribute label: the attribute loss is 0")
    words = [w if w in index else None for w in words]
    return AttributeData(words, row, tg.emb.to(trainer.device))
