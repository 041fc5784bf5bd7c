"""Zero-shot offline from the command line (--clip / --pretrained on logits, explain, eval, attributes), errors in
the CLI's own terms, and quiet, truthful logs: one intcoop line for intended random weights, one-line warnings,
"is a directory" for folders, NaN images refused by prompt_prefix / forward as by fast_logits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from intcoop.cli import _one_line_warning, main
from intcoop.cli.common import cli_terms
from intcoop.demo.data import build_demo_dataset
from intcoop.images import ImageInputError

TINY = ["--clip", "intcoop-tiny"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = build_demo_dataset(tmp_path_factory.mktemp("zs"), classes=2, per_class=1, val_per_class=0,
                              test_per_class=1, size=32, source="photos")
    return sorted(str(p) for p in (root / "test").rglob("*.jpg"))


@pytest.mark.parametrize("word", ["none", "None", "null"])
def test_logits_zero_shot_offline_with_random_weights(images, word, capsys):
    assert main(["logits", *images, "--classes", "astronaut,coffee", *TINY, "--pretrained", word, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == images and all(len(r["top"]) == 2 for r in rows)


def test_explain_zero_shot_says_the_weights_are_random(images, tmp_path, capsys):
    assert main(["explain", images[0], "--classes", "astronaut,coffee", *TINY, "--pretrained", "none",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "note: the CLIP (intcoop-tiny) has random weights" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert any("random weights" in n for n in report["results"][0]["notes"])
    assert "random weights" in (tmp_path / "report.html").read_text()


def test_errors_speak_in_flags(images, tmp_path, capsys):
    assert main(["logits", images[0], "--classes", "a,b", *TINY, "--pretrained", str(tmp_path / "w.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("intcoop logits: error: --pretrained ") and "no such file" in err
    assert main(["logits", str(tmp_path), "--classes", "a,b", *TINY, "--pretrained", "none"]) == 2
    assert f"{tmp_path} is a directory" in capsys.readouterr().err
    msg = ("no weights for ViT-B-32 ... Fix: download; or pass pretrained='/path/to/checkpoint.pt' (an open_clip "
           "or OpenAI checkpoint), or an open_clip model instance. pretrained=None gives random weights.")
    text = cli_terms(msg)
    assert "--pretrained /path/to/checkpoint.pt" in text and "--pretrained none" in text
    assert "pretrained=None" not in text and "pretrained='" not in text


def test_eval_and_attributes_take_the_clip_flags():
    from intcoop.cli import build_parser

    p = build_parser()
    for cmd in (["eval", "--checkpoint", "c.pt", "--root", "r"],
                ["attributes", "--checkpoint", "c.pt", "--root", "r", "--labels", "l"],
                ["logits", "x.jpg", "--classes", "a"], ["explain", "x.jpg", "--classes", "a"]):
        args = p.parse_args(cmd + ["--clip", "ViT-B-32", "--pretrained", "none"])
        assert (args.clip, args.pretrained) == ("ViT-B-32", "none")


def test_warnings_print_as_one_line_without_source():
    line = _one_line_warning(UserWarning("train.cache_features is ignored:\n  data.augment is on"), UserWarning,
                             "/x/trainer.py", 157)
    assert line == "warning: train.cache_features is ignored: data.augment is on\n"
    assert "trainer.py" not in line
    before = warnings.formatwarning
    main(["logits", "missing.jpg", "--classes", "a"])                 # an error: formatwarning is restored
    assert warnings.formatwarning is before


def test_random_weights_log_is_one_intcoop_line(images):
    """The real process: open_clip's "No pretrained weights loaded" warning is not shown, intcoop's line is."""
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    proc = subprocess.run([sys.executable, "-m", "intcoop", "logits", images[0], "--classes", "astronaut,coffee",
                           *TINY, "--pretrained", "none"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "No pretrained weights loaded" not in proc.stderr and "WARNING:root" not in proc.stderr
    assert proc.stderr.count("note: CLIP intcoop-tiny has random weights") == 1
    assert all(line.startswith(("note:", "warning")) for line in proc.stderr.splitlines()), proc.stderr


def test_nan_images_are_refused_by_prompt_prefix_and_forward():
    from intcoop.clip import register_tiny_clip
    from intcoop.model import IntCoOp

    register_tiny_clip()
    model = IntCoOp.from_clip("intcoop-tiny", None)
    x = torch.zeros(2, 3, 32, 32)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(ImageInputError, match=r"NaN or inf values in image\(s\) \[1\]"):
        model.prompt_prefix(x)
    with pytest.raises(ImageInputError, match="NaN"):
        model(x, ["a", "b"])
    assert model.prompt_prefix(x[:1]).shape[0] == 1                 # finite images pass
