"""Reader for any ImageFolder tree: `root/<class>/*.jpg`, or `root/{train,val,test}/<class>/*.jpg`.

- With split folders (a `train` or `test` folder in root): the classes are the union of the class folders of
  all splits, sorted by folder name, label = position; a missing split is empty.
- Without: every class's sorted images are split deterministically (seeded shuffle per class, seed 0) into
  50% train / 20% val / 30% test, the proportions of CoOp's `read_and_split_data`; a class with at least one
  image always gets one training image.
Class name = folder name with underscores as spaces; class key = folder name.
"""
from __future__ import annotations

import random
from pathlib import Path

from ._io import display_name, folder_items, list_dirs, require_dir
from .types import SPLITS, DatasetLayoutError, RawSplits

LAYOUT = "root/<class>/<image> or root/{train,val,test}/<class>/<image>"
SPLIT_FRACTIONS = (0.5, 0.2)  # train, val; the rest is test


def read_imagefolder(root: Path) -> RawSplits:
    require_dir(root, "imagefolder", LAYOUT)
    if (root / "train").is_dir() or (root / "test").is_dir():
        return _with_split_folders(root)
    folders = list_dirs(root)
    if not folders:
        raise DatasetLayoutError(f"imagefolder: no class folders in {root}; expected layout: {LAYOUT}")
    names = [display_name(f) for f in folders]
    out = {s: [] for s in SPLITS}
    for label, folder in enumerate(folders):
        items = folder_items(root / folder, label, names[label], root)
        random.Random(f"imagefolder:{folder}").shuffle(items)
        n_train = max(1, round(len(items) * SPLIT_FRACTIONS[0])) if items else 0
        n_val = min(round(len(items) * SPLIT_FRACTIONS[1]), len(items) - n_train)
        out["train"] += sorted(items[:n_train], key=lambda it: it.id)
        out["val"] += sorted(items[n_train:n_train + n_val], key=lambda it: it.id)
        out["test"] += sorted(items[n_train + n_val:], key=lambda it: it.id)
    return RawSplits(names, folders, out["train"], out["val"], out["test"])


def _with_split_folders(root: Path) -> RawSplits:
    present = [s for s in SPLITS if (root / s).is_dir()]
    folders = sorted({f for s in present for f in list_dirs(root / s)})
    if not folders:
        raise DatasetLayoutError(f"imagefolder: no class folders in {', '.join(str(root / s) for s in present)}; "
                                 f"expected layout: {LAYOUT}")
    names = [display_name(f) for f in folders]
    out = {s: [] for s in SPLITS}
    for s in present:
        for label, folder in enumerate(folders):
            if (root / s / folder).is_dir():
                out[s] += folder_items(root / s / folder, label, names[label], root)
    return RawSplits(names, folders, out["train"], out["val"], out["test"])
