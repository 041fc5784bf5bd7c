"""Small file-system and parsing helpers shared by the readers: sorted listings of class folders and image
files, text and JSON files with errors that name the path, the class table built from labelled entries, and
CoOp's class-name normalisation.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .types import DatasetLayoutError, Item

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def display_name(raw: str) -> str:
    """Class name as it goes into a prompt: CoOp's trainers replace underscores with spaces."""
    return raw.replace("_", " ").strip()


def require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(f"{what}: folder {path} not found; expected layout: {layout}")
    return path


def require_file(path: Path, what: str, layout: str) -> Path:
    if not path.is_file():
        raise DatasetLayoutError(f"{what}: file {path} not found; expected layout: {layout}")
    return path


def list_dirs(path: Path) -> list[str]:
    """Names of the non-hidden sub-folders of `path`, sorted."""
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def list_images(path: Path) -> list[str]:
    """Names of the non-hidden image files directly in `path`, sorted."""
    with os.scandir(path) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_file()
                      and e.name.lower().endswith(IMAGE_EXTENSIONS))


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number from 1, stripped text) of the non-empty lines of a text file."""
    with open(path, encoding="utf-8") as f:
        return [(i, s) for i, line in enumerate(f, 1) if (s := line.strip())]


def read_json(path: Path, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetLayoutError(f"{what}: {path} is not valid JSON ({e})") from e


def rel_id(path: Path, root: Path) -> str:
    """The stable id of an image: its path relative to the dataset folder, '/'-separated."""
    return path.relative_to(root).as_posix()


def folder_items(class_dir: Path, label: int, classname: str, root: Path) -> list[Item]:
    """Items for every image in one class folder."""
    return [Item(str(class_dir / f), label, classname, rel_id(class_dir / f, root)) for f in list_images(class_dir)]


def class_table(entries, source: str) -> list[str]:
    """Raw class names indexed by label, from (label, raw classname) pairs.

    Labels must cover 0..N-1 and each label must carry a single name; the same name on two labels is legal.
    """
    names: dict[int, str] = {}
    for label, name in entries:
        if names.setdefault(label, name) != name:
            raise DatasetLayoutError(f"{source}: label {label} is named both {names[label]!r} and {name!r}")
    if not names:
        raise DatasetLayoutError(f"{source}: no labelled images")
    if min(names) < 0:
        raise DatasetLayoutError(f"{source}: negative label {min(names)}")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise DatasetLayoutError(f"{source}: labels must cover 0..{max(names)}; missing {missing[:10]}"
                                 f"{' ...' if len(missing) > 10 else ''}")
    return [names[i] for i in range(len(names))]
