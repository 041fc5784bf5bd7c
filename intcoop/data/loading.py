"""From items to batches: `ImageDataset` (images read by `intcoop.images.load_image`, the one image loader), CLIP's
transforms and a reproducible `make_loader`.

Reproducibility: for each pass, `make_loader` draws the order of the items and one seed per item from a
generator seeded with (seed, pass), and applies each item's transform under its own seed. A run's batches,
augmentations included, are therefore the same for the same seed whatever the number of workers (0
included) and whatever else uses the global RNGs.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from ..images import load_image
from .types import Item

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_transforms(image_size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                    train: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> float32 [3, image_size, image_size].

    test:  resize the shorter side to image_size (bicubic), center crop, normalise (CLIP's preprocessing).
    train: CoOp's augmentation: random resized crop (scale 0.08..1, bicubic), horizontal flip, normalise.
    """
    bicubic = T.InterpolationMode.BICUBIC
    if train:
        head = [T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=bicubic), T.RandomHorizontalFlip()]
    else:
        head = [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size)]
    return T.Compose(head + [T.ToTensor(), T.Normalize(mean, std)])


class ImageDataset(Dataset):
    """items[i] -> (image [3, S, S] float32, label, i). transform defaults to `clip_transforms()` (test)."""

    def __init__(self, items: Sequence[Item], transform: Callable | None = None):
        self.items = list(items)
        self.transform = transform if transform is not None else clip_transforms()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        return self.transform(load_image(item.path)), item.label, index


class _SeededSampler(Sampler):
    """Yields (index, seed) pairs: a permutation (or 0..n-1) and one seed per position, drawn from a generator
    seeded with (seed, epoch). The epoch advances after every pass; `set_epoch(e)` jumps to pass e (resume).

    With num_replicas > 1 every rank draws the same pairs (same seed), pads them by wrapping around to a
    multiple of num_replicas (as DistributedSampler does) and keeps positions rank, rank + R, ...
    """

    def __init__(self, n: int, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0
        self.num_replicas, self.rank = num_replicas, rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.num_replicas)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, dtype=np.uint32)
        g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        self.epoch += 1
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g)
        pairs = list(zip(order.tolist(), seeds.tolist()))
        if self.num_replicas > 1 and pairs:
            total = len(self) * self.num_replicas
            pairs = (pairs * math.ceil(total / len(pairs)))[:total][self.rank::self.num_replicas]
        return iter(pairs)


class _PerSampleSeed(Dataset):
    """Wraps a map-style dataset: dataset[(i, s)] = dataset[i] computed with torch, random and numpy seeded by s;
    the global RNG states are restored afterwards."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _seed_worker(worker_id: int) -> None:
    """Seed python's and numpy's RNGs of a worker from its torch seed (itself derived from the loader's seed)."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, workers: int = 0, seed: int = 0,
                drop_last: bool = False, pin_memory: bool = False, num_replicas: int = 1, rank: int = 0) -> DataLoader:
    """A DataLoader over `dataset` (any map-style dataset) whose order and augmentations depend on `seed` only.

    Pass e over the loader (e = 0, 1, ...) draws its order and per-item seeds from (seed, e): epochs differ
    from each other, the whole run repeats for the same seed, and `loader.sampler.set_epoch(e)` resumes at
    pass e. `loader.dataset.dataset` is `dataset`.
    num_replicas / rank: distributed training; give every rank the same seed, each gets its own share
    (padded by wrapping around so that all ranks have ceil(n / num_replicas) items).
    """
    generator = torch.Generator().manual_seed(seed)  # only seeds the workers' base seed
    sampler = _SeededSampler(len(dataset), shuffle, seed, num_replicas, rank)
    return DataLoader(_PerSampleSeed(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=drop_last, pin_memory=pin_memory, generator=generator,
                      worker_init_fn=_seed_worker if workers > 0 else None,
                      persistent_workers=False)
