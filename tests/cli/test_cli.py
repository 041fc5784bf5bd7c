"""The README's commands, end to end through `intcoop.cli.main`: info, label, train, eval, logits, demo.

Small real-image trees and the tiny open_clip config `intcoop-tiny` (random weights) keep this fast; a tiny random
BLIP-2 saved to a folder stands in for the real one.
"""
import json

import pytest

from intcoop.cli import main
from intcoop.demo.data import build_demo_dataset
from intcoop.demo.run import build_tiny_blip2


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("tree"), classes=3, per_class=4, val_per_class=1,
                              test_per_class=3, size=32, source="photos")


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("triton", "cuda", "cpp", "torch"):
        assert f"  {name} " in out
    assert "intcoop._C" in out and "torch 2." in out


def test_label_train_eval_logits(tree, tmp_path, capsys):
    blip = build_tiny_blip2(tmp_path / "blip2", always="bright")
    labels = tmp_path / "labels.jsonl"
    assert main(["label", "--root", str(tree), "--out", str(labels), "--model", blip, "--batch-size", "5"]) == 0
    records = [json.loads(line) for line in labels.read_text().splitlines()]
    assert len(records) == 12 and {r["attribute"] for r in records} == {"bright"}
    assert "12 images, 12 newly labelled" in capsys.readouterr().out

    run = tmp_path / "run"
    args = ["train", "--config", "intcoop", "--out", str(run), "--no-progress",
            "--set", "model.clip=intcoop-tiny", "--set", "model.pretrained=null", "--set", f"data.root={tree}",
            "--set", "data.subsample=all", "--set", "data.workers=0", "--set", f"data.labels={labels}",
            "--set", "train.epochs=2", "--set", "train.batch_size=4", "--set", "train.warmup_epochs=0"]
    assert main(args) == 0
    assert (run / "last.pt").is_file() and (run / "metrics.csv").is_file() and (run / "config.yaml").is_file()
    summary = capsys.readouterr().out
    assert summary.startswith("trained:") and "epochs          2 (" in summary and "final loss" in summary
    assert f"checkpoint      {run / 'last.pt'}" in summary and "wall time" in summary
    assert "val accuracy    none" in summary

    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--root", str(tree), "--subsample", "base2novel",
                 "--out", str(out)]) == 0
    table = (out / "eval_imagefolder_base2novel.md").read_text()
    assert [line.split("|")[2].strip() for line in table.splitlines()[2:]] == ["base", "novel", "HM"]
    capsys.readouterr()

    image = next((tree / "test").rglob("*.jpg"))
    common = [str(image), str(image), "--checkpoint", str(run / "last.pt"), "--classes", "astronaut,coffee",
              "--top", "2"]
    assert main(["logits", *common, "--json", "--probs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2                                            # one JSON object per image
    result = json.loads(lines[0])
    assert result["image"] == str(image) and [set(t) for t in result["top"]] == [{"class", "probability"}] * 2
    assert abs(sum(t["probability"] for t in result["top"]) - 1) < 1e-3
    assert main(["logits", *common, "--json"]) == 0
    logits = [t["logit"] for t in json.loads(capsys.readouterr().out.splitlines()[0])["top"]]
    assert abs(sum(logits) - 1) > 1e-3 and logits[0] >= logits[1]      # raw logits, not probabilities
    assert main(["logits", *common]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split() == ["image", "rank", "class", "logit"] and set(text[1]) <= {"-", " "}
    assert text[2].split()[0] == str(image) and text[2].split()[1:3] == ["1", result["top"][0]["class"]]
    assert text[3].split()[0] == "2" and len({len(line) for line in text[2:6]}) == 1     # aligned columns
    assert float(text[2].split()[3]) == pytest.approx(logits[0], abs=1e-3)


def test_user_errors_are_one_line_and_exit_2(tree, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--root", str(tree)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("intcoop eval: error:") and "none.pt" in err and "Traceback" not in err
    assert main(["train", "--config", "no-such-config"]) == 2
    assert "no-such-config" in capsys.readouterr().err
    assert main(["logits", str(tmp_path / "missing.png"), "--classes", "cat"]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_demo_command(tmp_path, capsys):
    """`intcoop demo` wiring (its accuracy margin and reproducibility: tests/demo/test_demo.py)."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--classes", "3", "--shots", "4", "--test-per-class", "3",
                 "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "model                       test accuracy  images" in out and "chance (1 / classes)" in out
    assert "Fashion-MNIST, 3 classes: train 12 images" in out and "test 9 (3 per class" in out
    assert (tmp_path / "demo" / "demo_results.md").is_file() and (tmp_path / "demo" / "train" / "last.pt").is_file()


def test_a_subcommand_whose_module_fails_to_import_says_so(monkeypatch, capsys):
    """A broken import (here: the experiments room) neither hides `experiment` from the parser nor ends in a
    traceback: using it prints the import error in one line, and the other commands are untouched."""
    import builtins

    import intcoop.cli.experiment as cli_experiment
    from intcoop.cli import main

    real_import = builtins.__import__

    def broken(name, globals=None, locals=None, fromlist=(), level=0):
        if "experiments.protocols" in name or (level and name == "experiments.protocols"):
            raise ImportError("No module named 'matplotlib' (simulated)")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", broken)
    monkeypatch.setattr(cli_experiment, "add_parser", lambda sub: __import__("intcoop.experiments.protocols"))
    assert main(["experiment", "base2novel", "--root", "x", "--out", "y"]) == 1
    err = capsys.readouterr().err
    assert "intcoop experiment: error: cannot import" in err and "matplotlib' (simulated)" in err
    assert "Traceback" not in err
    assert main(["info"]) == 0
