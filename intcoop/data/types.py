"""The data layer's value types: one labelled image (`Item`), one dataset's splits (`Splits`), what a reader
returns (`RawSplits`), and the errors the readers raise.

Nothing here touches the disk or imports torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

SPLITS = ("train", "val", "test")


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder, split file or annotation file is missing or malformed.

    The message names the path that was looked for and the layout that was expected.
    """


@dataclass(frozen=True)
class Item:
    """One labelled image.

    path:      absolute path of the image file.
    label:     class index in 0..N-1 of the `Splits` it belongs to.
    classname: the class name as it goes into a prompt (CoOp's readers' names, underscores as spaces).
    id:        stable key of the image: its path relative to the dataset folder, with '/' separators
               (used by the few-shot cache and the attribute labels file). Defaults to `path`.
    """

    path: str
    label: int
    classname: str
    id: str = ""

    def __post_init__(self):
        if not self.id:
            object.__setattr__(self, "id", self.path)


@dataclass(frozen=True)
class Splits:
    """One dataset, read: class list, three splits and the hand-crafted prompt template.

    name:       registry name ("oxford_pets", "imagenet", "imagefolder", ...).
    classnames: N prompt-ready class names, index = label. Duplicates are legal (ImageNet has two "crane").
    train, val, test: items; an evaluation-only dataset (ImageNet-V2/-Sketch/-A/-R) has empty train and val.
    template:   hand-crafted prompt with one "{}" for the class name ("a photo of a {}, a type of pet.").
    root:       the dataset folder the items were read from ("" when built in memory).
    class_keys: N stable class keys, index = label: the WordNet id for the ImageNet family, the folder name for
                ImageFolder trees, the class name as written in the split/annotation file otherwise.
    subset:     "all", "base" or "novel" (see `subsample_classes`).
    """

    name: str
    classnames: list[str]
    train: list[Item]
    val: list[Item]
    test: list[Item]
    template: str
    root: str = ""
    class_keys: list[str] = field(default_factory=list)
    subset: str = "all"

    def __post_init__(self):
        if not self.class_keys:
            object.__setattr__(self, "class_keys", list(self.classnames))
        if len(self.class_keys) != len(self.classnames):
            raise ValueError(f"{self.name}: {len(self.class_keys)} class keys for {len(self.classnames)} classes")
        n = len(self.classnames)
        for split in ("train", "val", "test"):
            for item in getattr(self, split):
                if not 0 <= item.label < n:
                    raise ValueError(f"{self.name}: {split} item {item.id} has label {item.label}, "
                                     f"outside 0..{n - 1}")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self) -> list[str]:
        """The hand-crafted prompt of every class, index = label."""
        return [self.template.format(c) for c in self.classnames]

    def replace(self, **changes) -> "Splits":
        return dataclasses.replace(self, **changes)


class RawSplits(NamedTuple):
    """What a reader returns; `registry.load_dataset` adds the name, template and root."""

    classnames: list[str]
    class_keys: list[str]
    train: list[Item]
    val: list[Item]
    test: list[Item]
