"""model.precision (fp32 | bf16 | fp16): the frozen CLIP stored and run in it, the prompt learner in float32, logits
and gradients within testing.PRECISION_TOLERANCES of float32, top-1 kept on real photos at N = 1000; the C++ CPU op
in bf16; autocast on a float32 model; the config key, the training precision rule.
"""
import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

import intcoop
from intcoop.config import RunConfig, apply_overrides
from intcoop.model import PRECISIONS
from intcoop.ops import dispatch
from intcoop.testing import PRECISION_TOLERANCES, perturb_prompt, prefix_attention_inputs
from intcoop.train.step import step_precision

from conftest import tiny_clip

NAMES = ["tabby cat", "dog", "tree frog", "golden retriever", "airliner", "x", "sea anemone"]   # 7: awkward


def _model(precision, conditioning="attention", attributes="predicted"):
    m = intcoop.IntCoOp.from_clip(tiny_clip(), precision=precision, conditioning=conditioning,
                                  attributes=attributes)
    return perturb_prompt(m).eval()


def _images(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _prompt_grads(model, x, names):
    model.train()
    model.zero_grad()
    logits = model(x, names)
    (logits.log_softmax(-1)[:, 1].sum() + logits[:, 0].sum() * 0.01).backward()
    model.eval()
    return logits, [p.grad for p in model.prompt.parameters()]


def test_storage_and_learned_dtypes():
    m = _model("bf16")
    assert m.config.precision == "bf16" and m.dtype == torch.bfloat16
    assert {p.dtype for p in m.clip.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in m.prompt.parameters()} == {torch.float32}      # what the optimiser updates
    m.set_precision("fp32")
    assert {p.dtype for p in m.clip.parameters()} == {torch.float32} and m.config.precision == "fp32"


def test_bad_precision_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"precision must be one of fp32, bf16, fp16, got 'int8'"):
        intcoop.IntCoOp.from_clip(tiny_clip(), precision="int8")
    with pytest.raises(ValueError, match="model.precision"):
        apply_overrides(RunConfig(), {"model.precision": "half"})


def test_set_override_reaches_the_model_config():
    cfg = apply_overrides(RunConfig(), {"model.precision": "bf16"})
    assert cfg.model.precision == "bf16"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("conditioning,attributes", [("attention", "predicted"), ("additive", "off"),
                                                     ("none", "predicted")])
def test_logits_and_gradients_within_the_table(precision, conditioning, attributes):
    dtype = PRECISIONS[precision]
    tol = PRECISION_TOLERANCES[dtype]
    x = _images(3)
    m32, m = _model("fp32", conditioning, attributes), _model(precision, conditioning, attributes)
    scale = float(m32.clip.logit_scale.exp())
    ref, g32 = _prompt_grads(m32, x, NAMES)
    out, g = _prompt_grads(m, x, NAMES)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() / scale <= tol["cos_atol"]
    fast = intcoop.fast_logits(x, NAMES, m)
    assert (fast - ref.detach()).abs().max() / scale <= tol["cos_atol"]
    for name, a, b in zip([n for n, _ in m.prompt.named_parameters()], g, g32):
        if b is None:                                  # e.g. the attribute extractor without a loss on it
            assert a is None, name
            continue
        assert a.dtype == torch.float32, name          # gradients reach the float32 parameters in float32
    flat = torch.cat([a.flatten() for a in g if a is not None])
    flat32 = torch.cat([b.flatten() for b in g32 if b is not None])
    assert (flat - flat32).norm() / flat32.norm() <= tol["grad_rtol"]
    assert (flat - flat32).norm() > 0                  # it did run in the lower precision


def test_top1_agrees_with_fp32_on_real_photos_at_1000_classes(photos):
    """bf16 against fp32, ImageNet's 1000 class names, the six sample photos, a tiny random CLIP.

    Required: the same top-1 on every photo whose fp32 margin (top-1 minus top-2 cosine) exceeds 2 x cos_atol (the
    table's bound on each cosine's change cannot move such a top-1), at least two photos with such a margin (the
    check is not vacuous), and the same top-1 on at least 5 of the 6 photos (a random CLIP puts some photos'
    top two classes within bf16's rounding of each other: a tie broken either way is not an error)."""
    names = list(IMAGENET_CLASSNAMES)
    assert len(names) == 1000
    tol = PRECISION_TOLERANCES[torch.bfloat16]["cos_atol"]
    m32, m16 = _model("fp32"), _model("bf16")
    ref, out = intcoop.fast_logits(photos, names, m32), intcoop.fast_logits(photos, names, m16)
    scale = float(m32.clip.logit_scale.exp())
    assert (out - ref).abs().max() / scale <= tol
    top2 = ref.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) / scale > 2 * tol
    same = out.argmax(-1) == ref.argmax(-1)
    assert clear.sum() >= 2, f"margins {((top2[:, 0] - top2[:, 1]) / scale).tolist()}"
    assert same[clear].all()
    assert same.sum() >= 5, same.tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpp_op_runs_half_types_on_the_cpu(dtype, monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    q = prefix_attention_inputs(2, 3, [2, 1], 2, 8, dtype=dtype)[0]
    impl = dispatch.choose("prefix_attention", q, q, q, q, q, head_dim=8)
    assert getattr(impl, "name", None) == "prefix_attention", impl      # intcoop._C, not the torch fallback


def test_autocast_on_a_float32_model():
    """An outer bf16 autocast: the image tower runs without it (float32, bit for bit), the text side under it;
    logits within the bf16 row of the table."""
    m = _model("fp32")
    x = _images(2)
    ref = intcoop.fast_logits(x, NAMES, m)
    feats, tokens = m.image_features(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f2, t2 = m.image_features(x)
        out = intcoop.fast_logits(x, NAMES, m)
    assert f2.dtype == torch.float32 and torch.equal(f2, feats) and torch.equal(t2, tokens)
    scale = float(m.clip.logit_scale.exp())
    assert 0 < (out - ref).abs().max() / scale <= PRECISION_TOLERANCES[torch.bfloat16]["cos_atol"]


def test_training_precision_follows_a_low_precision_model():
    assert step_precision("fp32", "auto") == "auto" and step_precision("fp32", "bf16") == "bf16"
    assert step_precision("bf16", "auto") == "bf16" and step_precision("bf16", "bf16") == "bf16"
    assert step_precision("fp16", "auto") == "fp16"
    with pytest.raises(ValueError, match="train.precision=fp32 conflicts with model.precision=bf16"):
        step_precision("bf16", "fp32")
    with pytest.raises(ValueError, match="train.precision=bf16 conflicts with model.precision=fp16"):
        step_precision("fp16", "bf16")


def test_cli_logits_precision_flag(photos, tmp_path, capsys, monkeypatch):
    """`intcoop logits --precision bf16` stores the CLIP in bf16 (seen through set_precision) and prints the table;
    a bad value is refused by the parser, naming the flag."""
    from intcoop.cli import main
    from intcoop.model import IntCoOp

    path = tmp_path / "chelsea.png"
    photos[1].save(path)
    seen = []
    real = IntCoOp.set_precision
    monkeypatch.setattr(IntCoOp, "set_precision", lambda self, p: seen.append(p) or real(self, p))
    args = ["logits", str(path), "--classes", "cat,dog,tree frog", "--clip", "intcoop-tiny", "--pretrained", "none"]
    assert main(args + ["--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert seen[-1] == "bf16" and "rank" in out and "tree frog" in out
    with pytest.raises(SystemExit):
        main(args + ["--precision", "int8"])
    assert "--precision: invalid choice: 'int8'" in capsys.readouterr().err


UPDATE_RTOL = {"fp16": 0.1, "bf16": 0.5}   # measured 0.024 and 0.40 (ctx, the worst); bf16 autocast: 0.11


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_training_a_low_precision_model_tracks_fp32(tmp_path, precision):
    """model.precision=bf16 / fp16 through the Trainer (train.precision auto follows it): the CLIP stays in it, the
    prompt learner and SGD's momentum stay float32, and two epochs (6 steps) end near the fp32 run: the last
    step's loss within what the table's cosine bound allows, and each parameter's update (final - initial) within
    UPDATE_RTOL of the fp32 update in norm. bf16 stores the image tower's outputs with 8 significant bits, and the
    6 steps amplify it: 0.40 measured, so the bound is loose, but a broken gradient path (zero, wrong sign, not
    reaching a parameter) gives >= 1. The checkpoint reloads into a model of that precision."""
    from intcoop.config import DataConfig, TrainConfig
    from intcoop.data import load_dataset
    from intcoop.demo.data import build_demo_dataset
    from intcoop.train.checkpoint import load_trained
    from intcoop.train.trainer import Trainer

    root = tmp_path / "data"
    build_demo_dataset(root, classes=3, per_class=4, val_per_class=1, test_per_class=1, size=32, source="photos",
                       overwrite=True)
    sp = load_dataset("imagefolder", root)
    out = {}
    for prec in ("fp32", precision):
        torch.manual_seed(0)
        model = intcoop.IntCoOp.from_clip(tiny_clip(), precision=prec, attributes="off")
        cfg = RunConfig(train=TrainConfig(epochs=2, batch_size=4, lr=0.01, out=str(tmp_path / prec), seed=3,
                                          log_every=1, warmup_epochs=0),
                        data=DataConfig(augment=False, workers=0))
        trainer = Trainer(cfg, model, sp.train, sp.classnames, progress=False)
        init = model.learnable_state_dict()
        out[prec] = (trainer.fit(), {k: v - init[k] for k, v in model.learnable_state_dict().items()})
        assert trainer.precision == (prec if prec != "fp32" else "auto")
        assert model.dtype == PRECISIONS[prec]
        moments = [s["momentum_buffer"] for s in trainer.opt.state.values()]
        assert moments and all(t.dtype == torch.float32 for t in moments)
    (m32, d32), (mlo, dlo) = out["fp32"], out[precision]
    # cross-entropy moves by at most 2 x the largest logit change, and a logit by exp(logit_scale) x cos_atol
    scale = tiny_clip().logit_scale.exp().item()
    assert abs(mlo["loss"] - m32["loss"]) <= 2 * scale * PRECISION_TOLERANCES[PRECISIONS[precision]]["cos_atol"]
    for k in d32:
        assert dlo[k].dtype == torch.float32 and d32[k].norm() > 0
        rel = float((dlo[k] - d32[k]).norm() / d32[k].norm())
        assert rel <= UPDATE_RTOL[precision], (k, rel)
    reloaded = load_trained(tmp_path / precision / "last.pt", tiny_clip())
    assert reloaded.dtype == PRECISIONS[precision] and reloaded.config.precision == precision


def test_slow_low_precision_matmuls_are_named_once(monkeypatch):
    """bf16 / fp16 on a CPU without their matmul instructions (AVX512-BF16 or AMX; AMX-FP16) is ~100x slower than
    fp32 there: the inference loop and the trainer warn once, naming the precision and the CPU's instruction set;
    with the instructions (or on a GPU, or in fp32) nothing is said."""
    import warnings

    from intcoop import inference

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    monkeypatch.setattr(inference, "_warned", set())
    note = inference.slow_matmul_note("bf16", "cpu")
    assert "bf16" in note and "AVX512-BF16 or AMX" in note and "fp32" in note
    assert "AMX-FP16" in inference.slow_matmul_note("fp16", "cpu")
    assert inference.slow_matmul_note("fp32", "cpu") is None and inference.slow_matmul_note("bf16", "cuda") is None
    m = _model("bf16")
    with pytest.warns(RuntimeWarning, match="bf16 on this CPU"):
        intcoop.fast_logits(_images(1), NAMES, m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        intcoop.fast_logits(_images(1), NAMES, m)                      # once per process and precision
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert inference.slow_matmul_note("bf16", "cpu") is None
