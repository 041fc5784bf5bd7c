"""The `intcoop` command line: info, label, train, eval, logits, demo (and explain / experiment when present).

Each subcommand is a thin layer over the Python API; errors about the user's input print one clear line
(no traceback) and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]


# --- info ---------------------------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    import platform

    import torch

    from .ops import _ext, dispatch

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
    return 0


# --- label --------------------------------------------------------------------------------------------------------
def _splits(args):
    from .data import fewshot_splits, load_dataset, subsample_classes

    splits = load_dataset(args.dataset, args.root)
    if getattr(args, "shots", 0):
        splits = fewshot_splits(splits, args.shots, args.seed, cache_dir=splits.root)
    if getattr(args, "subsample", "all") in ("base", "novel"):
        splits = subsample_classes(splits, args.subsample)
    return splits


def cmd_label(args) -> int:
    from .labels import label_images

    splits = _splits(args)
    items = [(it.id, it.path, it.classname) for it in getattr(splits, args.split)]
    extra = {"question": args.question} if args.question else {}
    stats = label_images(items, args.out, model=args.model, batch_size=args.batch_size, device=args.device, **extra)
    print(stats.summary())
    return 0


# --- train --------------------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .train_cli import run_from_args

    run_from_args(args)
    return 0


# --- eval ---------------------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from .data import load_dataset
    from .evaluate import evaluate_splits, write_table
    from .labels import attributes_by_id, read_labels
    from .checkpoint import load_trained

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_trained(args.checkpoint).to(device)
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
def _classnames(value: str) -> list[str]:
    path = Path(value)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no class names in {value!r} (a file with one name per line, or a comma list)")
    return names


def cmd_logits(args) -> int:
    import intcoop

    model = None
    if args.checkpoint:
        from .checkpoint import load_trained
        model = load_trained(args.checkpoint)
    names = _classnames(args.classes)
    logits = intcoop.fast_logits(args.images, names, model)
    probs = logits.softmax(-1)
    out = []
    for path, p in zip(args.images, probs):
        top = p.topk(min(args.top, len(names)))
        out.append({"image": str(path), "top": [[names[i], round(float(v), 4)] for v, i in zip(*top)]})
    print(json.dumps(out, indent=1))
    return 0


# --- demo ---------------------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, clip=args.clip, classes=args.classes, shots=args.shots, epochs=args.epochs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="intcoop", description="Fast, exact, interpretable IntCoOp prompt tuning "
                                "of CLIP: label, train, evaluate, explain.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions, devices, and which op backends are built and usable here")
    s.set_defaults(fn=cmd_info)

    def data_args(s, split="train"):
        s.add_argument("--dataset", default="imagefolder", help="dataset name (intcoop.data.DATASETS)")
        s.add_argument("--root", required=True, help="dataset folder (CoOp layout or ImageFolder)")
        s.add_argument("--split", default=split, choices=["train", "val", "test"])

    s = sub.add_parser("label", help="BLIP-2 attribute labels for a split, as a JSON-lines file (resumable)")
    data_args(s)
    s.add_argument("--shots", type=int, default=0, help="label only a K-shot sample (0 = every image)")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--subsample", default="all", choices=["all", "base", "novel"])
    s.add_argument("--out", required=True, help="labels file to write (JSON lines)")
    s.add_argument("--model", default="Salesforce/blip2-opt-2.7b", help="BLIP-2 Hugging Face id or local folder")
    s.add_argument("--question", default=None, help="question template; {} is the class name")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--device", default=None)
    s.set_defaults(fn=cmd_label)

    from .train_cli import add_train_arguments
    s = add_train_arguments(sub.add_parser("train", help="train prompts from a YAML config (see intcoop/configs/)"))
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("eval", help="accuracy of a checkpoint on a split (base / novel / harmonic mean)")
    s.add_argument("--checkpoint", required=True)
    data_args(s, "test")
    s.add_argument("--subsample", default="all", choices=["all", "base", "novel", "base2novel"])
    s.add_argument("--labels", default=None, help="labels file, for attributes=oracle")
    s.add_argument("--attributes", default=None, choices=["predicted", "oracle", "shuffled"],
                   help="override the attribute mode at test time (ablations)")
    s.add_argument("--out", default="runs/eval")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--workers", type=int, default=0)
    s.add_argument("--device", default=None, help="default: cuda when there is a GPU, else cpu")
    s.add_argument("--compile", action="store_true", help="the text side under torch.compile (inductor)")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("logits", help="top classes of image files (JSON), with a checkpoint or CLIP zero-shot")
    s.add_argument("images", nargs="+")
    s.add_argument("--classes", required=True, help="a file with one class name per line, or 'cat,dog,...'")
    s.add_argument("--checkpoint", default=None)
    s.add_argument("--top", type=int, default=5)
    s.set_defaults(fn=cmd_logits)

    s = sub.add_parser("demo", help="label (tiny BLIP-2), train and evaluate on a small real-image set, on CPU")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--clip", default="ViT-B-16", help="open_clip model name (random weights; offline)")
    s.add_argument("--classes", type=int, default=5)
    s.add_argument("--shots", type=int, default=16)
    s.add_argument("--epochs", type=int, default=10)
    s.set_defaults(fn=cmd_demo)

    for name in ("explain", "experiment"):
        try:
            mod = __import__(f"intcoop.{name}", fromlist=["add_parser"])
        except ImportError:
            continue
        mod.add_parser(sub)
    return p


def main(argv=None) -> int:
    from .backbone import WeightsUnavailable
    from .images import ImageInputError

    args = build_parser().parse_args(argv)
    user_errors = (ValueError, FileNotFoundError, ImageInputError, WeightsUnavailable, KeyError)
    try:
        from .labels import LabelsFileError, ModelUnavailableError
        user_errors += (LabelsFileError, ModelUnavailableError)
    except ImportError:
        pass
    try:
        return args.fn(args)
    except user_errors as exc:
        print(f"intcoop {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"intcoop {args.command}: interrupted; what was written so far is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
