"""Rewrite a small labelled dataset (an ImageFolder tree or a `Splits`) in the directory layout and split files
of one CoOp dataset, so that the readers can be tested on real images without the real datasets.

What is written, per registry name (images are copied; class i gets the fake wnid "n%08d" % i):
- split-json datasets: `<folder>/<image folder>/...` + `<folder>/split_zhou_<Name>.json` (class names as the
  source's class keys, e.g. "ankle_boot", like CoOp's files), file names in each dataset's style.
- fgvc_aircraft: images/<id>.jpg, variants.txt, images_variant_{train,val,test}.txt.
- imagenet: classnames.txt, images/train/<wnid>/ (source train), images/val/<wnid>/ (source test).
- imagenetv2: classnames.txt, imagenetv2-matched-frequency-format-val/<label>/ (source test).
- imagenet_sketch / imagenet_a / imagenet_r: classnames.txt with every class, image folders only for
  `classes` (default all) from the source test split; -A and -R also get the README.txt their archives carry.
- imagefolder: `<dest>/{train,val,test}/<key>/`.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

from ..data.imagenet import FOLDERS as IMAGENET_FOLDERS
from ..data.registry import DATASETS, SPLIT_JSON_DATASETS, load_dataset
from ..data.types import SPLITS, Splits


def write_coop_layout(name: str, source: Splits | str | os.PathLike, dest_root: str | os.PathLike,
                      classes: Sequence[int] | None = None) -> Path:
    """Write `source` under `dest_root` in dataset `name`'s CoOp layout; return the dataset folder.

    source: a `Splits` or an ImageFolder tree (e.g. from `build_demo_dataset`).
    classes: source labels that get an image folder (ImageNet-Sketch/-A/-R only; default all).
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    src = source if isinstance(source, Splits) else load_dataset("imagefolder", source)
    out = Path(dest_root) / DATASETS[name].folder
    out.mkdir(parents=True, exist_ok=True)
    if name in SPLIT_JSON_DATASETS:
        _split_json(name, src, out)
    elif name == "fgvc_aircraft":
        _fgvc(src, out)
    elif name in IMAGENET_FOLDERS:
        _imagenet_family(name, src, out, range(src.num_classes) if classes is None else classes)
    else:  # imagefolder
        for split in SPLITS:
            for k, it in enumerate(getattr(src, split)):
                key = src.class_keys[it.label]
                _copy(it.path, out / split / key / f"{key}_{k:04d}.jpg")
    return out


def wnid(label: int) -> str:
    """The fake WordNet id given to class `label` (sorted like the labels)."""
    return f"n{label:08d}"


def _copy(src: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _relpath(name: str, split: str, key: str, n: int) -> str:
    if name == "oxford_pets":
        return f"{key}_{n}.jpg"
    if name == "oxford_flowers":
        return f"image_{n:05d}.jpg"
    if name == "stanford_cars":
        return f"cars_{'test' if split == 'test' else 'train'}/{n:05d}.jpg"
    if name == "sun397":
        return f"{key[0]}/{key}/sun_{n:06d}.jpg"
    return f"{key}/{key}_{n:04d}.jpg"


def _split_json(name: str, src: Splits, out: Path) -> None:
    _, image_subdir, split_file = SPLIT_JSON_DATASETS[name]
    counter = itertools.count(1)
    doc = {}
    for split in SPLITS:
        entries = []
        for it in getattr(src, split):
            key = src.class_keys[it.label]
            rel = _relpath(name, split, key, next(counter))
            _copy(it.path, out / image_subdir / rel)
            entries.append([rel, it.label, key])
        doc[split] = entries
    (out / split_file).write_text(json.dumps(doc, indent=1), encoding="utf-8")


def _fgvc(src: Splits, out: Path) -> None:
    (out / "variants.txt").write_text("".join(f"{c}\n" for c in src.classnames), encoding="utf-8")
    counter = itertools.count(1000001)
    for split in SPLITS:
        lines = []
        for it in getattr(src, split):
            image = str(next(counter))
            _copy(it.path, out / "images" / f"{image}.jpg")
            lines.append(f"{image} {src.classnames[it.label]}\n")
        (out / f"images_variant_{split}.txt").write_text("".join(lines), encoding="utf-8")


def _imagenet_family(name: str, src: Splits, out: Path, classes: Sequence[int]) -> None:
    (out / "classnames.txt").write_text("".join(f"{wnid(i)} {c}\n" for i, c in enumerate(src.classnames)),
                                        encoding="utf-8")
    image_dir = out / IMAGENET_FOLDERS[name][1]
    image_dir.mkdir(parents=True, exist_ok=True)
    if name == "imagenet":
        pairs = [("train", src.train), ("val", src.test)]
        for folder, items in pairs:
            for k, it in enumerate(items):
                _copy(it.path, image_dir / folder / wnid(it.label) / f"{wnid(it.label)}_{k}.JPEG")
        return
    if name == "imagenetv2":
        for k, it in enumerate(src.test):
            _copy(it.path, image_dir / str(it.label) / f"{k:06d}.jpeg")
        return
    keep = set(classes)
    for k, it in enumerate(src.test):
        if it.label in keep:
            _copy(it.path, image_dir / wnid(it.label) / f"{k:06d}.jpg")
    if name in ("imagenet_a", "imagenet_r"):
        (image_dir / "README.txt").write_text(f"{name} (written by intcoop.data.demo_layouts)\n", encoding="utf-8")
