"""`intcoop explain` (per-image reports) and `intcoop attributes` (attribute-word quality): parsers and commands."""
from __future__ import annotations

from pathlib import Path

from .common import add_clip_arguments

__all__ = ["add_parser"]


def _load(args):
    from .common import trained_model, zero_shot_model

    if args.checkpoint:
        return trained_model(args, args.device)
    model = zero_shot_model(args)
    return model.to(args.device) if args.device else model


def cmd_explain(args) -> int:
    from .common import classnames as _classnames
    from ..evaluation.explain import explain, summary_line
    from ..evaluation.report import write_report
    from ..images import open_all
    from ..attributes.labels_file import attributes_by_id, read_labels

    names = _classnames(args.classes)
    if args.top < 1:
        raise ValueError(f"--top must be a positive integer, got {args.top}")
    open_all(args.images)                                       # every file readable before the model loads
    labels = attributes_by_id(read_labels(args.labels)) if args.labels else None
    model = _load(args)
    results = explain(args.images, names, model, labels_by_id=labels, k=args.top)
    paths = write_report(results, args.images, args.out)
    for r in results:
        print(summary_line(r))
    for note in dict.fromkeys(n for r in results for n in r["notes"] if not n.startswith("no BLIP-2 label")):
        print(f"note: {note}")
    print(f"report: {paths['html']} (also {paths['png'].name}, {paths['json'].name} in {Path(args.out)})")
    return 0


def cmd_attributes(args) -> int:
    from ..data import load_dataset
    from ..evaluation.explain import attribute_quality
    from ..attributes.labels_file import attributes_by_id, read_labels

    model = _load(args)
    labels = attributes_by_id(read_labels(args.labels))
    splits = load_dataset(args.dataset, args.root)
    res = attribute_quality(model, getattr(splits, args.split), labels, batch_size=args.batch_size,
                            out_dir=args.out, name=f"attributes_{splits.name}_{args.split}", workers=args.workers)
    csv_path, md_path = res["files"]
    print(md_path.read_text(), end="")
    print(f"written: {csv_path}, {md_path}")
    return 0


def add_parser(sub) -> None:
    """Add `explain` and `attributes` to the `intcoop` command's subparsers."""
    s = sub.add_parser("explain", help="top classes, attribute words, BLIP-2's word and attention maps of images "
                       "(report.html / .png / .json)")
    s.add_argument("images", nargs="+", help="image files")
    s.add_argument("--classes", required=True, help="a file with one class name per line, or 'cat,dog,...'")
    s.add_argument("--checkpoint", default=None, help="trained checkpoint (default: CLIP zero-shot, no attributes)")
    s.add_argument("--labels", default=None, help="BLIP-2 labels file (JSON lines), keyed by image id or path")
    s.add_argument("--out", default="runs/explain", help="folder for report.html, report.png, report.json")
    s.add_argument("--top", type=int, default=5, help="classes and attribute words shown per image")
    s.add_argument("--device", default=None)
    add_clip_arguments(s, with_checkpoint=False)
    s.set_defaults(fn=cmd_explain)

    s = sub.add_parser("attributes", help="agreement of a checkpoint's attribute words with BLIP-2's labels")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--dataset", default="imagefolder", help="dataset name (intcoop.data.DATASETS)")
    s.add_argument("--root", required=True, help="dataset folder (CoOp layout or ImageFolder)")
    s.add_argument("--labels", required=True, help="BLIP-2 labels file of the split (JSON lines)")
    s.add_argument("--split", default="test", choices=["train", "val", "test"])
    s.add_argument("--out", default="runs/attributes")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--workers", type=int, default=0)
    s.add_argument("--device", default=None)
    add_clip_arguments(s, with_checkpoint=True)
    s.set_defaults(fn=cmd_attributes)
