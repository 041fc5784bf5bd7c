"""The evaluation protocols of the CoOp line of work as commands, and baselines / ablations side by side.

    run_protocol(protocol, datasets, root, seeds, shots, config, out, ...)  -> table rows
    run_ablation(dataset, root, seeds, shots, noise, config, out, ...)      -> table rows
(the commands `intcoop experiment` and `intcoop ablate` are in intcoop/cli/experiment.py)

Protocols (METHOD.md), one cell per (dataset, shots, seed); cells are run by `sweep.Sweep` (resumable):
- base2novel: train on the base classes (first ceil(N/2)), K shots (default 16); test on base and on novel
  classes; HM = harmonic mean. Table: base, novel, HM per dataset and their average (HM of the means, as the
  CoCoOp tables; its std is over the per-seed HMs).
- fewshot: all classes, K = 1, 2, 4, 8, 16 shots; table: one column per K; plot `<out>/fewshot.png`.
- domain: train on `source` (ImageNet, 16 shots), test on ImageNetV2, -Sketch, -A, -R (each over the classes its
  reader gives: 200 for -A and -R). crossdataset: the same, tested on the other datasets. Table: the source's
  own test accuracy, one column per target and their average.
Every table gives the mean over seeds and its std (population std, numpy's default, as CoOp's parse script)
in "<column> std" columns, and "seeds"; it is written as `<out>/<protocol>.csv` and `.md` (evaluate.write_table).

Ablations (`VARIANTS`: one dict, name -> config overrides): the baselines CoOp, CoCoOp, KgCoOp and the
deep-prompt methods IVLP, VPT, MaPLe and PromptSRC (their prompts and losses as in the shipped configs; the
schedule is the run's) as configurations of the same engine, and IntCoOp with one switch changed: conditioning, attributes (oracle and
shuffled are evaluation-time switches of the IntCoOp run, `model.set_attributes`), label noise. Table
`<out>/ablation.csv|md`, one row per variant. Variants that need BLIP-2 labels (oracle, label noise) are listed
with a note and not run when no labels file is given, as are the deep-prompt variants whose depths do not fit
the CLIP named in the config (e.g. depth 12 on a 2-layer tower), from open_clip's model config.
"""
from __future__ import annotations

import io
import math
import os
import statistics
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..config import RunConfig

from .._io import atomic_write_bytes
from ..clip import TINY_CLIP, register_tiny_clip
from ..evaluation.metrics import harmonic_mean
from .sweep import Cell, Eval, Sweep, apply_overrides

__all__ = ["PROTOCOLS", "VARIANTS", "DEEP_VARIANTS", "INTCOOP", "run_protocol", "run_ablation", "protocol_cells", "ablation_variants",
           "aggregate", "plot_fewshot"]

PROTOCOLS = ("base2novel", "fewshot", "domain", "crossdataset")
FEWSHOT_SHOTS = (1, 2, 4, 8, 16)

_SHALLOW = {"model.text_depth": 1, "model.visual_prompts": "off", "train.lambda_scl_text": 0.0,
            "train.lambda_scl_image": 0.0, "train.lambda_scl_logits": 0.0, "train.gpa_mean": 0.0, "train.gpa_std": 0.0}
INTCOOP = {"model.conditioning": "attention", "model.attributes": "predicted", "train.regulariser": "class",
           **_SHALLOW}
_DEEP = {**_SHALLOW, "model.conditioning": "none", "model.attributes": "off", "train.regulariser": "off",
         "model.ctx_init": "a photo of a"}
DEEP_VARIANTS: dict[str, dict] = {   # the prompts of configs/{ivlp,vpt,maple,promptsrc}.yaml
    "IVLP": {**_DEEP, "model.n_ctx": 2, "model.text_depth": 12, "model.visual_prompts": "independent",
             "model.visual_ctx": 2, "model.visual_depth": 12},
    "VPT": {**_DEEP, "model.n_ctx": 4, "model.text_depth": 0, "model.visual_prompts": "independent",
            "model.visual_ctx": 8, "model.visual_depth": 12},
    "MaPLe": {**_DEEP, "model.n_ctx": 2, "model.text_depth": 9, "model.visual_prompts": "coupled"},
    "PromptSRC": {**_DEEP, "model.n_ctx": 4, "model.text_depth": 9, "model.visual_prompts": "independent",
                  "model.visual_ctx": 4, "model.visual_depth": 9, "train.lambda_scl_text": 25.0,
                  "train.lambda_scl_image": 10.0, "train.lambda_scl_logits": 1.0, "train.gpa_mean": 15.0,
                  "train.gpa_std": 1.0},
}
VARIANTS: dict[str, dict] = {
    # the baselines: the same engine with other switches
    "IntCoOp": INTCOOP,
    "CoOp": {"model.conditioning": "none", "model.attributes": "off", "train.regulariser": "off", **_SHALLOW},
    "CoCoOp": {"model.conditioning": "additive", "model.attributes": "off", "train.regulariser": "off", **_SHALLOW},
    "KgCoOp": {"model.conditioning": "none", "model.attributes": "off", "train.regulariser": "class", **_SHALLOW},
    **DEEP_VARIANTS,
    # IntCoOp with one switch changed ("eval.attributes": switched on the trained IntCoOp model at test time)
    "conditioning=attention": INTCOOP,
    "conditioning=additive": {**INTCOOP, "model.conditioning": "additive"},
    "conditioning=none": {**INTCOOP, "model.conditioning": "none"},
    "attributes=predicted": INTCOOP,
    "attributes=oracle": {**INTCOOP, "eval.attributes": "oracle"},
    "attributes=shuffled": {**INTCOOP, "eval.attributes": "shuffled"},
    "attributes=off": {**INTCOOP, "model.attributes": "off"},
}
BASELINES = ("IntCoOp", "CoOp", "CoCoOp", "KgCoOp", "IVLP", "VPT", "MaPLe", "PromptSRC")


def ablation_variants(noise: Sequence[float] = (0.1, 0.3, 0.5), names: Sequence[str] | None = None) -> dict:
    """VARIANTS (or the named ones) plus one `label_noise=p` variant per rate."""
    out = {**VARIANTS, **{f"label_noise={p:g}": {**INTCOOP, "train.label_noise": float(p)} for p in noise}}
    if names is not None:
        by_lower = {k.lower(): k for k in out}              # names are case-insensitive: intcoop, coop, ...
        unknown = [n for n in names if n.strip().lower() not in by_lower]
        if unknown:
            raise ValueError(f"unknown variant(s) {', '.join(map(repr, unknown))}; known: {', '.join(out)} "
                             f"(case does not matter)")
        out = {by_lower[n.strip().lower()]: out[by_lower[n.strip().lower()]] for n in names}
    return out


# ------------------------------------------------------------------------------------------------- cells
def protocol_cells(protocol: str, datasets: Sequence[str] | None, seeds: Sequence[int], shots: Sequence[int],
                   source: str = "imagenet") -> list[Cell]:
    """The cells of a protocol (see the module docstring); datasets=None: the protocol's default list."""
    from ..data import DOMAIN_SHIFT_DATASETS, FEWSHOT_DATASETS

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if protocol in ("domain", "crossdataset"):
        default = DOMAIN_SHIFT_DATASETS if protocol == "domain" else FEWSHOT_DATASETS
        targets = [d for d in (datasets or default) if d != source]
        evals = (Eval(source),) + tuple(Eval(t) for t in targets)
        return [Cell(f"{protocol}-{source}-{k}shot-seed{s}", source, "all", k, s, evals, meta={"protocol": protocol})
                for k in shots for s in seeds]
    cells = []
    for d in datasets or FEWSHOT_DATASETS:
        for k in shots:
            for s in seeds:
                if protocol == "base2novel":
                    cells.append(Cell(f"base2novel-{d}-{k}shot-seed{s}", d, "base", k, s,
                                      (Eval(d, "base"), Eval(d, "novel")), meta={"protocol": protocol}))
                else:
                    cells.append(Cell(f"fewshot-{d}-{k}shot-seed{s}", d, "all", k, s, (Eval(d),),
                                      meta={"protocol": protocol}))
    return cells


def _base_config(config, overrides, root, labels) -> tuple[RunConfig, dict]:
    """(the sweep's base config, the user's overrides as given, for the cell files)."""
    from ..config import Overrides, parse_overrides, resolve_config

    if isinstance(config, RunConfig):
        cfg = config
    else:
        from ..config import load_config
        cfg = load_config(resolve_config(config))
    extra = {"data.root": str(root)}
    if labels is not None:
        extra["data.labels"] = str(labels)
    given = parse_overrides(overrides)
    cfg = apply_overrides(cfg, Overrides({**given, **extra}, given.typed, given.flag))
    if cfg.model.clip == TINY_CLIP:
        register_tiny_clip()
    return cfg, dict(given)


# ------------------------------------------------------------------------------------------------ tables
def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def _summarise(label: dict, per_col: dict, cols, derived, means: dict | None = None) -> dict:
    """One table row: means (given, or over seeds), derived columns of the means, stds over seeds."""
    means = means if means is not None else {c: _mean(per_col.get(c, {}).values()) for c in cols}
    row = dict(label)
    row.update({c: means[c] for c in cols})
    complete = all(means[c] is not None for c in cols)
    for name, f in derived:
        row[name] = f(means) if complete else None
    for c in cols:
        vals = list(per_col.get(c, {}).values())
        row[f"{c} std"] = statistics.pstdev(vals) if vals else None
    common = set.intersection(*(set(per_col.get(c, {})) for c in cols)) if cols else set()
    for name, f in derived:
        vals = [f({c: per_col[c][s] for c in cols}) for s in sorted(common)]
        row[f"{name} std"] = statistics.pstdev(vals) if vals else None
    row["seeds"] = max((len(per_col.get(c, {})) for c in cols), default=0)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}


def aggregate(data: Mapping, cols: Sequence[str], derived: Sequence[tuple[str, Callable]] = (), *,
              label: Callable[[object], dict], average: str | None = "average") -> list[dict]:
    """Rows of a results table.

    data: {row key: {column: {seed: value}}} in row order. Each row: label(key), the mean over seeds of each
    column, derived columns computed from the means (e.g. HM of mean base and mean novel), then "<col> std"
    (population std over seeds; for a derived column, of its per-seed values) and "seeds".
    average: label of a last row averaging the rows (mean of the row means; its std is over the per-seed
    averages, for the seeds that every row has); None for no such row.
    """
    rows = [_summarise(label(key), per_col, cols, derived) for key, per_col in data.items()]
    if average and data:
        keys = list(data)
        per_col = {}
        for c in cols:
            seeds = set.intersection(*(set(data[k].get(c, {})) for k in keys))
            per_col[c] = {s: _mean(data[k][c][s] for k in keys) for s in sorted(seeds)}
        means = {c: _mean(r[c] for r in rows if r[c] is not None) for c in cols}
        first = next(iter(label(keys[0])))
        rows.append(_summarise({first: average}, per_col, cols, derived, means))
    return rows


def _hm(m: dict) -> float:
    return harmonic_mean(m["base"], m["novel"])


def protocol_table(protocol: str, results: Sequence[dict]) -> list[dict]:
    """The paper-style table of a protocol from its cell results (see the module docstring)."""
    shots = sorted({r["shots"] for r in results})
    data: dict = {}
    if protocol == "fewshot":
        cols = [f"{k}-shot" for k in shots]
        for r in results:
            data.setdefault(r["dataset"], {}).setdefault(f"{r['shots']}-shot", {})[r["seed"]] = r["results"][0]["acc"]
        return aggregate(data, cols, label=lambda d: {"dataset": d})

    def label(key, name):
        return {name: key[0], **({"shots": key[1]} if len(shots) > 1 else {})}

    if protocol == "base2novel":                 # one block per shots value, each with its average row
        for r in results:
            for e in r["results"]:
                data.setdefault((r["dataset"], r["shots"]), {}).setdefault(e["subset"], {})[r["seed"]] = e["acc"]
        rows = []
        for k in shots:
            block = aggregate({key: v for key, v in data.items() if key[1] == k}, ["base", "novel"], [("HM", _hm)],
                              label=lambda key: label(key, "dataset"))
            if len(shots) > 1:
                block[-1] = {"dataset": "average", "shots": k, **block[-1]}
            rows += block
        return rows
    cols = []
    for r in results:
        for e in r["results"]:
            if e["target"] not in cols:
                cols.append(e["target"])
            data.setdefault((r["dataset"], r["shots"]), {}).setdefault(e["target"], {})[r["seed"]] = e["acc"]
    targets = cols[1:]
    derived = [("average", lambda m: sum(m[t] for t in targets) / len(targets))] if targets else []
    return aggregate(data, cols, derived, label=lambda k: label(k, "source"), average=None)


def plot_fewshot(rows: Sequence[dict], path) -> Path:
    """Accuracy against shots (log2 axis), one line per dataset and a dashed black one for the average."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = [c for c in rows[0] if c.endswith("-shot")]
    shots = [int(c.split("-")[0]) for c in cols]
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in rows:
        style = dict(color="black", linestyle="--", linewidth=2.2) if r["dataset"] == "average" else {}
        ax.plot(shots, [r[c] if r[c] is not None else math.nan for c in cols], marker="o", label=r["dataset"],
                **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Few-shot classification")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# ------------------------------------------------------------------------------------------------- API
def run_protocol(protocol: str, datasets: Sequence[str] | None, root, seeds: Sequence[int] = (1, 2, 3),
                 shots: Sequence[int] | None = None, config: RunConfig | str | os.PathLike | None = None,
                 out="runs/experiment", *, overrides: Mapping | Sequence[str] | None = None, labels=None,
                 source: str = "imagenet", model_factory: Callable | None = None,
                 trainer_factory: Callable | None = None, callbacks: Sequence[Callable] = (), device=None,
                 progress: bool = True, eval_batch_size: int = 64, log: Callable[[str], None] = print) -> list[dict]:
    """Run (or finish) every cell of `protocol` under `out`, write `<out>/<protocol>.csv|md` (and fewshot.png),
    return the table rows.

    config: a RunConfig, a YAML path, a shipped config name, or None (the defaults of intcoop.config); overrides:
    {"train.epochs": 5} or ["train.epochs=5"]. shots: default (1, 2, 4, 8, 16) for fewshot, else
    (config.data.shots,). labels: BLIP-2 labels file for the attribute loss ("{dataset}" is replaced by each
    dataset's name). model_factory(model_config) -> IntCoOp and trainer_factory(config, model, items,
    classnames, **kw) -> Trainer are hooks (see intcoop.experiments.sweep); callbacks go to every Trainer.
    """
    cfg, given = _base_config(config, overrides, root, labels)
    if shots is None:
        shots = FEWSHOT_SHOTS if protocol == "fewshot" else (cfg.data.shots,)
    cells = protocol_cells(protocol, datasets, seeds, shots, source)
    sweep = Sweep(out, cfg, model_factory=model_factory, trainer_factory=trainer_factory, callbacks=callbacks,
                  device=device, progress=progress, eval_batch_size=eval_batch_size, log=log,
                  overrides=given)
    rows = protocol_table(protocol, sweep.run(cells))
    write_results(rows, out, protocol)
    if protocol == "fewshot":
        log(f"plot: {plot_fewshot(rows, Path(out) / 'fewshot.png')}")
    return rows


def write_results(rows, out, name):
    from .._io import write_table
    return write_table(rows, out, name)


def _prompts_misfit(cfg: RunConfig) -> str | None:
    """Why a configuration's deep prompts do not fit its CLIP (a depth past the tower's layers, visual prompts on
    a tower that is not a ViT), read from open_clip's model config; None when they fit or the name is unknown."""
    mc = cfg.model
    if mc.text_depth <= 1 and mc.visual_prompts == "off":
        return None
    if mc.clip == TINY_CLIP:
        register_tiny_clip()
    import open_clip
    conf = open_clip.get_model_config(mc.clip)
    if not conf:
        return None
    text, vision = conf.get("text_cfg", {}), conf.get("vision_cfg", {})
    if mc.text_depth > text.get("layers", 12):
        return f"model.text_depth={mc.text_depth} > the {text.get('layers')} layers of {mc.clip}'s text tower"
    if mc.visual_prompts == "off":
        return None
    if not isinstance(vision.get("layers", 12), int) or vision.get("timm_model_name"):
        return f"visual prompts need open_clip's ViT image tower; {mc.clip} has another"
    depth, key = (mc.text_depth, "text_depth") if mc.visual_prompts == "coupled" else (mc.visual_depth,
                                                                                        "visual_depth")
    if depth > vision.get("layers", 12):
        return f"model.{key}={depth} > the {vision.get('layers')} layers of {mc.clip}'s image tower"
    return None


def run_ablation(dataset: str, root, seeds: Sequence[int] = (1,), shots: int = 16,
                 noise: Sequence[float] = (0.1, 0.3, 0.5), config: RunConfig | str | os.PathLike | None = None,
                 out="runs/ablation", *, protocol: str = "base2novel", labels=None,
                 variants: Sequence[str] | None = None, overrides: Mapping | Sequence[str] | None = None,
                 model_factory: Callable | None = None, trainer_factory: Callable | None = None,
                 callbacks: Sequence[Callable] = (), device=None, progress: bool = True, eval_batch_size: int = 64,
                 log: Callable[[str], None] = print) -> list[dict]:
    """Train and evaluate every variant (`ablation_variants(noise, variants)`) on one dataset, under the
    base2novel protocol (base / novel / HM) or fewshot (all classes: accuracy); write `<out>/ablation.csv|md`;
    return the rows (variant, group, then the metrics). Arguments as `run_protocol`; labels: the BLIP-2 labels
    file of the training AND test images (attribute loss, label noise, oracle attributes)."""
    if protocol not in ("base2novel", "fewshot"):
        raise ValueError(f"ablations run under base2novel or fewshot, got {protocol!r}")
    cfg, given = _base_config(config, overrides, root, labels)
    chosen = ablation_variants(noise, variants)
    subset = "base" if protocol == "base2novel" else "all"
    subsets = ("base", "novel") if protocol == "base2novel" else ("all",)
    cells, notes = [], {}
    for name, ov in chosen.items():
        needs = ov.get("eval.attributes") == "oracle" or ov.get("train.label_noise", 0) > 0
        if needs and not cfg.data.labels:
            notes[name] = "not run: needs BLIP-2 labels (--labels)"
            continue
        misfit = _prompts_misfit(apply_overrides(cfg, {k: v for k, v in ov.items() if not k.startswith("eval.")}))
        if misfit:
            notes[name] = f"not run: {misfit}"
            continue
        if not cfg.data.labels and apply_overrides(cfg, {k: v for k, v in ov.items()
                                                         if not k.startswith("eval.")}).model.attributes != "off":
            notes[name] = "no labels: attribute extractor not trained"
        evals = tuple(Eval(dataset, s, ov.get("eval.attributes")) for s in subsets)
        slug = name.replace("=", "-")
        cells += [Cell(f"ablation-{protocol}-{dataset}-{shots}shot-seed{s}-{slug}", dataset, subset, shots, s, evals,
                       overrides=ov, meta={"protocol": "ablation", "variant": name}) for s in seeds]
    sweep = Sweep(out, cfg, model_factory=model_factory, trainer_factory=trainer_factory, callbacks=callbacks,
                  device=device, progress=progress, eval_batch_size=eval_batch_size, log=log,
                  overrides=given)
    results = sweep.run(cells)
    data: dict = {name: {} for name in chosen if not notes.get(name, "").startswith("not run")}
    for r in results:
        for e in r["results"]:
            data[r["meta"]["variant"]].setdefault(e["subset"] if protocol == "base2novel" else "acc", {})[r["seed"]] = \
                e["acc"]
    cols, derived = (["base", "novel"], [("HM", _hm)]) if protocol == "base2novel" else (["acc"], [])
    computed = {r["variant"]: r for r in aggregate(data, cols, derived, label=lambda v: {"variant": v}, average=None)}
    rows = []
    for name in chosen:
        group = "baseline" if name in BASELINES else name.partition("=")[0]
        row = computed.get(name, {"variant": name})
        rows.append({"variant": name, "group": group, **{k: v for k, v in row.items() if k != "variant"},
                     "note": notes.get(name, "")})
    write_results(rows, out, "ablation")
    return rows
