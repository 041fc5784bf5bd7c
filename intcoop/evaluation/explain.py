"""Interpretability (METHOD.md): what a model predicts for an image and why, and how good its attribute words are.

    explain(images, classnames, model=None, *, labels_by_id=None, ids=None, k=5) -> list[dict], one per image
    attribute_quality(model, items, labels_by_id, *, batch_size=32, out_dir=None) -> dict
    the CLI subcommands `intcoop explain` and `intcoop attributes` (add_parser)
Rendering (report.json / .png / .html) is in `report.py`.

One result of explain (plain lists, floats and strings: JSON as it is):
    image           the path as given, or "#i" for a PIL image / tensor row
    id              the key looked up in labels_by_id (ids[i], else the path as given, else None)
    top             k dicts {"class", "index", "prob"}: softmax over the N classes of the logits that
                    fast_logits computes (the same calls), best first
    attribute_mode  the model's attributes switch (predicted | oracle | shuffled | off)
    attributes      k dicts {"word", "cos"}: the words of CLIP's token vocabulary nearest (cosine) to the predicted
                    attribute embedding (the mean of the K attribute tokens, as the attribute loss trains it);
                    None without an attribute slot
    attribute_tokens  K lists of such dicts, one per attribute token (None without a slot)
    blip2           BLIP-2's word for the image (labels_by_id), or None
    attention       {"grid": [gh, gw], "context": ["v1", ..], "maps": [M][gh][gw], "cls": [M]} or None:
                    each context token's cross-attention over the patch tokens, mean over heads, the class token's
                    weight in "cls" and the patches' weights reshaped row-major to the grid (maps + cls sum to 1)
    notes           sentences on what is absent or how to read it (no attribute slot, no attention, ...)
"""
from __future__ import annotations

import math
import os

import torch

__all__ = ["explain", "attribute_quality", "summary_line"]


# ------------------------------------------------------------------------------------------------- helpers
def _label_word(value):
    """A labels mapping's value: a word, None, or a labels-file record (its "attribute")."""
    if isinstance(value, dict):
        value = value.get("attribute")
    return value if value is None or (isinstance(value, str) and value.strip()) else None


def _find_label(labels_by_id: dict, key):
    """(word, matched id) for key: an exact id, else the longest id that key ends with at a '/' boundary (a
    dataset-relative id such as "test/cat/1.jpg" for the path "/data/pets/test/cat/1.jpg")."""
    if key is None:
        return None, None
    if key in labels_by_id:
        return _label_word(labels_by_id[key]), key
    path = str(key).replace(os.sep, "/")
    hits = [i for i in labels_by_id if isinstance(i, str) and i and path.endswith("/" + i.lstrip("/"))]
    if not hits:
        return None, None
    best = max(hits, key=len)
    return _label_word(labels_by_id[best]), best


def _names(images) -> list[str | None] | None:
    """The path as given of each input (a path, a PIL image or a list of them), None for a PIL image."""
    from PIL import Image

    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    try:
        return [str(im) if isinstance(im, (str, os.PathLike)) else None for im in images]
    except TypeError:       # not iterable: to_batch names the problem
        return None


def _grid(model, L: int) -> tuple[int, int]:
    gs = getattr(model.clip.visual, "grid_size", None)
    if gs is not None and int(gs[0]) * int(gs[1]) == L - 1:
        return int(gs[0]), int(gs[1])
    side = math.isqrt(L - 1)
    if side * side != L - 1:
        raise ValueError(f"cannot lay {L - 1} patch tokens on a square grid (class token + patches expected)")
    return side, side


def _words(decoded) -> list[dict]:
    return [{"word": w, "cos": float(c)} for w, c in decoded]


# ------------------------------------------------------------------------------------------------- explain
def explain(images, classnames, model=None, *, labels_by_id: dict | None = None, ids=None, k: int = 5,
            batch_size: int = 64, max_rows: int = 1 << 16) -> list[dict]:
    """Per image: top-k classes, decoded attribute words, BLIP-2's word and the context tokens' attention maps.

    images: paths, PIL images or a preprocessed [B, 3, H, W] tensor (as fast_logits). classnames: N names.
    model: an IntCoOp (None: the default zero-shot model, which has no attribute slot). labels_by_id:
    {image id: word or None} (labels.attributes_by_id) or {id: record}. ids: B image ids (default: the path as
    given). k: classes and words shown. Inputs are checked before any work. See the module docstring.
    """
    from ..clip import image_size
    from .metrics import oracle_targets
    from ..images import to_batch
    from ..inference import batched_logits, check_inputs, default_model
    from ..attributes.vocab import decode
    from PIL import Image

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if labels_by_id is not None and not isinstance(labels_by_id, dict):
        raise TypeError(f"labels_by_id must be a dict id -> word, got {type(labels_by_id).__name__}")
    if not isinstance(classnames, str):
        classnames = list(classnames)
    if not isinstance(images, (torch.Tensor, str, os.PathLike, Image.Image)) and hasattr(images, "__iter__"):
        images = list(images)                                   # a generator is read once
    paths = None if isinstance(images, torch.Tensor) else _names(images)
    if model is None:                                           # check the inputs before loading weights
        images, _ = check_inputs(images, classnames)
        if ids is not None and len(ids) != len(images):
            raise ValueError(f"{len(ids)} ids for {len(images)} images")
        model = default_model()
    suf = model.suffixes(classnames)                            # validates the class list
    names = classnames
    x = to_batch(images, model.preprocess, image_size(model.clip))
    B = x.shape[0]
    paths = paths or [None] * B
    if ids is not None:
        ids = [None if i is None else str(i) for i in ids]
        if len(ids) != B:
            raise ValueError(f"{len(ids)} ids for {B} images")
    else:
        ids = paths
    if labels_by_id is not None and all(i is None for i in ids):
        raise ValueError("labels_by_id is keyed by image id: pass ids= for PIL images or tensors")
    found = [_find_label(labels_by_id, i) if labels_by_id is not None else (None, None) for i in ids]
    mode = model.attributes_mode
    targets = None
    if mode == "oracle":
        if labels_by_id is None:
            raise ValueError("attributes='oracle' needs BLIP-2 labels: pass labels_by_id")
        targets = oracle_targets(model, [m for _, m in found], {m: w for w, m in found if m is not None})
    attention = model.config.conditioning == "attention"
    has_slot = model.prompt.attr is not None

    def extra(feats, tokens):
        pred = model.prompt.attributes(feats).float().cpu() if has_slot else None                 # [b, K, D]
        maps = (model.prompt.cond.attention_maps(model.prompt.ctx, tokens).float().mean(2).cpu()  # [b, M, L]
                if attention else None)
        return pred, maps

    chunks = ((x[s:s + batch_size], targets[s:s + batch_size] if targets is not None else None)
              for s in range(0, B, batch_size))
    logits, extras = batched_logits(model, chunks, suf, max_rows=max_rows, extra=extra)
    preds, maps = [p for p, _ in extras], [m for _, m in extras]
    probs = logits.softmax(-1)
    top = probs.topk(min(k, probs.shape[1]), dim=-1)

    if has_slot:
        pred = torch.cat(preds)
        words = decode(pred.mean(1), model.clip, model.tokenizer, k)
        per_token = [decode(pred[:, j], model.clip, model.tokenizer, k) for j in range(pred.shape[1])]
    if attention:
        att = torch.cat(maps)
        gh, gw = _grid(model, att.shape[-1])

    notes = []
    if getattr(model.config, "pretrained", "?") is None and getattr(model, "clip_name", "custom") != "custom":
        notes.append(f"the CLIP ({model.config.clip}) has random weights (pretrained none): its classes, words and "
                     "maps show the pipeline, not what a trained CLIP sees")
    if not has_slot:
        notes.append("no attribute words: this model has no attribute slot (attributes='off'; the default "
                     "zero-shot model has none)")
    elif mode == "shuffled":
        notes.append("attributes='shuffled': the prompt used another image's attribute token; the words shown are "
                     "this image's own prediction")
    elif mode == "oracle":
        notes.append("attributes='oracle': the prompt used BLIP-2's word where known; the words shown are the "
                     "model's own prediction")
    if not attention:
        notes.append(f"no attention maps: conditioning={model.config.conditioning!r} does not attend to patch "
                     "tokens (only 'attention' does)")

    results = []
    for b in range(B):
        r = {"image": paths[b] if paths[b] is not None else f"#{b}", "id": ids[b],
             "top": [{"class": names[i], "index": int(i), "prob": float(v)}
                     for v, i in zip(top.values[b].tolist(), top.indices[b].tolist())],
             "attribute_mode": mode,
             "attributes": _words(words[b]) if has_slot else None,
             "attribute_tokens": [_words(t[b]) for t in per_token] if has_slot else None,
             "blip2": found[b][0], "attention": None, "notes": list(notes)}
        if attention:
            a = att[b]                                                                  # [M, L]
            r["attention"] = {"grid": [gh, gw], "context": [f"v{j + 1}" for j in range(a.shape[0])],
                              "maps": a[:, 1:].reshape(-1, gh, gw).tolist(), "cls": a[:, 0].tolist()}
        if labels_by_id is not None and found[b][1] is None:
            r["notes"].append(f"no BLIP-2 label for id {ids[b]!r}")
        results.append(r)
    return results


def summary_line(result: dict, n: int = 3) -> str:
    """One line for a terminal: image, top classes, attribute words, BLIP-2's word."""
    top = ", ".join(f"{t['class']} {t['prob']:.3f}" for t in result["top"][:n])
    if result.get("attributes") is not None:
        attr = ", ".join(f"{w['word']} ({w['cos']:.2f})" for w in result["attributes"][:n])
    else:
        attr = "none (no attribute slot)"
    line = f"{result['image']}: {top} | attribute: {attr}"
    return line + (f" | BLIP-2: {result['blip2']}" if result.get("blip2") else "")


# ---------------------------------------------------------------------------------------- attribute quality
def attribute_quality(model, items, labels_by_id: dict, *, batch_size: int = 32, out_dir=None,
                      name: str = "attributes", workers: int = 0) -> dict:
    """Agreement of decoded attribute words with BLIP-2's labels over `items` (intcoop.data.Item list).

    Per class and overall (vocab.agreement on the mean of the K predicted attribute tokens): "top1", "top5"
    (fraction of labelled images whose label is among the 1 / 5 nearest vocabulary words), "mean_cos" (mean
    cosine between prediction and the label's target embedding), "n" labelled, "unlabelled".
    Returns {"overall": {...}, "per_class": {classname: {...}}, "rows": table rows, "files": [csv, md] or []};
    with out_dir the rows are written by evaluate.write_table as <name>.csv / <name>.md.
    """
    from ..data import ImageDataset, make_loader
    from .._io import write_table
    from ..attributes.vocab import agreement

    if model.prompt.attr is None:
        raise ValueError("this model has no attribute slot (attributes='off'): it predicts no attribute words")
    items = list(items)
    if not items:
        raise ValueError("no images to measure")
    if not isinstance(labels_by_id, dict):
        raise TypeError(f"labels_by_id must be a dict id -> word, got {type(labels_by_id).__name__}")
    words = [_label_word(labels_by_id.get(it.id)) for it in items]
    if all(w is None for w in words):
        raise ValueError(f"none of the {len(items)} images has a label in the labels given (ids such as "
                         f"{items[0].id!r}): is it the labels file of this dataset and split?")
    loader = make_loader(ImageDataset(items, model.preprocess), batch_size, shuffle=False, workers=workers)
    pred = torch.empty(len(items), model.prompt.attr.width)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, _, index in loader:
                feats, _ = model.image_features(images.to(model.device, model.dtype))
                pred[index] = model.prompt.attributes(feats).float().mean(1).cpu()
    finally:
        model.train(was_training)
    overall = agreement(pred, words, model.clip, model.tokenizer)
    by_class: dict[str, list[int]] = {}
    for i, it in sorted(enumerate(items), key=lambda p: (p[1].label, p[0])):
        by_class.setdefault(it.classname, []).append(i)
    per_class = {c: agreement(pred[idx], [words[i] for i in idx], model.clip, model.tokenizer)
                 for c, idx in by_class.items()}
    cols = ("n", "unlabelled", "top1", "top5", "mean_cos")
    rows = [{"class": c, **{f: a[f] for f in cols}} for c, a in per_class.items()]
    rows.append({"class": "all", **{f: overall[f] for f in cols}})
    files = list(write_table(rows, out_dir, name)) if out_dir is not None else []
    return {"overall": overall, "per_class": per_class, "rows": rows, "files": files}
