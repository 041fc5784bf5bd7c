"""Readers for the CoOp datasets that ship a fixed split: the `split_zhou_*.json` datasets (Caltech101,
OxfordPets, StanfordCars, Flowers102, Food101, SUN397, DTD, EuroSAT, UCF101) and FGVCAircraft's
annotation files.

A split file is `{"train": [[relative_path, label, classname], ...], "val": [...], "test": [...]}` with paths
relative to the dataset's image folder and 0-based labels, exactly as CoOp's `OxfordPets.save_split` writes
it. Like CoOp we read the published split and never re-split: a missing split file is an error (CoOp's
DATASETS.md links every one of them).
"""
from __future__ import annotations

import posixpath
from pathlib import Path

from ._io import class_table, display_name, read_json, read_lines, require_dir, require_file
from .types import SPLITS, DatasetLayoutError, Item, RawSplits


def split_json_layout(folder: str, image_subdir: str, split_file: str) -> str:
    images = f"{folder}/{image_subdir}/" if image_subdir else f"{folder}/"
    return (f"{images}<images> and {folder}/{split_file} = {{'train'|'val'|'test': [[path relative to "
            f"{images}, label, classname], ...]}} (CoOp's split file; see CoOp's DATASETS.md)")


def read_split_json(dataset_dir: Path, *, name: str, folder: str, image_subdir: str, split_file: str) -> RawSplits:
    """Read `<dataset_dir>/<split_file>`; images live under `<dataset_dir>/<image_subdir>`.

    `folder` is CoOp's name of the dataset folder (for error messages only).
    """
    layout = split_json_layout(folder, image_subdir, split_file)
    path = require_file(dataset_dir / split_file, name, layout)
    image_dir = require_dir(dataset_dir / image_subdir, name, layout)
    data = read_json(path, name)
    if not isinstance(data, dict) or any(not isinstance(data.get(s), list) for s in SPLITS):
        raise DatasetLayoutError(f"{name}: {path} must hold lists 'train', 'val' and 'test'; layout: {layout}")
    raw = {s: [_entry(e, path, s, k) for k, e in enumerate(data[s])] for s in SPLITS}
    table = class_table(((label, c) for s in SPLITS for _, label, c in raw[s]), str(path))
    names = [display_name(c) for c in table]

    def items(entries):
        return [Item(str(image_dir / rel), label, names[label], posixpath.normpath(posixpath.join(image_subdir, rel)))
                for rel, label, _ in entries]

    return RawSplits(names, table, items(raw["train"]), items(raw["val"]), items(raw["test"]))


def _entry(e, path: Path, split: str, k: int) -> tuple[str, int, str]:
    ok = isinstance(e, (list, tuple)) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[2], str)
    try:
        label = int(e[1]) if ok else None
    except (TypeError, ValueError):
        label = None
    if label is None:
        raise DatasetLayoutError(f"{path}: {split}[{k}] is {e!r}; expected [relative_path, label, classname]")
    return e[0], label, e[2]


FGVC_LAYOUT = ("fgvc_aircraft/images/<id>.jpg, fgvc_aircraft/variants.txt (one class per line) and "
               "fgvc_aircraft/images_variant_{train,val,test}.txt ('<id> <variant>' per line)")


def read_fgvc_aircraft(dataset_dir: Path) -> RawSplits:
    """FGVCAircraft: classes from variants.txt (index = label), splits from images_variant_<split>.txt."""
    name = "fgvc_aircraft"
    variants_path = require_file(dataset_dir / "variants.txt", name, FGVC_LAYOUT)
    image_dir = require_dir(dataset_dir / "images", name, FGVC_LAYOUT)
    keys = [s for _, s in read_lines(variants_path)]
    label_of = {v: i for i, v in enumerate(keys)}
    names = [display_name(v) for v in keys]
    out = {}
    for split in SPLITS:
        path = require_file(dataset_dir / f"images_variant_{split}.txt", name, FGVC_LAYOUT)
        items = []
        for lineno, line in read_lines(path):
            image, _, variant = line.partition(" ")
            if variant not in label_of:
                raise DatasetLayoutError(f"{path}:{lineno}: variant {variant!r} is not in {variants_path}")
            label = label_of[variant]
            items.append(Item(str(image_dir / f"{image}.jpg"), label, names[label], f"images/{image}.jpg"))
        out[split] = items
    return RawSplits(names, keys, out["train"], out["val"], out["test"])
