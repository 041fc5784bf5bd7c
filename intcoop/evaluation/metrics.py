"""Evaluation: accuracy of a model on a split through the fast path, base / novel / harmonic mean, result tables.

    accuracy(model, items, classnames)                   -> {"acc", "n", "per_class"}
    evaluate_splits(model, splits, subsample="base2novel") -> rows for base, novel and their harmonic mean
    write_table(rows, out_dir, name)                      -> results as CSV and as a markdown table
"""
from __future__ import annotations

import csv
import io
import math
from collections import Counter
from pathlib import Path

import torch

from .config import atomic_write_bytes

__all__ = ["accuracy", "harmonic_mean", "evaluate_splits", "write_table", "markdown_table", "oracle_targets"]


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def oracle_targets(model, ids, labels_by_id: dict | None) -> torch.Tensor | None:
    """[B, D] BLIP-2 label embeddings for attributes='oracle' (NaN rows for images without a label)."""
    if labels_by_id is None:
        return None
    from .vocab import attribute_targets

    words = [labels_by_id.get(i) for i in ids]
    t = attribute_targets(words, model.clip, model.tokenizer)
    emb = t.emb.clone()
    emb[~t.valid] = float("nan")
    return emb


def accuracy(model, items, classnames, *, batch_size: int = 64, workers: int = 0, labels_by_id=None,
             progress: bool = True, desc: str = "eval", compile: bool | str = False) -> dict:
    """Top-1 accuracy (%) of `model` on `items` (intcoop.data.Item) over `classnames`, with per-class accuracy.
    compile: the text side under torch.compile (True: inductor; or a backend name)."""
    from tqdm.auto import tqdm

    from .data import ImageDataset, make_loader
    from .model import logits_function

    if not items:
        raise ValueError("no images to evaluate")
    suf = model.suffixes(classnames)
    logits = logits_function(compile)
    loader = make_loader(ImageDataset(items, model.preprocess), batch_size, shuffle=False, workers=workers)
    correct, total = Counter(), Counter()
    model.eval()
    with torch.inference_mode():
        for images, labels, index in tqdm(loader, desc=desc, disable=not progress, leave=False):
            feats, tokens = model.image_features(images.to(model.device, model.dtype))
            targets = oracle_targets(model, [items[i].id for i in index.tolist()], labels_by_id)
            if targets is not None:
                targets = targets.to(model.device)
            pred = logits(model, feats, tokens, suf, targets).argmax(-1).cpu()
            for y, p in zip(labels.tolist(), pred.tolist()):
                total[y] += 1
                correct[y] += int(y == p)
    n = sum(total.values())
    return {"acc": 100.0 * sum(correct.values()) / n, "n": n,
            "per_class": {classnames[c]: 100.0 * correct[c] / total[c] for c in sorted(total)}}


def evaluate_splits(model, splits, subsample: str = "all", split: str = "test", **kw) -> list[dict]:
    """Rows {dataset, subset, acc, n} for subsample all | base | novel | base2novel (base, novel, HM)."""
    from .data import subsample_classes

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


def markdown_table(rows: list[dict]) -> str:
    """A GitHub markdown table of the rows (columns in first-seen order)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float) and not math.isnan(v):
            return f"{v:.1e}" if 0 < abs(v) < 0.01 else f"{v:.2f}"
        return str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], out_dir, name: str = "results") -> tuple[Path, Path]:
    """Write rows as <out_dir>/<name>.csv and <name>.md (atomically); return both paths."""
    out = Path(out_dir)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out / f"{name}.csv", buf.getvalue().encode())
    atomic_write_bytes(out / f"{name}.md", markdown_table(rows).encode())
    return out / f"{name}.csv", out / f"{name}.md"
