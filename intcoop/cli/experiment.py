"""`intcoop experiment` (a protocol as a resumable sweep) and `intcoop ablate` (baselines and ablations side by
side): parsers and commands over intcoop.experiments.protocols."""
from __future__ import annotations

from pathlib import Path

from ..experiments.protocols import PROTOCOLS, run_ablation, run_protocol

__all__ = ["add_parser"]


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def _common(s) -> None:
    s.add_argument("--root", required=True, help="datasets root (CoOp's DATASET.ROOT) or a dataset folder")
    s.add_argument("--config", default=None, help="YAML config file or shipped config name (default: built-in "
                   "defaults, IntCoOp)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field (repeatable), e.g. --set train.epochs=5")
    s.add_argument("--labels", default=None, help="BLIP-2 labels file ('{dataset}' is replaced by the dataset name)")
    s.add_argument("--out", required=True, help="sweep folder: cells/, runs/, tables (rerun to resume)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    s.add_argument("--eval-batch-size", type=int, default=64)
    s.add_argument("--no-progress", action="store_true", help="no progress bars (one line per cell remains)")


def add_parser(sub) -> None:
    """Add `experiment` and `ablate` to the `intcoop` command's subparsers."""
    s = sub.add_parser("experiment", help="a protocol of the CoOp line of work as a resumable sweep: base2novel, "
                       "fewshot, domain, crossdataset")
    s.add_argument("protocol", choices=PROTOCOLS)
    s.add_argument("--datasets", default=None, help="comma list (default: the protocol's datasets; for domain and "
                   "crossdataset: the target datasets)")
    s.add_argument("--seeds", default="1,2,3", help="comma list of seeds")
    s.add_argument("--shots", default=None, help="comma list (default: 1,2,4,8,16 for fewshot, else data.shots)")
    s.add_argument("--source", default="imagenet", help="training dataset of domain / crossdataset")
    _common(s)
    s.set_defaults(fn=cmd_experiment)

    s = sub.add_parser("ablate", help="IntCoOp, CoOp, CoCoOp, KgCoOp and IntCoOp's ablations side by side")
    s.add_argument("--dataset", required=True, help="dataset name (intcoop.data.DATASETS)")
    s.add_argument("--seeds", default="1", help="comma list of seeds")
    s.add_argument("--shots", type=int, default=16, help="training images per class")
    s.add_argument("--noise", default="0.1,0.3,0.5", help="label-noise rates (comma list; '' for none)")
    s.add_argument("--protocol", default="base2novel", choices=["base2novel", "fewshot"],
                   help="base2novel: base / novel / HM columns; fewshot: all classes, accuracy")
    s.add_argument("--variants", default=None, help="comma list of variants to run (default: all)")
    _common(s)
    s.set_defaults(fn=cmd_ablate)


def _hooks(args) -> dict:
    from ..config import parse_overrides
    return dict(overrides=parse_overrides(args.set, flag="--set"), labels=args.labels, device=args.device, progress=not args.no_progress,
                eval_batch_size=args.eval_batch_size)


def _show(out, name) -> None:
    md = Path(out) / f"{name}.md"
    print(md.read_text(), end="")
    print(f"written: {Path(out) / (name + '.csv')}, {md}")


def cmd_experiment(args) -> int:
    run_protocol(args.protocol, _names(args.datasets), args.root, _ints(args.seeds),
                 _ints(args.shots) if args.shots else None, args.config, args.out, source=args.source, **_hooks(args))
    _show(args.out, args.protocol)
    return 0


def cmd_ablate(args) -> int:
    run_ablation(args.dataset, args.root, _ints(args.seeds), args.shots, _floats(args.noise), args.config, args.out,
                 protocol=args.protocol, variants=_names(args.variants), **_hooks(args))
    _show(args.out, "ablation")
    return 0
