"""Readers for the ImageNet family in CoOp's layouts: ImageNet, ImageNetV2, ImageNet-Sketch, -A and -R.

Every dataset folder holds CoOp's `classnames.txt` ("<wnid> <class name>" per line, the 1000 classes in
sorted-wnid order, i.e. ImageNet's label order). Labels:
- imagenet:   index in classnames.txt; train = images/train/<wnid>/, test = val = images/val/<wnid>/ (as
              CoOp, which evaluates on the official val set and uses it as val too).
- imagenetv2: the folder number of imagenetv2-matched-frequency-format-val/<label>/, classes = classnames.txt.
- sketch/A/R: CoOp enumerates the sorted <wnid> folders present, so -A and -R are 200-class problems with
              labels 0..199 and the class names of those wnids. The three are evaluation-only (test split).
"""
from __future__ import annotations

from pathlib import Path

from ._io import display_name, folder_items, list_dirs, read_lines, require_dir, require_file
from .imagenet_subsets import SUBSETS
from .types import DatasetLayoutError, RawSplits

FOLDERS = {  # registry name -> (CoOp's dataset folder, image folder inside it)
    "imagenet": ("imagenet", "images"),
    "imagenetv2": ("imagenetv2", "imagenetv2-matched-frequency-format-val"),
    "imagenet_sketch": ("imagenet-sketch", "images"),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a"),
    "imagenet_r": ("imagenet-rendition", "imagenet-r"),
}

LAYOUTS = {
    "imagenet": "imagenet/classnames.txt, imagenet/images/train/<wnid>/*.JPEG, imagenet/images/val/<wnid>/*.JPEG",
    "imagenetv2": "imagenetv2/classnames.txt, imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg",
    "imagenet_sketch": "imagenet-sketch/classnames.txt, imagenet-sketch/images/<wnid>/*.JPEG",
    "imagenet_a": "imagenet-adversarial/classnames.txt, imagenet-adversarial/imagenet-a/<wnid>/*.jpg (200 wnids)",
    "imagenet_r": "imagenet-rendition/classnames.txt, imagenet-rendition/imagenet-r/<wnid>/*.jpg (200 wnids)",
}


def read_classnames(path: Path) -> list[tuple[str, str]]:
    """(wnid, class name) per line of CoOp's classnames.txt, in file order."""
    out, seen = [], set()
    for lineno, line in read_lines(path):
        wnid, _, name = line.partition(" ")
        if not name.strip():
            raise DatasetLayoutError(f"{path}:{lineno}: expected '<wnid> <class name>', got {line!r}")
        if wnid in seen:
            raise DatasetLayoutError(f"{path}:{lineno}: wnid {wnid} listed twice")
        seen.add(wnid)
        out.append((wnid, display_name(name)))
    return out


def read_imagenet_family(dataset_dir: Path, name: str) -> RawSplits:
    layout = LAYOUTS[name]
    table = read_classnames(require_file(dataset_dir / "classnames.txt", name, layout))
    image_dir = require_dir(dataset_dir / FOLDERS[name][1], name, layout)
    if name == "imagenet":
        return _imagenet(dataset_dir, image_dir, table, layout)
    if name == "imagenetv2":
        return _imagenetv2(dataset_dir, image_dir, table)
    return _wnid_folders(dataset_dir, image_dir, table, name)


def _imagenet(dataset_dir, image_dir, table, layout) -> RawSplits:
    label_of = {w: i for i, (w, _) in enumerate(table)}
    splits = {}
    for split in ("train", "val"):
        split_dir = image_dir / split
        items = []
        if split_dir.is_dir():
            for wnid in list_dirs(split_dir):
                if wnid not in label_of:
                    raise DatasetLayoutError(f"imagenet: folder {split_dir / wnid} is not a wnid of "
                                             f"{dataset_dir / 'classnames.txt'}")
                label = label_of[wnid]
                items += folder_items(split_dir / wnid, label, table[label][1], dataset_dir)
        splits[split] = items
    if not (image_dir / "train").is_dir() and not (image_dir / "val").is_dir():
        raise DatasetLayoutError(f"imagenet: neither {image_dir / 'train'} nor {image_dir / 'val'} exists; "
                                 f"expected layout: {layout}")
    names = [n for _, n in table]
    return RawSplits(names, [w for w, _ in table], splits["train"], splits["val"], splits["val"])


def _imagenetv2(dataset_dir, image_dir, table) -> RawSplits:
    items = []
    for folder in list_dirs(image_dir):
        if not folder.isdigit() or int(folder) >= len(table):
            raise DatasetLayoutError(f"imagenetv2: folder {image_dir / folder} is not a label in "
                                     f"0..{len(table) - 1}")
        label = int(folder)
        items += folder_items(image_dir / folder, label, table[label][1], dataset_dir)
    items.sort(key=lambda it: (it.label, it.id))
    return RawSplits([n for _, n in table], [w for w, _ in table], [], [], items)


def _wnid_folders(dataset_dir, image_dir, table, name) -> RawSplits:
    """Sketch / A / R: classes are the wnid folders present, sorted, labelled 0..n-1 (as CoOp)."""
    index = {w: i for i, (w, _) in enumerate(table)}
    wnids = list_dirs(image_dir)
    for wnid in wnids:
        if wnid not in index:
            raise DatasetLayoutError(f"{name}: folder {image_dir / wnid} is not a wnid of "
                                     f"{dataset_dir / 'classnames.txt'}")
        if name in SUBSETS and len(table) == 1000 and index[wnid] not in SUBSETS[name]:
            raise DatasetLayoutError(f"{name}: folder {image_dir / wnid} is not one of the 200 classes of "
                                     f"{name} (is this the right dataset?)")
    if not wnids:
        raise DatasetLayoutError(f"{name}: no class folders in {image_dir}; expected layout: {LAYOUTS[name]}")
    names = [table[index[w]][1] for w in wnids]
    items = []
    for label, wnid in enumerate(wnids):
        items += folder_items(image_dir / wnid, label, names[label], dataset_dir)
    return RawSplits(names, wnids, [], [], items)
