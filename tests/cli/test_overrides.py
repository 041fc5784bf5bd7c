"""`--set` as a person types it: errors quote the override, suggest the nearest key, convert and range-check values
before any model is built, name the related field, never blame the shipped YAML; none / None / null = no weights."""
from __future__ import annotations

import time

import pytest

from intcoop.cli import main
from intcoop.config import load_config, parse_overrides, resolve_config

DEMO = resolve_config("demo_cpu")


def _error(overrides, flag="--set"):
    with pytest.raises(ValueError) as info:
        load_config(DEMO, parse_overrides(overrides, flag=flag))
    return str(info.value)


def test_unknown_key_names_the_override_and_suggests():
    msg = _error(["train.epoch=5"])
    assert msg.startswith("--set train.epoch=5:") and "did you mean train.epochs?" in msg
    assert "demo_cpu.yaml" not in msg                                  # the shipped file is not to blame
    assert "did you mean data.shots?" in _error(["train.shots=4"])     # right name, wrong section
    assert "did you mean train?" in _error(["trian.lr=0.1"])
    assert "did you mean" not in _error(["train.zzz=1"]) and "epochs" in _error(["train.zzz=1"])
    assert _error({"train.epoch": 3}, flag=None).startswith("override 'train.epoch'")   # Python: no flag named


@pytest.mark.parametrize("item, words", [
    ("train.epochs=abc", "train.epochs expects an integer, got 'abc'"),
    ("train.epochs=0", "train.epochs must be >= 1, got 0"),
    ("train.epochs=2.5", "expects an integer"),
    ("train.lr=-1", "train.lr must be > 0"),
    ("train.lr=0", "train.lr must be > 0"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("train.label_noise=1.5", "train.label_noise must be in [0, 1]"),
    ("model.conditioning=atention", "model.conditioning must be one of attention, additive, none"),
    ("data.augment=maybe", "data.augment expects true or false"),
])
def test_values_are_converted_and_checked(item, words):
    msg = _error([item])
    assert msg.startswith(f"--set {item}:") and words in msg


def test_values_convert_to_the_field_type():
    cfg = load_config(DEMO, parse_overrides(["train.lr=1e-3", "train.epochs=3", "data.augment=yes",
                                             "model.ctx_init=a photo", "model.n_ctx=2"]))
    assert (cfg.train.lr, cfg.train.epochs, cfg.data.augment) == (0.001, 3, True)
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.train.epochs, int)
    assert (cfg.model.n_ctx, cfg.model.ctx_init) == (2, "a photo")
    assert load_config(DEMO, parse_overrides(["model.n_ctx=3", "model.ctx_init="])).model.ctx_init == ""


@pytest.mark.parametrize("word", ["none", "None", "null", "NULL", "~"])
def test_none_words_mean_no_weights(word):
    assert load_config(DEMO, parse_overrides([f"model.pretrained={word}"])).model.pretrained is None
    assert load_config(DEMO, {"model.pretrained": word}).model.pretrained is None


def test_n_ctx_against_ctx_init_names_the_field_to_change():
    msg = _error(["model.n_ctx=6"])
    assert msg.startswith("--set model.n_ctx=6:") and "model.ctx_init" in msg and "4 tokens" in msg
    cfg = load_config(DEMO, parse_overrides(["model.n_ctx=2"], flag="--set"))   # fewer: "of a" stay fixed words
    assert cfg.model.prefix_len == 1 + 2 + 2 + (0 if cfg.model.attributes == "off" else cfg.model.attr_tokens)


def test_deep_prompt_fields_that_must_agree():
    msg = _error(["model.visual_prompts=independent"])       # the shipped demo caches features: blame the override
    assert msg.startswith("--set model.visual_prompts=independent:") and "train.cache_features needs" in msg
    off = ["train.cache_features=false"]
    assert "needs model.text_depth >= 1" in _error(off + ["model.visual_prompts=coupled", "model.text_depth=0"])
    assert "model.visual_prompts must be one of off, independent, coupled" in _error(["model.visual_prompts=deep"])
    assert "model.visual_depth must be >= 1" in _error(["model.visual_depth=0"])
    assert "train.gpa_std = 0" in _error(["train.gpa_mean=15"])


def test_bad_yaml_entries_name_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ValueError, match=r"mine.yaml: unknown field train.epoch; did you mean train.epochs\?"):
        load_config(path)
    path.write_text("train:\n  lr: -2\n")
    with pytest.raises(ValueError, match=r"mine.yaml: train.lr must be > 0"):
        load_config(path)


def test_cli_set_errors_are_one_line_before_any_model_is_built(capsys):
    start = time.perf_counter()
    assert main(["train", "--config", "demo_cpu", "--set", "train.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "intcoop train: error: --set train.lr=-1: train.lr must be > 0, got -1.0"
    assert main(["train", "--config", "demo_cpu", "--set", "train.epoch=5"]) == 2
    err = capsys.readouterr().err
    assert "--set train.epoch=5: unknown field train.epoch; did you mean train.epochs?" in err
    assert "Traceback" not in err and "demo_cpu.yaml" not in err
    assert time.perf_counter() - start < 10                            # no CLIP was built (that takes longer)
