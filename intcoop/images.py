"""Image inputs: file paths, PIL images or a preprocessed tensor, checked before any work and turned into [B, 3, H, W].

Every check names the bad input: an unreadable file (its path), a PIL mode that is not a colour or grey image,
a tensor of the wrong rank, channel count, size or dtype, NaN or inf values.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["load_image", "open_all", "to_batch", "check_finite", "ImageInputError"]

# Modes that are images of light (converted to RGB); others (I;16, F, I: measurements) are refused.
_COLOUR_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1", "LAB", "HSV", "RGBX", "RGBa", "La"}


class ImageInputError(ValueError):
    """An image input that cannot be used, with the reason and which input it was."""


def load_image(path: str | os.PathLike):
    """Open an image file fully (so a truncated file fails here), as RGB. Errors name the path."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if p.is_dir():
        raise ImageInputError(f"{p} is a directory, not an image file (give the image files, e.g. {p}/*.jpg)")
    if not p.is_file():
        raise ImageInputError(f"image file not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            return _to_rgb(im, str(p))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageInputError(f"cannot read image {p}: {exc}") from exc


def _to_rgb(im, name: str):
    if im.mode not in _COLOUR_MODES:
        raise ImageInputError(f"image {name} has mode {im.mode!r}; expected a colour or grey image (RGB, L, ...)")
    return im.convert("RGB") if im.mode != "RGB" else im.copy()


def _check_tensor(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if x.dim() == 3:
        raise ImageInputError(f"image tensor has shape {tuple(x.shape)}; expected a batch [B, 3, H, W] "
                              f"(use x.unsqueeze(0) for one image)")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ImageInputError(f"image tensor has shape {tuple(x.shape)}; expected [B, 3, {size[0]}, {size[1]}]")
    if x.shape[0] == 0:
        raise ImageInputError("the image batch is empty")
    if tuple(x.shape[2:]) != tuple(size):
        raise ImageInputError(f"image tensor is {x.shape[2]}x{x.shape[3]} px; this model takes {size[0]}x{size[1]} "
                              f"(apply the model's preprocess, or pass PIL images or paths)")
    if not x.is_floating_point():
        raise ImageInputError(f"image tensor has dtype {x.dtype}; expected floating point, normalised as the "
                              f"model's preprocess does (pass PIL images or paths to have it applied)")
    check_finite(x)
    return x


def check_finite(x: torch.Tensor, what: str = "image tensor") -> None:
    """ImageInputError naming the images [B, ...] of `x` that hold NaN or inf values."""
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ImageInputError(f"{what} has NaN or inf values in image(s) {bad[:10]}")


def open_all(images):
    """Check and open every input that needs no model: a tensor (returned as is), else a list of RGB PIL images
    (paths opened and decoded). Raises ImageInputError naming the first bad input."""
    if isinstance(images, torch.Tensor):
        return images
    from PIL import Image

    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    images = list(images)
    if not images:
        raise ImageInputError("no images given")
    pil = []
    for i, im in enumerate(images):
        if isinstance(im, (str, os.PathLike)):
            pil.append(load_image(im))
        elif isinstance(im, Image.Image):
            pil.append(_to_rgb(im, f"#{i}"))
        else:
            raise ImageInputError(f"image #{i} is a {type(im).__name__}; expected a path, a PIL image or a tensor")
    return pil


def to_batch(images, preprocess, size: tuple[int, int]) -> torch.Tensor:
    """[B, 3, H, W] float tensor from a tensor, one or several PIL images, or paths. All are checked first."""
    images = open_all(images)
    if isinstance(images, torch.Tensor):
        return _check_tensor(images, size)
    return _check_tensor(torch.stack([preprocess(im) for im in images]), size)
