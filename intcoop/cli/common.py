"""What several subcommands share: the class list given on the command line, the CLIP choice (--clip,
--pretrained) and the model it builds, aligned tables, and error messages put in the command line's terms."""
from __future__ import annotations

import re
from pathlib import Path

__all__ = ["classnames", "add_clip_arguments", "add_precision_argument", "pretrained_value", "zero_shot_model",
           "trained_model", "cli_terms", "NONE_WORDS", "UNSET"]

NONE_WORDS = ("none", "null", "~")        # --pretrained none / None / null: random weights
UNSET = object()                          # --clip / --pretrained not given


def classnames(value: str) -> list[str]:
    """Class names from --classes: a file with one name per line, or a comma list ("cat,dog,tree frog")."""
    path = Path(value)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--classes: no class names in {value!r} (a file with one name per line, or a comma list)")
    return names


def add_clip_arguments(s, with_checkpoint: bool) -> None:
    """--clip NAME and --pretrained TAG|FILE|none. with_checkpoint: they replace the checkpoint's CLIP (same
    architecture, e.g. its weights from a local file); else they choose the zero-shot CLIP (default ViT-B-16,
    openai)."""
    what = "default: the checkpoint's" if with_checkpoint else "default: ViT-B-16"
    s.add_argument("--clip", default=UNSET, metavar="NAME", help=f"open_clip model name ({what})")
    s.add_argument("--pretrained", default=UNSET, metavar="TAG|FILE|none",
                   help="open_clip pretrained tag, a local checkpoint file, or none for random weights ("
                   + ("default: the checkpoint's)" if with_checkpoint else "default: openai)"))


def add_precision_argument(s, default: str) -> None:
    """--precision: the dtype the frozen CLIP is stored and run in (ModelConfig.precision)."""
    s.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help=f"dtype the frozen CLIP is stored and run in (default: {default})")


def pretrained_value(value):
    """--pretrained as load_clip takes it: None for none / None / null, a tag, or an existing file path."""
    if value is UNSET or value is None:
        return value
    if value.strip().lower() in NONE_WORDS:
        return None
    looks_like_file = "/" in value or Path(value).suffix.lower() in (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
    if looks_like_file and not Path(value).exists():
        raise FileNotFoundError(f"--pretrained {value}: no such file (give an open_clip pretrained tag, a local "
                                f"checkpoint file, or none for random weights)")
    if looks_like_file and Path(value).is_dir():
        raise ValueError(f"--pretrained {value}: is a directory, not a checkpoint file")
    return value


def zero_shot_model(args):
    """CLIP zero-shot ("a photo of a {c}.", no attribute slot) on --clip / --pretrained."""
    from ..clip import DEFAULT_MODEL, DEFAULT_PRETRAINED, TINY_CLIP, register_tiny_clip
    from ..model import IntCoOp

    name = DEFAULT_MODEL if args.clip is UNSET else args.clip
    pre = pretrained_value(args.pretrained)
    pre = DEFAULT_PRETRAINED if pre is UNSET else pre
    if name == TINY_CLIP:
        register_tiny_clip()
    return IntCoOp.from_clip(name, pre, attributes="off").eval()


def trained_model(args, device=None):
    """The --checkpoint's model, on --clip / --pretrained when given (else the CLIP it was trained on)."""
    from ..train.checkpoint import load_trained

    kw = {} if args.pretrained is UNSET else {"pretrained": pretrained_value(args.pretrained)}
    clip = None if getattr(args, "clip", UNSET) is UNSET else args.clip
    return load_trained(args.checkpoint, clip, device=device, **kw)


_PYTHON_TERMS = [  # (pattern, replacement): a library message's Python arguments as this command line's flags
    (r"pass pretrained='/path/to/checkpoint\.pt' \(an open_clip or OpenAI checkpoint\), or an open_clip model "
     r"instance\. pretrained=None gives random weights\.",
     "give --pretrained /path/to/checkpoint.pt (an open_clip or OpenAI checkpoint), or --pretrained none for "
     "random weights."),
    (r"\(pretrained=None\)", "(--pretrained none)"),
    (r"pretrained=None", "--pretrained none"),
    (r"pass the same model as clip=", "it cannot be rebuilt from the command line"),
    (r"if the run was given another instance, pass it as clip=", "a run given another CLIP instance cannot be "
     "rebuilt from the command line"),
    (r"; clip=('[^']*')", r"; --clip \1"),
]


def cli_terms(message: str) -> str:
    """`message` with the Python arguments it names (pretrained=None, clip=...) put as the flags of the CLI."""
    for pattern, repl in _PYTHON_TERMS:
        message = re.sub(pattern, repl, message)
    return message
