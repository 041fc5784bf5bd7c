"""Evaluation: accuracy of a model on a split through the fast path, base / novel / harmonic mean.

    accuracy(model, items, classnames)                   -> {"acc", "n", "per_class"}
    evaluate_splits(model, splits, subsample="base2novel") -> rows for base, novel and their harmonic mean
    harmonic_mean(base, novel)                            -> the one HM of the package
(rows become tables in `intcoop._io.write_table`)
"""
from __future__ import annotations

from collections import Counter

import torch


__all__ = ["accuracy", "harmonic_mean", "evaluate_splits", "oracle_targets"]


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def oracle_targets(model, ids, labels_by_id: dict | None) -> torch.Tensor | None:
    """[B, D] BLIP-2 label embeddings for attributes='oracle' (NaN rows for images without a label)."""
    if labels_by_id is None:
        return None
    from ..attributes.vocab import attribute_targets

    words = [labels_by_id.get(i) for i in ids]
    t = attribute_targets(words, model.clip, model.tokenizer)
    emb = t.emb.clone()
    emb[~t.valid] = float("nan")
    return emb


def accuracy(model, items, classnames, *, batch_size: int = 64, workers: int = 0, labels_by_id=None,
             progress: bool = True, desc: str = "eval", compile: bool | str | None = None,
             precision: str = "fp32") -> dict:
    """Top-1 accuracy (%) of `model` on `items` (intcoop.data.Item) over `classnames`, with per-class accuracy.
    Images are read and preprocessed as the model's own `preprocess` does (the one evaluation preprocessing:
    training's validation runs this too). compile: the text side under torch.compile (True: inductor; or a
    backend name; None: the faster one for the device). precision: "fp32", "bf16" or "auto" (bf16 autocast on a
    GPU)."""
    from tqdm.auto import tqdm

    from ..data import ImageDataset, make_loader
    from ..inference import batched_logits

    if not items:
        raise ValueError("no images to evaluate")
    suf = model.suffixes(classnames)
    loader = make_loader(ImageDataset(items, model.preprocess), batch_size, shuffle=False, workers=workers)
    labels = []

    def batches():
        for images, y, index in tqdm(loader, desc=desc, disable=not progress, leave=False):
            labels.append(y)
            yield images, oracle_targets(model, [items[i].id for i in index.tolist()], labels_by_id)

    pred = batched_logits(model, batches(), suf, compile=compile, precision=precision)[0].argmax(-1)
    correct, total = Counter(), Counter()
    for y, p in zip(torch.cat(labels).tolist(), pred.tolist()):
        total[y] += 1
        correct[y] += int(y == p)
    n = sum(total.values())
    return {"acc": 100.0 * sum(correct.values()) / n, "n": n,
            "per_class": {classnames[c]: 100.0 * correct[c] / total[c] for c in sorted(total)}}


def evaluate_splits(model, splits, subsample: str = "all", split: str = "test", **kw) -> list[dict]:
    """Rows {dataset, subset, acc, n} for subsample all | base | novel | base2novel (base, novel, HM)."""
    from ..data import subsample_classes

    subsets = ["base", "novel"] if subsample == "base2novel" else [subsample]
    rows = []
    for subset in subsets:
        part = subsample_classes(splits, subset) if subset != "all" else splits
        res = accuracy(model, getattr(part, split), part.classnames, desc=f"{splits.name}/{subset}", **kw)
        rows.append({"dataset": splits.name, "subset": subset, "acc": round(res["acc"], 2), "n": res["n"]})
    if subsample == "base2novel":
        rows.append({"dataset": splits.name, "subset": "HM", "acc": round(harmonic_mean(rows[0]["acc"],
                                                                                      rows[1]["acc"]), 2),
                     "n": rows[0]["n"] + rows[1]["n"]})
    return rows
