"""The dataset registry (name -> how to find and read it) and `load_dataset`.

`root` may be CoOp's DATASET.ROOT (the folder that holds `oxford_pets/`, `imagenet/`, ...) or the dataset
folder itself; for `imagefolder` it is the tree. Errors name what was looked for and the expected layout.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .coop import FGVC_LAYOUT, read_fgvc_aircraft, read_split_json, split_json_layout
from .imagefolder import LAYOUT as IMAGEFOLDER_LAYOUT, read_imagefolder
from .imagenet import FOLDERS as IMAGENET_FOLDERS, LAYOUTS as IMAGENET_LAYOUTS, read_imagenet_family
from .templates import template_for
from .types import DatasetLayoutError, RawSplits, Splits


@dataclass(frozen=True)
class DatasetSpec:
    """name: registry name; folder: CoOp's dataset folder under the root ("" = root itself);
    marker: a file inside the dataset folder that identifies it; layout: human-readable expected layout;
    read: dataset folder -> RawSplits."""

    name: str
    folder: str
    marker: str
    layout: str
    read: Callable[[Path], RawSplits]


SPLIT_JSON_DATASETS = {  # name: (CoOp folder, image folder inside it, split file)
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}


def _build() -> dict[str, DatasetSpec]:
    specs = {}
    for name, (folder, images, split_file) in SPLIT_JSON_DATASETS.items():
        read = functools.partial(read_split_json, name=name, folder=folder, image_subdir=images, split_file=split_file)
        specs[name] = DatasetSpec(name, folder, split_file, split_json_layout(folder, images, split_file), read)
    specs["fgvc_aircraft"] = DatasetSpec("fgvc_aircraft", "fgvc_aircraft", "variants.txt", FGVC_LAYOUT,
                                         read_fgvc_aircraft)
    for name, (folder, _) in IMAGENET_FOLDERS.items():
        specs[name] = DatasetSpec(name, folder, "classnames.txt", IMAGENET_LAYOUTS[name],
                                  functools.partial(read_imagenet_family, name=name))
    specs["imagefolder"] = DatasetSpec("imagefolder", "", "", IMAGEFOLDER_LAYOUT, read_imagefolder)
    return specs


DATASETS: dict[str, DatasetSpec] = _build()

# The method's protocols (METHOD.md): the 11 datasets of base-to-novel / few-shot, ImageNet's variants.
FEWSHOT_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
DOMAIN_SHIFT_DATASETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def dataset_dir(name: str, root: str | os.PathLike) -> Path:
    """The folder that holds dataset `name`: `root/<CoOp folder>` or `root` itself, whichever has the marker."""
    spec = _spec(name)
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DatasetLayoutError(f"{name}: dataset root {root} does not exist or is not a folder; "
                                 f"expected layout: {spec.layout}")
    if not spec.marker:
        return root
    candidates = [root / spec.folder, root]
    for cand in candidates:
        if (cand / spec.marker).is_file():
            return cand
    looked = " or ".join(str(c / spec.marker) for c in candidates)
    raise DatasetLayoutError(f"{name}: {looked} not found; expected layout under the root: {spec.layout}")


def load_dataset(name: str, root: str | os.PathLike) -> Splits:
    """Read dataset `name` (a key of DATASETS) under `root`; see the module docstring for `root`."""
    spec = _spec(name)
    folder = dataset_dir(name, root)
    raw = spec.read(folder)
    return Splits(name=name, classnames=raw.classnames, train=raw.train, val=raw.val, test=raw.test,
                  template=template_for(name), root=str(folder), class_keys=raw.class_keys)


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]
