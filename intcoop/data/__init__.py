"""The data layer: dataset readers for CoOp's layouts and ImageFolder trees, the few-shot sampler and the
base/novel split, hand-crafted templates, image loading with CLIP's transforms, and offline demo datasets.

    splits = load_dataset("oxford_pets", "/data")             # Splits(name, classnames, train, val, test, ...)
    splits = fewshot_splits(splits, shots=16, seed=1, cache_dir=splits.root)
    base = subsample_classes(splits, "base")
    loader = make_loader(ImageDataset(base.train, clip_transforms(224, train=True)), 32, shuffle=True, seed=1)

Modules: types (Item, Splits), registry (DATASETS, load_dataset), coop / imagenet / imagefolder (readers),
protocols (few-shot, base/novel), templates, loading, demo / demo_layouts. Does not import the model.
"""
from .protocols import FewShotCacheError, fewshot, fewshot_splits, fewshot_subset, subsample_classes
from .loading import CLIP_MEAN, CLIP_STD, ImageDataset, clip_transforms, make_loader
from .registry import DATASETS, DOMAIN_SHIFT_DATASETS, FEWSHOT_DATASETS, dataset_dir, load_dataset
from .templates import DEFAULT_TEMPLATE, TEMPLATES, template_for
from .types import DatasetLayoutError, Item, Splits

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "DATASETS", "DEFAULT_TEMPLATE", "DOMAIN_SHIFT_DATASETS", "DatasetLayoutError",
    "FEWSHOT_DATASETS", "FewShotCacheError", "ImageDataset", "Item", "Splits", "TEMPLATES",
    "clip_transforms", "dataset_dir", "fewshot", "fewshot_splits", "fewshot_subset", "load_dataset", "make_loader",
    "subsample_classes", "template_for",
]
