"""The offline demo as its README paragraph states it: trained on Fashion-MNIST's official train split, tested on
images of its official test split never seen in training, accuracy well above chance where the untrained prompt
is not, the saved config.yaml the configuration that ran (a rerun from it gives the same prompt), a readable
summary. Small size: 4 classes, 8 shots, 25 test images per class, the tiny random CLIP, ~60 steps."""
from __future__ import annotations

import hashlib

import pytest
import torch

from intcoop.cli import main
from intcoop.config import load_config
from intcoop.demo.data import DemoSourceError, _fashion_mnist
from intcoop.demo.run import run_demo
from intcoop.train.checkpoint import read_checkpoint

SMALL = dict(clip="intcoop-tiny", classes=4, shots=8, test_per_class=25, epochs=15, batch_size=8)


def _have_fashion_mnist() -> bool:
    try:
        _fashion_mnist("t10k")
        return True
    except DemoSourceError:
        return False


pytestmark = pytest.mark.skipif(not _have_fashion_mnist(), reason="Debian's dataset-fashion-mnist is not installed")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    lines = []
    rows = run_demo(out, progress=False, log=lines.append, **SMALL)
    return out, rows, "\n".join(lines)


def test_held_out_accuracy_is_learned(demo):
    out, rows, _ = demo
    chance, untrained, trained = rows
    assert [r["n"] for r in rows] == [100, 100, 100]
    assert chance["acc"] == 25.0
    # 100 test images: at chance (25 %) a score of 45 % is 4.6 standard deviations away; training reaches ~60 %
    assert trained["acc"] >= 45.0, rows
    assert untrained["acc"] <= 35.0, rows                      # zero steps do not get there


def test_test_images_were_never_trained_on(demo):
    out, _, _ = demo

    def digests(split):
        return {hashlib.sha1(p.read_bytes()).hexdigest() for p in (out / "data" / split).rglob("*.jpg")}
    train, test = digests("train"), digests("test")
    assert len(train) == 32 and len(test) == 100 and not train & test
    assert "train from the official train set, val/test from t10k" in (out / "data" / "SOURCE.txt").read_text()


def test_saved_config_is_the_run_and_reproduces_it(demo, tmp_path, capsys):
    out, _, _ = demo
    cfg = load_config(out / "train" / "config.yaml")
    assert cfg.data.root == str((out / "data").resolve()) and cfg.data.shots == 8
    assert cfg.data.labels == str((out / "labels.jsonl").resolve())
    assert (cfg.model.clip, cfg.model.pretrained, cfg.train.epochs, cfg.train.batch_size) == ("intcoop-tiny", None,
                                                                                              15, 8)
    again = tmp_path / "again"
    assert main(["train", "--config", str(out / "train" / "config.yaml"), "--out", str(again), "--no-progress"]) == 0
    capsys.readouterr()
    first, second = read_checkpoint(out / "train" / "last.pt"), read_checkpoint(again / "last.pt")
    assert first["step"] == second["step"] == 60
    for name, value in first["prompt"].items():
        assert torch.equal(value, second["prompt"][name]), name


def test_summary_is_short_aligned_and_has_no_raw_dicts(demo):
    _, rows, text = demo
    assert "labels: labels:" not in text and "{" not in text
    assert "official train split" in text and "official test split, never seen in training" in text
    table = [line for line in text.splitlines() if "%" in line and "prompt" in line or "chance" in line]
    assert len(table) == 3 and len({line.index("%") for line in table}) == 1          # one column of numbers
    assert f"{rows[2]['acc']:.1f} %" in text
    assert len(text.splitlines()) <= 16


def test_rerun_reuses_data_labels_and_checkpoint(demo):
    out, rows, _ = demo
    assert run_demo(out, progress=False, log=lambda s: None, **SMALL) == rows
