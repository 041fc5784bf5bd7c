"""Tests of intcoop.experiments (protocols, sweep): protocol sweeps, their tables and plot, resuming a killed sweep,
the ablation table, and the `intcoop experiment` / `intcoop ablate` commands.

Data: real images (Fashion-MNIST from Debian's dataset-fashion-mnist, else the sample photographs of
scikit-image / scikit-learn), 4 classes, written in CoOp's layouts by `write_coop_layout`. Model: the tiny CLIP
(`intcoop-tiny`, random weights, 32 px), 1-2 epochs of a few steps, on the CPU.
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch

import intcoop
from PIL import Image

from intcoop.train.checkpoint import read_checkpoint
from intcoop.config import RunConfig
from intcoop.experiments.protocols import (VARIANTS, ablation_variants, aggregate, protocol_cells, run_ablation,
                                run_protocol)
from intcoop.clip import register_tiny_clip
from intcoop.experiments.sweep import Sweep, apply_overrides
from intcoop.train.trainer import Trainer

CLASSES, PER_CLASS, TEST_PER_CLASS, SHOTS = 4, 4, 4, 4
TINY = {"model.clip": "intcoop-tiny", "model.pretrained": None, "train.epochs": 1, "train.batch_size": 4,
        "train.warmup_epochs": 0, "train.lr": 0.01, "data.workers": 0}
# The warnings these runs are expected to raise, each silenced by its message on the tests that raise it (any
# other warning shows): the fixture data has no attribute labels, and the ablation's labels file covers more
# images than the few-shot base-class training set and reaches variants without an attribute slot.
NO_LABELS = pytest.mark.filterwarnings("ignore:no attribute labels given:UserWarning")
EXTRA_LABELS = pytest.mark.filterwarnings(
    r"ignore:\d+ of \d+ attribute label id\(s\) are not training items:UserWarning")
UNUSED_LABELS = pytest.mark.filterwarnings("ignore:attribute labels are not used:UserWarning")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from intcoop.demo.data import DemoSourceError, build_demo_dataset, write_coop_layout

    base = tmp_path_factory.mktemp("experiment")
    try:
        src = build_demo_dataset(base / "src", classes=CLASSES, per_class=PER_CLASS, val_per_class=1,
                                 test_per_class=TEST_PER_CLASS, size=32)
    except DemoSourceError:            # Fashion-MNIST not installed: the bundled photographs (always there)
        src = build_demo_dataset(base / "src", classes=CLASSES, per_class=PER_CLASS, val_per_class=1,
                                 test_per_class=TEST_PER_CLASS, size=32, source="photos", overwrite=True)
    for name in ("oxford_pets", "dtd", "imagenet", "imagenetv2", "imagenet_sketch"):
        write_coop_layout(name, src, base / "root")
    write_coop_layout("imagenet_a", src, base / "root", classes=[0, 1])
    write_coop_layout("imagenet_r", src, base / "root", classes=[1, 2, 3])
    return base / "root"


class Counting:
    """trainer_factory hook: builds the real Trainer, counts trainings and records fit(resume=...)."""

    def __init__(self, fail_at: tuple[int, int] | None = None):
        self.runs, self.resumed, self.fail_at = [], [], fail_at

    def __call__(self, config, model, items, classnames, **kw):
        self.runs.append(Path(config.train.out).name)
        if self.fail_at and len(self.runs) == self.fail_at[0]:
            def crash(trainer, info, step=self.fail_at[1]):
                if info["step"] == step:
                    raise RuntimeError("killed")
            kw["callbacks"] = list(kw.get("callbacks", [])) + [crash]
        trainer = Trainer(config, model, items, classnames, **kw)
        fit = trainer.fit

        def recorded(resume=False):
            self.resumed.append(resume)
            return fit(resume=resume)
        trainer.fit = recorded
        return trainer


def cell(out: Path, cell_id: str) -> dict:
    return json.loads((out / "cells" / f"{cell_id}.json").read_text())


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def hm(b, n):
    return 2 * b * n / (b + n) if b + n else 0.0


# ---------------------------------------------------------------------------------------------- protocols
@NO_LABELS
def test_base2novel_sweep_table(root, tmp_path):
    out, seeds, datasets = tmp_path / "b2n", [1, 2], ["oxford_pets", "dtd"]
    lines = []
    rows = run_protocol("base2novel", datasets, root, seeds, [SHOTS], None, out, overrides=TINY, progress=False,
                        log=lines.append)
    assert [r["dataset"] for r in rows] == datasets + ["average"]
    assert list(rows[0]) == ["dataset", "base", "novel", "HM", "base std", "novel std", "HM std", "seeds"]
    assert len([line for line in lines if "HM" in line]) == 4            # one progress line per cell
    means = {}
    for d, row in zip(datasets, rows):
        cells = [cell(out, f"base2novel-{d}-{SHOTS}shot-seed{s}") for s in seeds]
        base = [c["results"][0]["acc"] for c in cells]
        novel = [c["results"][1]["acc"] for c in cells]
        assert [c["results"][0]["subset"] for c in cells] == ["base", "base"]
        assert all(c["results"][0]["n"] == 2 * TEST_PER_CLASS == c["results"][1]["n"] for c in cells)
        assert row["base"] == pytest.approx(statistics.mean(base), abs=1e-3)
        assert row["novel"] == pytest.approx(statistics.mean(novel), abs=1e-3)
        assert row["base std"] == pytest.approx(statistics.pstdev(base), abs=1e-3)
        assert row["HM"] == pytest.approx(hm(statistics.mean(base), statistics.mean(novel)), abs=1e-3)
        assert row["HM std"] == pytest.approx(statistics.pstdev([hm(b, n) for b, n in zip(base, novel)]), abs=1e-3)
        assert row["seeds"] == 2
        means[d] = (row["base"], row["novel"])
        for s in seeds:                         # trained on the base classes only (first ceil(4/2))
            ck = read_checkpoint(out / "runs" / f"{d}-base-{SHOTS}shot-seed{s}" / "last.pt")
            assert len(ck["classnames"]) == 2 and ck["config"]["train"]["seed"] == s
    avg = rows[-1]
    assert avg["base"] == pytest.approx(statistics.mean(b for b, _ in means.values()), abs=1e-3)
    assert avg["HM"] == pytest.approx(hm(avg["base"], avg["novel"]), abs=1e-3)
    on_disk = read_csv(out / "base2novel.csv")
    assert [r["dataset"] for r in on_disk] == datasets + ["average"]
    assert float(on_disk[0]["HM"]) == pytest.approx(rows[0]["HM"])
    assert (out / "base2novel.md").read_text().startswith("| dataset | base | novel | HM |")


@NO_LABELS
def test_fewshot_sweep_table_and_plot(root, tmp_path):
    """Also the model_factory hook: conftest's tiny CLIP (every weight random) instead of the named one."""
    from conftest import tiny_clip

    from intcoop.clip import load_clip
    from intcoop.model import IntCoOp

    built = []

    def factory(mc):
        built.append(mc.seed)
        return IntCoOp(load_clip(tiny_clip(mc.seed)), mc)

    out, seeds, shots = tmp_path / "fs", [1, 2], [1, 2]
    rows = run_protocol("fewshot", ["oxford_pets"], root, seeds, shots, None, out, overrides=TINY, progress=False,
                        model_factory=factory, log=lambda s: None)
    assert sorted(built) == [1, 1, 2, 2]
    assert [r["dataset"] for r in rows] == ["oxford_pets", "average"]
    assert list(rows[0]) == ["dataset", "1-shot", "2-shot", "1-shot std", "2-shot std", "seeds"]
    for k in shots:
        accs = [cell(out, f"fewshot-oxford_pets-{k}shot-seed{s}")["results"][0]["acc"] for s in seeds]
        assert rows[0][f"{k}-shot"] == pytest.approx(statistics.mean(accs), abs=1e-3)
        assert rows[0][f"{k}-shot std"] == pytest.approx(statistics.pstdev(accs), abs=1e-3)
        assert rows[1][f"{k}-shot"] == rows[0][f"{k}-shot"]
        ck = read_checkpoint(out / "runs" / f"oxford_pets-all-{k}shot-seed1" / "last.pt")
        assert len(ck["classnames"]) == CLASSES and ck["config"]["data"]["shots"] == k
    with Image.open(out / "fewshot.png") as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200


@NO_LABELS
def test_domain_and_crossdataset_share_the_imagenet_run(root, tmp_path):
    out, counting = tmp_path / "transfer", Counting()
    rows = run_protocol("domain", None, root, [1], None, None, out, overrides=TINY, progress=False,
                        trainer_factory=counting, log=lambda s: None)
    targets = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert list(rows[0])[:7] == ["source", "imagenet", *targets, "average"]
    res = {r["target"]: r for r in cell(out, "domain-imagenet-16shot-seed1")["results"]}
    assert res["imagenet_a"]["n"] == 2 * TEST_PER_CLASS and res["imagenet_r"]["n"] == 3 * TEST_PER_CLASS
    assert rows[0]["average"] == pytest.approx(statistics.mean(res[t]["acc"] for t in targets), abs=1e-3)
    rows = run_protocol("crossdataset", ["oxford_pets", "dtd"], root, [1], None, None, out, overrides=TINY,
                        progress=False, trainer_factory=counting, log=lambda s: None)
    assert list(rows[0])[:5] == ["source", "imagenet", "oxford_pets", "dtd", "average"]
    assert rows[0]["imagenet"] == pytest.approx(res["imagenet"]["acc"], abs=1e-3)
    assert counting.runs == ["imagenet-all-16shot-seed1"]                     # one training for both protocols


@NO_LABELS
def test_killed_sweep_resumes_to_the_same_table(root, tmp_path):
    kw = dict(overrides={**TINY, "train.epochs": 2}, progress=False)
    args = ("base2novel", ["oxford_pets"], root, [1, 2], [SHOTS], None)
    ref = Counting()
    run_protocol(*args, tmp_path / "ref", trainer_factory=ref, log=lambda s: None, **kw)
    assert ref.runs == [f"oxford_pets-base-{SHOTS}shot-seed1", f"oxford_pets-base-{SHOTS}shot-seed2"]
    out = tmp_path / "killed"
    steps_per_epoch = 2 * SHOTS // TINY["train.batch_size"]
    killer = Counting(fail_at=(2, steps_per_epoch + 1))          # 2nd training, first step of its 2nd epoch
    with pytest.raises(RuntimeError, match="killed"):
        run_protocol(*args, out, trainer_factory=killer, log=lambda s: None, **kw)
    first = out / "cells" / f"base2novel-oxford_pets-{SHOTS}shot-seed1.json"
    stamp = first.stat().st_mtime_ns
    assert not (out / "cells" / f"base2novel-oxford_pets-{SHOTS}shot-seed2.json").exists()
    assert read_checkpoint(out / "runs" / f"oxford_pets-base-{SHOTS}shot-seed2" / "last.pt")["epoch"] == 1
    again, lines = Counting(), []
    run_protocol(*args, out, trainer_factory=again, log=lines.append, **kw)
    assert again.runs == [f"oxford_pets-base-{SHOTS}shot-seed2"] and again.resumed == [True]
    assert "done earlier" in lines[0] and "resumed from epoch 1" in lines[1]
    assert first.stat().st_mtime_ns == stamp
    assert (out / "base2novel.csv").read_text() == (tmp_path / "ref" / "base2novel.csv").read_text()
    for s in (1, 2):                             # same learned prompt as the uninterrupted sweep
        a = read_checkpoint(out / "runs" / f"oxford_pets-base-{SHOTS}shot-seed{s}" / "last.pt")["prompt"]
        b = read_checkpoint(tmp_path / "ref" / "runs" / f"oxford_pets-base-{SHOTS}shot-seed{s}" / "last.pt")["prompt"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    # a cell whose training finished but whose evaluation was lost: evaluated again, not retrained
    (out / "cells" / f"base2novel-oxford_pets-{SHOTS}shot-seed2.json").unlink()
    for f in (out / "runs" / f"oxford_pets-base-{SHOTS}shot-seed2" / "evals").iterdir():
        f.unlink()
    third, lines = Counting(), []
    run_protocol(*args, out, trainer_factory=third, log=lines.append, **kw)
    assert third.runs == [] and "trained earlier" in lines[1]
    assert (out / "base2novel.csv").read_text() == (tmp_path / "ref" / "base2novel.csv").read_text()


def test_rerun_with_other_settings_is_refused(root, tmp_path):
    out = tmp_path / "s"
    sweep = Sweep(out, apply_overrides(RunConfig(), {**TINY, "data.root": str(root)}), log=lambda s: None)
    sweep.run([])
    assert not (out / "experiment.yaml").exists()          # no cell started work: nothing is locked
    sweep.check_config()                                    # what a started cell does
    other = Sweep(out, apply_overrides(sweep.config, {"train.lr": 0.5}), log=lambda s: None)
    with pytest.raises(ValueError, match=r"train\.lr: 0\.01 -> 0\.5"):
        other.run([])
    with pytest.raises(ValueError, match=r"override 'train.nope': unknown field train.nope"):
        apply_overrides(sweep.config, {"train.nope": 1})


@NO_LABELS
def test_sweep_failing_before_work_locks_nothing_and_cells_record_overrides(root, tmp_path):
    def no_weights(model_config):
        raise FileNotFoundError("no weights here")

    out, over = tmp_path / "s", {**TINY, "train.epochs": 1}
    with pytest.raises(FileNotFoundError, match="no weights here"):
        run_protocol("fewshot", ["oxford_pets"], root, [1], [SHOTS], None, out, overrides=over, progress=False,
                     model_factory=no_weights, log=lambda s: None)
    assert not (out / "experiment.yaml").exists()
    run_protocol("fewshot", ["oxford_pets"], root, [1], [SHOTS], None, out, progress=False, log=lambda s: None,
                 overrides=[f"{k}={'null' if v is None else v}" for k, v in {**over, "train.lr": 0.02}.items()])
    assert (out / "experiment.yaml").exists()                # other settings than the failed try: accepted
    doc = cell(out, f"fewshot-oxford_pets-{SHOTS}shot-seed1")
    assert doc["overrides"]["train.lr"] == 0.02 and doc["overrides"]["model.clip"] == "intcoop-tiny"


# ----------------------------------------------------------------------------------------------- ablation
def write_labels_file(root: Path, path: Path) -> Path:
    """Attribute labels of every train and test image of oxford_pets (one word per class, some missing)."""
    from intcoop.data import load_dataset
    from intcoop.attributes.labels_file import write_labels

    words = ["dark", "striped", "bright", "plain"]
    splits = load_dataset("oxford_pets", root)
    recs = [{"id": it.id, "class": it.classname, "answer": words[it.label], "model": "test",
             "attribute": None if k % 5 == 4 else words[it.label]}
            for k, it in enumerate(splits.train + splits.test)]
    write_labels(path, recs)
    return path


@EXTRA_LABELS
@UNUSED_LABELS
def test_ablation_table_has_every_variant(root, tmp_path):
    labels = write_labels_file(root, tmp_path / "labels.jsonl")
    out, counting = tmp_path / "abl", Counting()
    rows = run_ablation("oxford_pets", root, [1], SHOTS, (0.5,), None, out, labels=labels, overrides=TINY,
                        progress=False, trainer_factory=counting, log=lambda s: None)
    names = list(ablation_variants((0.5,)))
    assert [r["variant"] for r in rows] == names and len(names) == len(VARIANTS) + 1
    assert list(rows[0])[:5] == ["variant", "group", "base", "novel", "HM"]
    by = {r["variant"]: r for r in rows}
    deep = {"IVLP": "text_depth=12", "VPT": "visual_depth=12", "MaPLe": "text_depth=9", "PromptSRC": "text_depth=9"}
    for name, why in deep.items():              # depths past the 2-layer tiny CLIP: listed, not run, with the reason
        assert by[name]["note"].startswith("not run: model.") and why in by[name]["note"], by[name]["note"]
        assert by[name].get("base") is None
    assert all(r["base"] is not None and r["HM"] == pytest.approx(hm(r["base"], r["novel"]), abs=1e-3)
               for r in rows if r["variant"] not in deep)
    assert by["CoOp"]["group"] == "baseline" and by["attributes=oracle"]["group"] == "attributes"
    # IntCoOp, conditioning=attention, attributes=predicted/oracle/shuffled share one training
    assert len(counting.runs) == len(set(counting.runs)) == 8
    for same in ("conditioning=attention", "attributes=predicted"):
        assert (by[same]["base"], by[same]["novel"]) == (by["IntCoOp"]["base"], by["IntCoOp"]["novel"])
    expect = {"CoOp": ("none", "off", "off"), "CoCoOp": ("additive", "off", "off"),
              "KgCoOp": ("none", "off", "class"), "IntCoOp": ("attention", "predicted", "class"),
              "attributes=off": ("attention", "off", "class")}
    for name, (cond, attrs, reg) in expect.items():
        ck = read_checkpoint(out / "runs" / cell(out, f"ablation-base2novel-oxford_pets-{SHOTS}shot-seed1-"
                                                 f"{name.replace('=', '-')}")["run"] / "last.pt")
        m, t = ck["config"]["model"], ck["config"]["train"]
        assert (m["conditioning"], m["attributes"], t["regulariser"]) == (cond, attrs, reg)
    noisy = cell(out, f"ablation-base2novel-oxford_pets-{SHOTS}shot-seed1-label_noise-0.5")
    assert read_checkpoint(out / "runs" / noisy["run"] / "last.pt")["config"]["train"]["label_noise"] == 0.5
    oracle = cell(out, f"ablation-base2novel-oxford_pets-{SHOTS}shot-seed1-attributes-oracle")
    assert [r["attributes"] for r in oracle["results"]] == ["oracle", "oracle"]
    assert (out / "ablation.md").read_text().count("\n") == len(names) + 2


@NO_LABELS
def test_ablation_runs_the_deep_prompt_methods_beside_the_others(root, tmp_path):
    """IVLP, VPT, MaPLe, PromptSRC at their shipped depths, beside CoOp, on a CLIP deep enough for them (a tiny
    12-layer open_clip config registered for this test): every row has its metrics; each run's checkpoint holds
    the method's prompts."""
    import json

    import open_clip

    conf = json.loads((Path(intcoop.__file__).with_name("configs") / "intcoop-tiny.json").read_text())
    conf["vision_cfg"]["layers"] = conf["text_cfg"]["layers"] = 12
    (tmp_path / "intcoop-tiny12.json").write_text(json.dumps(conf))
    open_clip.add_model_config(tmp_path / "intcoop-tiny12.json")
    names = ["CoOp", "IVLP", "VPT", "MaPLe", "PromptSRC"]
    out = tmp_path / "abl"
    rows = run_ablation("oxford_pets", root, [1], SHOTS, (), None, out, variants=names, progress=False,
                        overrides={**TINY, "model.clip": "intcoop-tiny12"}, log=lambda s: None)
    assert [r["variant"] for r in rows] == names
    for r in rows:
        assert r["base"] is not None and r["novel"] is not None and not r["note"].startswith("not run"), r
        ck = read_checkpoint(out / "runs" / cell(out, f"ablation-base2novel-oxford_pets-{SHOTS}shot-seed1-"
                                                 f"{r['variant']}")["run"] / "last.pt")
        keys = set(ck["prompt"])
        assert ("visual.tokens.11" in keys) == (r["variant"] in ("IVLP", "VPT")), r["variant"]
        assert ("visual.projs.7.weight" in keys) == (r["variant"] == "MaPLe")
        assert ("deep_text.10" in keys) == (r["variant"] == "IVLP")
        assert ("deep_text.7" in keys) == (r["variant"] in ("IVLP", "MaPLe", "PromptSRC"))


def test_ablation_without_labels_lists_what_it_cannot_run(root, tmp_path):
    rows = run_ablation("oxford_pets", root, [1], SHOTS, (0.3,), None, tmp_path / "a", overrides=TINY,
                        variants=["attributes=oracle", "label_noise=0.3"], progress=False, log=lambda s: None)
    assert [r["variant"] for r in rows] == ["attributes=oracle", "label_noise=0.3"]
    assert all("needs BLIP-2 labels" in r["note"] and r.get("base") is None for r in rows)
    with pytest.raises(ValueError, match="unknown variant"):
        ablation_variants((), ["nope"])
    assert list(ablation_variants((0.3,), ["intcoop", "COOP", "kgcoop", "Label_Noise=0.3"])) == [
        "IntCoOp", "CoOp", "KgCoOp", "label_noise=0.3"]                # names are case-insensitive


# ----------------------------------------------------------------------------------------- tables, cells
def test_aggregate_average_row_uses_common_seeds():
    data = {"a": {"x": {1: 10.0, 2: 20.0}}, "b": {"x": {1: 30.0}}}
    rows = aggregate(data, ["x"], label=lambda k: {"dataset": k})
    assert [r["x"] for r in rows] == [15.0, 30.0, 22.5]                  # average of the row means
    assert rows[0]["x std"] == 5.0 and rows[1]["x std"] == 0.0
    assert rows[2]["x std"] == 0.0 and rows[2]["seeds"] == 1              # only seed 1 is in every row


def test_base2novel_table_has_one_block_per_shots_value():
    from intcoop.experiments.protocols import protocol_table

    res = [{"dataset": d, "shots": k, "seed": s, "results": [{"target": d, "subset": "base", "acc": 50.0 + s + k},
                                                             {"target": d, "subset": "novel", "acc": 40.0 + s * i}]}
           for i, d in enumerate(["a", "b"], 1) for k in (4, 16) for s in (1, 2)]
    rows = protocol_table("base2novel", res)
    assert [(r["dataset"], r["shots"]) for r in rows] == [("a", 4), ("b", 4), ("average", 4), ("a", 16), ("b", 16),
                                                          ("average", 16)]
    assert rows[1]["novel"] == 43.0 and rows[2]["novel"] == 42.25 and rows[2]["novel std"] == 0.75
    assert rows[5]["HM"] == pytest.approx(hm(67.5, 42.25), abs=1e-4)


def test_protocol_cells():
    cells = protocol_cells("crossdataset", ["imagenet", "dtd"], [1, 2], [16])
    assert [c.id for c in cells] == ["crossdataset-imagenet-16shot-seed1", "crossdataset-imagenet-16shot-seed2"]
    assert [e.target for e in cells[0].evals] == ["imagenet", "dtd"]
    assert len(protocol_cells("fewshot", None, [1, 2, 3], [1, 2, 4, 8, 16])) == 11 * 3 * 5
    with pytest.raises(ValueError, match="unknown protocol"):
        protocol_cells("zeroshot", None, [1], [16])


# ---------------------------------------------------------------------------------------------------- CLI
@NO_LABELS
def test_cli_experiment_and_ablate(root, tmp_path, capsys):
    from intcoop.cli import main

    register_tiny_clip()
    sets = [x for k, v in {**TINY, "model.pretrained": "null"}.items() for x in ("--set", f"{k}={v}")]
    out = tmp_path / "cli"
    rc = main(["experiment", "base2novel", "--datasets", "oxford_pets", "--root", str(root), "--seeds", "1",
               "--shots", str(SHOTS), "--out", str(out), "--no-progress", *sets])
    text = capsys.readouterr().out
    assert rc == 0 and "[1/1] base2novel-oxford_pets-4shot-seed1: base" in text and "| average |" in text
    assert [r["dataset"] for r in read_csv(out / "base2novel.csv")] == ["oxford_pets", "average"]
    rc = main(["experiment", "base2novel", "--datasets", "oxford_pets", "--root", str(root), "--seeds", "1",
               "--shots", str(SHOTS), "--out", str(out), "--no-progress", *sets, "--set", "train.lr=0.5"])
    assert rc == 2 and "other settings" in capsys.readouterr().err
    rc = main(["ablate", "--dataset", "oxford_pets", "--root", str(root), "--shots", str(SHOTS), "--noise", "0.1",
               "--variants", "attributes=shuffled,label_noise=0.1", "--out", str(tmp_path / "abl"), "--no-progress", *sets])
    text = capsys.readouterr().out
    assert rc == 0 and "| attributes=shuffled | attributes |" in text and "needs BLIP-2 labels" in text
