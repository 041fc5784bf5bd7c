"""Evaluation is one computation: the validation accuracy a training run reports equals what `intcoop eval` prints
for the same split and checkpoint (one preprocessing: the model's own; one inference loop)."""
import csv

import pytest

from intcoop.cli import main
from intcoop.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from intcoop.data import load_dataset
from intcoop.demo.data import build_demo_dataset
from intcoop.evaluation.metrics import harmonic_mean
from intcoop.train.trainer import Trainer


@pytest.fixture(scope="module")
def photos_folder(tmp_path_factory):
    """4 classes of real photos (crops), 48 px: larger than the tiny CLIP's 32 px, so preprocessing matters."""
    root = tmp_path_factory.mktemp("photos")
    build_demo_dataset(root, classes=4, per_class=6, val_per_class=2, test_per_class=5, size=48, source="photos",
                       overwrite=True)
    return root


def test_validation_in_training_equals_intcoop_eval(photos_folder, tmp_path, capsys):
    splits = load_dataset("imagefolder", photos_folder)
    out = tmp_path / "run"
    cfg = RunConfig(model=ModelConfig(clip="intcoop-tiny", pretrained=None, attributes="off"),
                    data=DataConfig(dataset="imagefolder", root=str(photos_folder), shots=0, augment=False),
                    train=TrainConfig(epochs=2, batch_size=8, lr=0.05, out=str(out), seed=1, regulariser="off",
                                      log_every=1))
    trainer = Trainer(cfg, val_items=splits.test, progress=False)
    assert trainer._transform(False) is trainer.model.preprocess       # validation reads images as eval does
    metrics = trainer.fit()
    assert main(["eval", "--checkpoint", str(out / "last.pt"), "--dataset", "imagefolder", "--root",
                 str(photos_folder), "--split", "test", "--out", str(tmp_path / "eval")]) == 0
    capsys.readouterr()
    rows = list(csv.DictReader(open(tmp_path / "eval" / f"eval_{splits.name}_all.csv")))
    assert len(rows) == 1 and int(rows[0]["n"]) == len(splits.test) == 20
    assert float(rows[0]["acc"]) == pytest.approx(round(100 * metrics["val_acc"], 2), abs=1e-9)


def test_harmonic_mean():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(50.0, 0.0) == 0.0
