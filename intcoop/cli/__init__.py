"""The `intcoop` command line: every parser, and `main`. Commands live beside it (commands.py: info, label, train,
eval, logits, demo; explain.py: explain, attributes; experiment.py: experiment, ablate; train.py: the training
flags, also `python -m intcoop train`). Library modules own no argparse.

Errors about the user's input print one clear line (no traceback) and exit with status 2.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from . import commands, experiment, explain
    from .common import add_clip_arguments, add_precision_argument
    from .train import add_train_arguments

    p = argparse.ArgumentParser(prog="intcoop", description="Fast, exact, interpretable IntCoOp prompt tuning "
                                "of CLIP: label, train, evaluate, explain.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions, devices, and which op backends are built and usable here")
    s.set_defaults(fn=commands.cmd_info)

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
    s.set_defaults(fn=commands.cmd_label)

    s = add_train_arguments(sub.add_parser("train", help="train prompts from a YAML config (see intcoop/configs/)"))
    s.set_defaults(fn=commands.cmd_train)

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
    add_precision_argument(s, "the checkpoint's model.precision")
    add_clip_arguments(s, with_checkpoint=True)
    s.set_defaults(fn=commands.cmd_eval)

    s = sub.add_parser("logits", help="top classes of image files (a table; --json), with a checkpoint or CLIP "
                       "zero-shot")
    s.add_argument("images", nargs="+")
    s.add_argument("--classes", required=True, help="a file with one class name per line, or 'cat,dog,...'")
    s.add_argument("--checkpoint", default=None, help="trained checkpoint (default: CLIP zero-shot)")
    s.add_argument("--top", type=int, default=5, help="classes shown per image")
    s.add_argument("--probs", action="store_true", help="softmax probabilities instead of logits")
    s.add_argument("--json", action="store_true", help="JSON lines, one object per image, instead of a table")
    add_precision_argument(s, "the checkpoint's, fp32 for zero-shot")
    add_clip_arguments(s, with_checkpoint=False)
    s.set_defaults(fn=commands.cmd_logits)

    from ..demo.run import DEMO_DEFAULTS as D
    s = sub.add_parser("demo", help="label (tiny BLIP-2), train and evaluate on Fashion-MNIST (train split -> "
                       "held-out test split), offline, on the CPU")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--clip", default=D["clip"], help=f"open_clip model name, random weights (default {D['clip']})")
    s.add_argument("--classes", type=int, default=D["classes"], help="Fashion-MNIST classes (1-10)")
    s.add_argument("--shots", type=int, default=D["shots"], help="training images per class (official train split)")
    s.add_argument("--test-per-class", type=int, default=D["test_per_class"],
                   help="test images per class (official test split)")
    s.add_argument("--epochs", type=int, default=D["epochs"])
    s.add_argument("--lr", type=float, default=D["lr"], help="SGD learning rate")
    s.set_defaults(fn=commands.cmd_demo)

    _add_or_report(sub, ("explain", "attributes"), lambda: explain.add_parser(sub))
    _add_or_report(sub, ("experiment", "ablate"), lambda: experiment.add_parser(sub))
    return p


class _RandomWeightsNote(logging.Filter):
    """open_clip's "No pretrained weights loaded for model 'X'. Model initialized randomly." (logged for every
    CLIP built with pretrained=None) becomes one line of intcoop's own per model: random weights were asked for."""

    PATTERN = re.compile(r"No pretrained weights loaded for model '([^']*)'")

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        m = self.PATTERN.match(str(record.msg))
        if m is None:
            return True
        if m.group(1) not in self.seen:
            self.seen.add(m.group(1))
            print(f"note: CLIP {m.group(1)} has random weights (as asked: pretrained none)", file=sys.stderr)
        return False


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as `intcoop` prints it: one line, its category and message, without the source line."""
    from .common import cli_terms

    text = cli_terms(" ".join(str(message).split()))
    return f"warning: {text}\n" if category is UserWarning else f"warning ({category.__name__}): {text}\n"


def _add_or_report(sub, names, add) -> None:
    """Add subcommands; if building their parser fails to import something (a broken install), each of them
    still exists and, when used, prints that import error instead of vanishing from `intcoop --help`."""
    try:
        add()
    except ImportError as exc:
        for name in names:
            s = sub.add_parser(name, help=f"(unavailable: {exc})", add_help=False)
            s.add_argument("rest", nargs=argparse.REMAINDER)
            s.set_defaults(fn=_raise(exc))


def _raise(exc: ImportError):
    def fn(args):
        raise exc
    return fn


def main(argv=None) -> int:
    from ..clip import WeightsUnavailable
    from ..images import ImageInputError
    from .common import cli_terms

    args = build_parser().parse_args(argv)
    from ..attributes.blip2 import ModelUnavailableError
    from ..attributes.labels_file import LabelsFileError

    user_errors = (ValueError, FileNotFoundError, ImageInputError, WeightsUnavailable, KeyError, LabelsFileError,
                   ModelUnavailableError, IsADirectoryError)
    note = _RandomWeightsNote()
    root = logging.getLogger()
    root.addFilter(note)
    saved_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        return args.fn(args)
    except user_errors as exc:
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"intcoop {args.command}: error: {cli_terms(str(text))}", file=sys.stderr)
        return 2
    except ImportError as exc:                # a module this command needs does not import: say which and why
        print(f"intcoop {args.command}: error: cannot import what this command needs: {exc} "
              f"(reinstall with `make setup`, or `pip install -r requirements.txt`)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"intcoop {args.command}: interrupted; what was written so far is kept", file=sys.stderr)
        return 130
    finally:
        root.removeFilter(note)
        warnings.formatwarning = saved_format


if __name__ == "__main__":
    sys.exit(main())
