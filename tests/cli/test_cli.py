"""The README's commands, end to end through `intcoop.cli.main`: info, label, train, eval, logits, demo.

Small real-image trees and the tiny open_clip config `intcoop-tiny` (random weights) keep this fast; a tiny random
BLIP-2 saved to a folder stands in for the real one.
"""
import json

import pytest

from intcoop.cli import main
from intcoop.data.demo import build_demo_dataset
from intcoop.demo import build_tiny_blip2, run_demo


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

    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--root", str(tree), "--subsample", "base2novel",
                 "--out", str(out)]) == 0
    table = (out / "eval_imagefolder_base2novel.md").read_text()
    assert [line.split("|")[2].strip() for line in table.splitlines()[2:]] == ["base", "novel", "HM"]
    capsys.readouterr()

    image = next((tree / "test").rglob("*.jpg"))
    assert main(["logits", str(image), "--checkpoint", str(run / "last.pt"), "--classes", "astronaut,coffee",
                 "--top", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result[0]["image"] == str(image) and len(result[0]["top"]) == 2
    assert abs(sum(p for _, p in result[0]["top"]) - 1) < 1e-3


def test_user_errors_are_one_line_and_exit_2(tree, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--root", str(tree)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("intcoop eval: error:") and "none.pt" in err and "Traceback" not in err
    assert main(["train", "--config", "no-such-config"]) == 2
    assert "no-such-config" in capsys.readouterr().err
    assert main(["logits", str(tmp_path / "missing.png"), "--classes", "cat"]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_demo_end_to_end(tmp_path):
    rows = run_demo(tmp_path / "demo", clip="intcoop-tiny", classes=3, shots=4, epochs=2, test_per_class=3,
                    progress=False)
    assert [r["subset"] for r in rows] == ["all", "chance"]
    assert rows[0]["n"] == 9 and 0 <= rows[0]["acc"] <= 100
    assert (tmp_path / "demo" / "demo_results.md").is_file() and (tmp_path / "demo" / "train" / "last.pt").is_file()
    again = run_demo(tmp_path / "demo", clip="intcoop-tiny", classes=3, shots=4, epochs=2, test_per_class=3,
                     progress=False)                                   # a rerun reuses data, labels, checkpoint
    assert again == rows
