"""Small datasets of REAL images, written to disk offline, for demos, tests and CI.

Sources (nothing is downloaded):
- "fashion_mnist": Zalando's Fashion-MNIST (MIT licence), 10 classes of clothing photos, 28x28 grey, as
  Debian's package `dataset-fashion-mnist` installs them in /usr/share/datasets/fashion-mnist
  (`apt-get install -y dataset-fashion-mnist`; or point INTCOOP_FASHION_MNIST_DIR at a folder holding
  the four `*-ubyte.gz` files). Images are inverted (dark object on white, like a product photo), upscaled
  (bicubic) and saved as RGB JPEG. Train images come from the official train file, val and test from t10k.
  The best source for a demo a model can learn: many different images per class.
- "photos": the sample photographs bundled with scikit-image (`skimage.data`) and scikit-learn
  (`load_sample_images`); one photo per class, each image a seeded random crop (and flip) of it.

`build_demo_dataset` writes an ImageFolder tree `root/{train,val,test}/<class>/*.jpg` that
`load_dataset("imagefolder", root)` reads; `write_coop_layout` (in `demo_layouts`) rewrites such a tree in
any CoOp layout to test the readers.
"""
from __future__ import annotations

import functools
import gzip
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .layouts import write_coop_layout

__all__ = ["build_demo_dataset", "write_coop_layout", "photo", "PHOTOS", "FASHION_MNIST_CLASSES",
           "DemoSourceError", "fashion_mnist_dir"]

FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle_boot")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DemoSourceError(FileNotFoundError):
    """A demo image source is not installed; the message says how to install it."""


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("INTCOOP_FASHION_MNIST_DIR", DEFAULT_FASHION_MNIST_DIR))


@functools.lru_cache(maxsize=2)
def _fashion_mnist(part: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels uint8 [n]) of the 'train' or 't10k' part."""
    folder = fashion_mnist_dir()
    paths = [folder / f for f in FASHION_MNIST_FILES[part]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DemoSourceError(f"Fashion-MNIST not found: missing {', '.join(missing)}. Install Debian's package "
                              f"(apt-get install -y dataset-fashion-mnist) or set INTCOOP_FASHION_MNIST_DIR to a "
                              f"folder with {', '.join(f for pair in FASHION_MNIST_FILES.values() for f in pair)}")
    images, labels = (_read_idx(p) for p in paths)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DemoSourceError(f"Fashion-MNIST files in {folder} have unexpected shapes {images.shape}, {labels.shape}")
    return images, labels


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian magic 0x0000 08 <ndim>, then ndim uint32 sizes, then uint8)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise DemoSourceError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load():
        import skimage.data
        return getattr(skimage.data, name)()
    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load():
        from sklearn.datasets import load_sample_image
        return load_sample_image(filename)
    return load


# Class name -> loader of one photograph (all ship inside the scikit-image / scikit-learn wheels).
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"), "coffee": _skimage("coffee"), "cat": _skimage("chelsea"),
    "rocket": _skimage("rocket"), "temple": _sklearn("china.jpg"), "flower": _sklearn("flower.jpg"),
    "cameraman": _skimage("camera"), "coins": _skimage("coins"), "moon": _skimage("moon"),
    "brick": _skimage("brick"), "grass": _skimage("grass"), "gravel": _skimage("gravel"),
}


@functools.lru_cache(maxsize=None)
def _photo_array(name: str) -> np.ndarray:
    if name not in PHOTOS:
        raise KeyError(f"unknown photo {name!r}; known: {', '.join(PHOTOS)}")
    try:
        arr = PHOTOS[name]()
    except (ImportError, OSError, ValueError) as e:
        raise DemoSourceError(f"sample photo {name!r} is not available ({type(e).__name__}: {e}); it ships with "
                              f"scikit-image / scikit-learn (pip install scikit-image scikit-learn)") from e
    return np.ascontiguousarray(arr)


def photo(name: str, size: int | None = None) -> Image.Image:
    """One bundled photograph as an RGB PIL image (resized to size x size when given)."""
    im = Image.fromarray(_photo_array(name)).convert("RGB")
    return im.resize((size, size), Image.Resampling.BICUBIC) if size else im


def build_demo_dataset(root: str | os.PathLike, classes: int | Sequence[str] | None = None, per_class: int = 16,
                       val_per_class: int = 4, test_per_class: int | None = None, size: int = 224, seed: int = 0,
                       source: str = "fashion_mnist", overwrite: bool = False) -> Path:
    """Write `root/{train,val,test}/<class>/<class>_<n>.jpg` and `root/SOURCE.txt`; return root.

    classes: None = every class of the source, an int k = the first k, or a list of class names.
    per_class / val_per_class / test_per_class (default per_class): images per class in each split.
    size: side of the square RGB images. seed: which images (and, for "photos", which crops) are chosen.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} is not empty; pass overwrite=True to replace it")
        shutil.rmtree(root)
    counts = {"train": per_class, "val": val_per_class, "test": per_class if test_per_class is None else test_per_class}
    if source == "fashion_mnist":
        names = _pick(FASHION_MNIST_CLASSES, classes)
        images = _fashion_mnist_images(names, counts, size, seed)
        note = ("Fashion-MNIST (Zalando SE, MIT licence), from Debian's dataset-fashion-mnist: inverted, upscaled "
                "28 -> {size} px (bicubic). train from the official train set, val/test from t10k.")
    elif source == "photos":
        names = _pick(tuple(PHOTOS), classes)
        images = _photo_images(names, counts, size, seed)
        note = ("One sample photograph per class from scikit-image / scikit-learn; each image is a seeded random "
                "crop (scale 0.3-1, random flip) resized to {size} px.")
    else:
        raise ValueError(f"unknown demo source {source!r}; use 'fashion_mnist' or 'photos'")
    for split, per_class_images in images.items():
        for name, ims in zip(names, per_class_images):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k, im in enumerate(ims):
                im.save(folder / f"{name}_{k:04d}.jpg", quality=95)
    (root / "SOURCE.txt").write_text(note.format(size=size) + f"\nclasses: {', '.join(names)}; seed {seed}; "
                                     f"per class: {counts}\n", encoding="utf-8")
    return root


def _pick(available: tuple[str, ...], classes) -> list[str]:
    if classes is None:
        return list(available)
    if isinstance(classes, int):
        if not 1 <= classes <= len(available):
            raise ValueError(f"classes must be in 1..{len(available)}, got {classes}")
        return list(available[:classes])
    unknown = [c for c in classes if c not in available]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; available: {', '.join(available)}")
    return list(classes)


def _fashion_mnist_images(names, counts, size, seed) -> dict[str, list[list[Image.Image]]]:
    rng = np.random.default_rng(seed)
    out = {s: [] for s in counts}
    for name in names:
        c = FASHION_MNIST_CLASSES.index(name)
        for part, splits in (("train", ("train",)), ("t10k", ("val", "test"))):
            arrays, labels = _fashion_mnist(part)
            pool = rng.permutation(np.flatnonzero(labels == c))
            need = sum(counts[s] for s in splits)
            if need > len(pool):
                raise ValueError(f"Fashion-MNIST {part} has {len(pool)} images of {name}; {need} requested")
            start = 0
            for s in splits:
                chosen = pool[start:start + counts[s]]
                start += counts[s]
                out[s].append([_fmnist_image(arrays[i], size) for i in chosen])
    return out


def _fmnist_image(arr: np.ndarray, size: int) -> Image.Image:
    return Image.fromarray(255 - arr).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def _photo_images(names, counts, size, seed) -> dict[str, list[list[Image.Image]]]:
    rng = np.random.default_rng(seed)
    out = {s: [] for s in counts}
    for name in names:
        im = photo(name)
        w, h = im.size
        for s, n in counts.items():
            crops = []
            for _ in range(n):
                side = int(min(w, h) * np.sqrt(rng.uniform(0.3, 1.0)))
                x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                crop = im.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BICUBIC)
                crops.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
            out[s].append(crops)
    return out
