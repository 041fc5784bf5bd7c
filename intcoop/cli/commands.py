"""The commands info, label, train, eval, logits and demo: each a thin layer over the Python API (the parsers are
in `intcoop.cli.__init__`; explain / attributes and experiment / ablate have their own files)."""
from __future__ import annotations

import json

from .._io import table
from .common import classnames, trained_model, zero_shot_model

__all__ = ["cmd_info", "cmd_label", "cmd_train", "cmd_eval", "cmd_logits", "cmd_demo"]


# --- info ---------------------------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    import platform

    import torch

    from ..ops import _ext, dispatch

    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception as exc:
            return f"not available ({type(exc).__name__})"

    print(f"intcoop {version('intcoop')}  python {platform.python_version()}  torch {torch.__version__} "
          f"(CUDA {torch.version.cuda or 'none'})  triton {version('triton')}  open_clip {version('open_clip')}  "
          f"transformers {version('transformers')}")
    print(f"devices: cpu ({torch.get_num_threads()} threads)"
          + (f", cuda: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no CUDA device"))
    print(f"compiled core intcoop._C: {_ext.load_error() or 'built'}")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(f"backends on {device}:")
        for name, status, detail in dispatch.report(device):
            print(f"  {name:7s} {status:24s} {detail}")
    forced = dispatch.forced_backend()
    print(f"{dispatch.ENV}={forced or 'auto'}")
    from ..clip import DEFAULT_MODEL, DEFAULT_PRETRAINED, activation_plan
    quick, why = activation_plan(DEFAULT_MODEL, DEFAULT_PRETRAINED)
    print(f"default CLIP: {DEFAULT_MODEL} pretrained={DEFAULT_PRETRAINED!r}: activation "
          f"{'quick_gelu' if quick else 'gelu'} ({why})")
    return 0


# --- label --------------------------------------------------------------------------------------------------------
def _splits(args):
    from ..data import fewshot_subset, load_dataset

    return fewshot_subset(load_dataset(args.dataset, args.root), args.shots, args.seed, args.subsample)


def cmd_label(args) -> int:
    from ..attributes.blip2 import label_images

    splits = _splits(args)
    items = [(it.id, it.path, it.classname) for it in getattr(splits, args.split)]
    extra = {"question": args.question} if args.question else {}
    stats = label_images(items, args.out, model=args.model, batch_size=args.batch_size, device=args.device, **extra)
    print(stats.summary())
    return 0


# --- train --------------------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .train import run_from_args

    run_from_args(args, summary=True)
    return 0


# --- eval ---------------------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from ..data import load_dataset
    from ..evaluation.metrics import evaluate_splits
    from .._io import write_table
    from ..attributes.labels_file import attributes_by_id, read_labels
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = trained_model(args).to(device)
    if args.precision:                                          # after the checkpoint's CLIP was verified
        model.set_precision(args.precision)
    if args.attributes:
        model.set_attributes(args.attributes)
    labels = attributes_by_id(read_labels(args.labels)) if args.labels else None
    splits = load_dataset(args.dataset, args.root)
    rows = evaluate_splits(model, splits, args.subsample, args.split, batch_size=args.batch_size,
                           workers=args.workers, labels_by_id=labels, compile=args.compile)
    csv_path, md_path = write_table(rows, args.out, f"eval_{splits.name}_{args.subsample}")
    print(md_path.read_text(), end="")
    print(f"written: {csv_path}, {md_path}")
    return 0


# --- logits -------------------------------------------------------------------------------------------------------
def cmd_logits(args) -> int:
    from .. import api
    from ..images import open_all

    if args.top < 1:
        raise ValueError(f"--top must be a positive integer, got {args.top}")
    names = classnames(args.classes)
    open_all(args.images)                                       # every file readable before the model loads
    model = trained_model(args) if args.checkpoint else zero_shot_model(args)
    if args.precision:                                          # after the checkpoint's CLIP was verified
        model.set_precision(args.precision)
    logits = api.fast_logits(args.images, names, model)
    scores = logits.softmax(-1) if args.probs else logits
    what = "probability" if args.probs else "logit"
    k = min(args.top, len(names))
    if args.json:
        for path, row in zip(args.images, scores):
            top = row.topk(k)
            print(json.dumps({"image": str(path), "top": [{"class": names[i], what: round(float(v), 4)}
                                                          for v, i in zip(*top)]}))
        return 0
    rows = []
    for path, row in zip(args.images, scores):
        for rank, (v, i) in enumerate(zip(*row.topk(k)), 1):
            rows.append([str(path) if rank == 1 else "", rank, names[i], f"{float(v):.4f}"])
    print(table(rows, ["image", "rank", "class", what], right={1, 3}))
    if not args.probs:
        print("logit = exp(logit_scale) * cos(image, text); --probs for softmax probabilities, --json for JSON")
    return 0


# --- demo ---------------------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from ..demo.run import run_demo

    run_demo(args.out, clip=args.clip, classes=args.classes, shots=args.shots, epochs=args.epochs,
             test_per_class=args.test_per_class, lr=args.lr)
    return 0


