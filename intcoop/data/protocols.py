"""The evaluation protocols' data side: the K-shot sampler with its cache file, and the base/novel class split.

- `fewshot(items, shots, seed)`: K items per class, the same for the same (items, K, seed) whatever the input
  order (each class's items are sorted by id, then drawn by a RNG seeded with (seed, label)); a class with
  fewer than K items keeps them all.
- `fewshot_splits(splits, shots, seed, cache_dir)`: CoOp's recipe, K shots from train and min(K, 4) from val,
  cached in `<cache_dir>/split_fewshot/shot_{K}-seed_{S}.json` (written atomically). A cache that does not
  match the dataset (other images or labels, other K or seed, truncated file) is rejected with an error that
  names the file: delete it to draw again. CoOp's own caches are pickles (.pkl) and are not read.
  The protocols follow CoOp's order: draw the shots on all classes, then `subsample_classes`.
- `subsample_classes(splits, "all" | "base" | "novel")`: classes by label, the first ceil(N/2) are base, the
  rest novel, labels remapped to 0..n-1 (CoOp's `subsample_classes`; "new" is accepted for "novel").
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections import defaultdict
from pathlib import Path

from .._io import atomic_write_bytes
from .types import Item, Splits

CACHE_FORMAT = "intcoop-fewshot-v1"
VAL_SHOTS_MAX = 4  # CoOp: val gets min(K, 4) shots per class


class FewShotCacheError(ValueError):
    """A few-shot cache file is unreadable or belongs to other data; the message names the file."""


def fewshot(items: list[Item], shots: int, seed: int) -> list[Item]:
    """K = `shots` items per label (all of a label's items if it has fewer), sorted by (label, id)."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    by_label: dict[int, list[Item]] = defaultdict(list)
    for it in items:
        by_label[it.label].append(it)
    out = []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda it: it.id)
        if len(group) > shots:
            group = sorted(random.Random(f"{seed}:{label}").sample(group, shots), key=lambda it: it.id)
        out += group
    return out


def fewshot_splits(splits: Splits, shots: int, seed: int, cache_dir: str | os.PathLike | None = None) -> Splits:
    """`splits` with train = K shots, val = min(K, 4) shots; test untouched. Cached when `cache_dir` is given."""
    val_shots = min(shots, VAL_SHOTS_MAX)
    if cache_dir is None:
        return splits.replace(train=fewshot(splits.train, shots, seed), val=fewshot(splits.val, val_shots, seed))
    path = cache_path(cache_dir, shots, seed, splits.subset)
    if path.exists():
        train, val = read_cache(path, splits, shots, seed)
    else:
        train, val = fewshot(splits.train, shots, seed), fewshot(splits.val, val_shots, seed)
        write_cache(path, splits, shots, seed, train, val)
    return splits.replace(train=train, val=val)


def fewshot_subset(splits: Splits, shots: int, seed: int, subset: str = "all") -> Splits:
    """What training and labelling read: `shots` per class (0 = all) drawn with `seed` and cached as CoOp does in
    the dataset folder when that folder is writable (else drawn again, the same), then the `subset` classes."""
    if shots > 0:
        cache = splits.root if splits.root and os.access(splits.root, os.W_OK) else None
        splits = fewshot_splits(splits, shots, seed, cache_dir=cache)
    return subsample_classes(splits, subset) if subset != "all" else splits


def cache_path(cache_dir: str | os.PathLike, shots: int, seed: int, subset: str = "all") -> Path:
    """CoOp's name, `split_fewshot/shot_{K}-seed_{S}.json`; `-base` / `-novel` added for a class subset."""
    suffix = "" if subset == "all" else f"-{subset}"
    return Path(cache_dir) / "split_fewshot" / f"shot_{shots}-seed_{seed}{suffix}.json"


def fingerprint(items: list[Item]) -> str:
    """sha256 of the sorted (id, label) pairs: what a cache must agree with."""
    h = hashlib.sha256()
    for key in sorted(f"{it.id}\t{it.label}" for it in items):
        h.update(key.encode())
        h.update(b"\n")
    return h.hexdigest()


def write_cache(path: Path, splits: Splits, shots: int, seed: int, train: list[Item], val: list[Item]) -> None:
    """Write the cache atomically: a temporary file in the same folder, then os.replace."""
    doc = {
        "format": CACHE_FORMAT, "dataset": splits.name, "subset": splits.subset, "shots": shots, "seed": seed,
        "num_classes": splits.num_classes,
        "source": {"train": fingerprint(splits.train), "val": fingerprint(splits.val)},
        "train": [[it.id, it.label, it.classname] for it in train],
        "val": [[it.id, it.label, it.classname] for it in val],
    }
    atomic_write_bytes(path, json.dumps(doc).encode("utf-8"))


def read_cache(path: Path, splits: Splits, shots: int, seed: int) -> tuple[list[Item], list[Item]]:
    """The cached (train, val) as items of `splits`; FewShotCacheError if the file does not match."""
    def fail(why: str):
        raise FewShotCacheError(f"few-shot cache {path} rejected: {why}; delete it to draw the shots again")

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"unreadable ({e})")
    if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT:
        fail(f"not an {CACHE_FORMAT} file")
    expected = {"dataset": splits.name, "subset": splits.subset, "shots": shots, "seed": seed,
                "num_classes": splits.num_classes}
    for key, value in expected.items():
        if doc.get(key) != value:
            fail(f"{key} is {doc.get(key)!r}, expected {value!r}")
    out = []
    for split in ("train", "val"):
        source = getattr(splits, split)
        recorded = doc.get("source")
        if not isinstance(recorded, dict) or recorded.get(split) != fingerprint(source):
            fail(f"the dataset's {split} split has changed since the cache was written")
        by_id = {it.id: it for it in source}
        entries = doc.get(split)
        if not isinstance(entries, list):
            fail(f"no {split} list")
        chosen = []
        for e in entries:
            it = by_id.get(e[0]) if isinstance(e, list) and len(e) == 3 else None
            if it is None or it.label != e[1]:
                fail(f"{split} entry {e!r} is not an image of the dataset with that label")
            chosen.append(it)
        out.append(chosen)
    return out[0], out[1]


def subsample_classes(splits: Splits, subset: str) -> Splits:
    """Keep the base (first ceil(N/2) labels) or novel (the rest) classes, relabelled 0..n-1; "all" = as is."""
    subset = {"new": "novel"}.get(subset, subset)
    if subset not in ("all", "base", "novel"):
        raise ValueError(f"subset must be 'all', 'base' or 'novel', got {subset!r}")
    if subset == "all":
        return splits
    if splits.subset != "all":
        raise ValueError(f"{splits.name} is already the {splits.subset} subset")
    n = splits.num_classes
    m = math.ceil(n / 2)
    keep = range(m) if subset == "base" else range(m, n)
    relabel = {old: new for new, old in enumerate(keep)}

    def items(lst):
        return [Item(it.path, relabel[it.label], it.classname, it.id) for it in lst if it.label in relabel]

    return splits.replace(classnames=[splits.classnames[i] for i in keep],
                          class_keys=[splits.class_keys[i] for i in keep],
                          train=items(splits.train), val=items(splits.val), test=items(splits.test), subset=subset)
