"""PromptSRC's self-regularisation and Gaussian prompt aggregation (intcoop.train.selfreg, and their use by the
objective, the step and the Trainer): the losses against plain formulas, the frozen targets against frozen CLIP,
the GPA weights and sums, a tiny run whose final prompt is the aggregate, and resume = uninterrupted.
"""
import csv
import math

import pytest
import torch

import intcoop
from intcoop.config import DataConfig, RunConfig, TrainConfig
from intcoop.data.templates import ENSEMBLE_TEMPLATES
from intcoop.train import losses, selfreg
from intcoop.train.checkpoint import read_checkpoint, save_checkpoint
from intcoop.train.step import StepModule
from intcoop.train.trainer import Trainer

G = torch.Generator().manual_seed(0)


def _rand(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------- the losses
@pytest.mark.parametrize("rows", [1, 5])
def test_scl_losses_equal_plain_formulas(rows):
    B, N, E = 5, 7, 13
    text, frozen_text = _rand(rows, N, E), 3 * _rand(N, E)
    img, frozen_img = _rand(B, E), _rand(B, E) + 0.5
    want_text = (_unit(text) - _unit(frozen_text)[None]).abs().sum() / (rows * N * E)
    want_img = (_unit(img) - _unit(frozen_img)).abs().sum() / (B * E)
    assert selfreg.scl_text(text, frozen_text).dtype == torch.float64
    torch.testing.assert_close(selfreg.scl_text(text, frozen_text), want_text, rtol=1e-12, atol=0)
    torch.testing.assert_close(selfreg.scl_image(img, frozen_img), want_img, rtol=1e-12, atol=0)
    assert selfreg.scl_image(img.float(), frozen_img.float()).dtype == torch.float32


def test_scl_logits_is_kl_of_zero_shot_to_model():
    B, N = 6, 11
    logits, zs = 4 * _rand(B, N), 4 * _rand(B, N)

    def kl(a, b):                                   # sum_{b,c} pa (log pa - log pb) / (B N), pa = softmax(a)
        pa, pb = a.exp() / a.exp().sum(1, keepdim=True), b.exp() / b.exp().sum(1, keepdim=True)
        return (pa * (pa.log() - pb.log())).sum() / (B * N)

    want, swapped = kl(zs, logits), kl(logits, zs)
    assert abs(float(want - swapped)) > 1e-3 * float(want)        # the direction matters on these inputs
    got = selfreg.scl_logits(logits, zs)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    assert abs(float(got - swapped)) > 1e-3 * float(want)
    assert selfreg.scl_logits(zs, zs).abs() < 1e-15


def test_objective_adds_the_weighted_terms_once():
    B, N, E = 3, 5, 9
    logits, labels = _rand(B, N).float(), torch.tensor([0, 4, 2])
    text, ft, img, fi, zs = (_rand(*s).float() for s in ((1, N, E), (N, E), (B, E), (B, E), (B, N)))
    out = losses.objective(logits, labels, text=text, feats=img, frozen_feats=fi, frozen_text=ft, zs_logits=zs,
                           lambda_scl_text=25, lambda_scl_image=10, lambda_scl_logits=1, lambda_reg=0)
    parts = [selfreg.scl_text(text, ft), selfreg.scl_image(img, fi), selfreg.scl_logits(logits, zs)]
    for k, v in zip(("scl_text", "scl_image", "scl_logits"), parts):
        torch.testing.assert_close(out[k], v)
    scl = 25 * parts[0] + 10 * parts[1] + parts[2]
    torch.testing.assert_close(out["scl"], scl)
    torch.testing.assert_close(out["loss"], losses.cross_entropy(logits, labels) + scl)
    off = losses.objective(logits, labels)
    assert all(off[k].item() == 0 for k in ("scl_text", "scl_image", "scl_logits", "scl"))
    with pytest.raises(ValueError, match="lambda_scl_logits=1 needs zs_logits"):
        losses.objective(logits, labels, lambda_scl_logits=1)


# ------------------------------------------------------------------------------------------ frozen targets
def test_ensemble_templates_are_the_60():
    assert len(ENSEMBLE_TEMPLATES) == 60 and len(set(ENSEMBLE_TEMPLATES)) == 60
    assert all(t.count("{}") == 1 for t in ENSEMBLE_TEMPLATES)
    assert ENSEMBLE_TEMPLATES[0] == "a photo of a {}." and ENSEMBLE_TEMPLATES[-1] == "itap of the {}."


def test_ensemble_text_features_are_the_normalised_template_mean(clip_tiny):
    clip, tok = clip_tiny.model, clip_tiny.tokenizer
    names = ["golden retriever", "cat", "sea urchin"]
    with torch.no_grad():                                                   # all 180 prompts in one call
        per = clip.encode_text(tok([t.format(c) for t in ENSEMBLE_TEMPLATES for c in names])).view(60, 3, -1)
    want = _unit(per.mean(0))
    got = selfreg.ensemble_text_features(clip, tok, names, batch_size=47)    # chunks of 47 prompts: awkward
    assert got.shape == (3, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    one = selfreg.ensemble_text_features(clip, tok, names, templates=ENSEMBLE_TEMPLATES[:1])
    assert (one - got).abs().max() > 1e-3                                   # the ensemble is not one template
    with pytest.raises(ValueError, match="must contain"):
        selfreg.ensemble_text_features(clip, tok, names, templates=["a photo"])


def test_frozen_image_features_have_no_prompts(clip_tiny):
    model = intcoop.IntCoOp.from_clip(clip_tiny, conditioning="none", attributes="off", visual_prompts="independent",
                                      visual_depth=2, visual_ctx=3)
    x = torch.randn(3, 3, 32, 32, generator=G)
    with torch.no_grad():
        want = clip_tiny.model.encode_image(x)
        prompted = model.image_features(x)[0]
    got = selfreg.frozen_image_features(model, x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - prompted).abs().max() > 1e-4 and not got.requires_grad


# --------------------------------------------------------------------------------------------- the step
def _step_inputs(model, names, B=5, images=True):
    x = torch.randn(B, 3, 32, 32, generator=G)
    labels = torch.tensor([i % len(names) for i in range(B)])
    if images:
        return x, None, None, labels, None, None, None, None
    with torch.no_grad():
        f, t = model.image_features(x)
    return None, f, t, labels, None, None, None, None


@pytest.mark.parametrize("visual", [True, False])
def test_step_scl_terms(clip_tiny, visual):
    """With visual prompts the frozen tower runs on the images; without them the given feats are frozen CLIP's, so
    L_scl_image is 0 exactly. The SCL terms equal selfreg's functions of the step's own pieces."""
    names = ["dog", "sea urchin", "cat", "fire truck"]
    kw = dict(visual_prompts="independent", visual_depth=2, visual_ctx=3) if visual else {}
    model = intcoop.IntCoOp.from_clip(clip_tiny, conditioning="none" if visual else "additive", attributes="off",
                                      text_depth=2, **kw)
    tc = TrainConfig(lambda_reg=0, lambda_scl_text=25, lambda_scl_image=10, lambda_scl_logits=1)
    frozen_text = selfreg.ensemble_text_features(model.clip, model.tokenizer, names, ENSEMBLE_TEMPLATES[:4])
    inputs = _step_inputs(model, names, images=visual)
    module = StepModule(model, model.suffixes(names), tc, use_attr=False)
    parts = module(*inputs, frozen_text=frozen_text)
    with torch.no_grad():
        if visual:
            frozen = selfreg.frozen_image_features(model, inputs[0])
            feats, tokens = model.image_features(inputs[0])
        else:
            frozen = feats = inputs[1]
            tokens = inputs[2]
        text = model.text_features(model.text_rows(model.prompt_prefix(feats=feats, tokens=tokens)), names)
        logits = model.scores(feats, text)
        zs = model.scores(frozen, frozen_text[None])
    assert text.shape[0] == (1 if visual else 5)
    torch.testing.assert_close(parts["scl_text"], selfreg.scl_text(text, frozen_text))
    torch.testing.assert_close(parts["scl_logits"], selfreg.scl_logits(logits, zs))
    if visual:
        torch.testing.assert_close(parts["scl_image"], selfreg.scl_image(feats, frozen))
        assert parts["scl_image"] > 1e-4
    else:
        assert parts["scl_image"].item() == 0
    parts["loss"].backward()
    assert all(p.grad is not None for p in model.prompt.parameters())
    with pytest.raises(ValueError, match="need frozen_text"):
        module(*inputs)
    plain = StepModule(model, model.suffixes(names), TrainConfig(lambda_reg=0), use_attr=False)(*inputs)  # 8 args
    assert plain["scl"].item() == 0 and plain["loss"].item() == pytest.approx(plain["ce"].item())


# ---------------------------------------------------------------------------------------------------- GPA
def test_gpa_weights_are_the_normalised_gaussian_pdf():
    pdf = [math.exp(-0.5 * (e - 15) ** 2) / math.sqrt(2 * math.pi) for e in range(1, 21)]
    want = [p / sum(pdf) for p in pdf]
    agg = selfreg.GaussianAggregate(20, 15, 1)
    assert agg.weights == pytest.approx(want, rel=1e-12, abs=1e-300)
    assert max(range(20), key=agg.weights.__getitem__) == 14                # epoch 15 weighs most
    far = selfreg.GaussianAggregate(3, 200, 0.5).weights                    # the pdf underflows: still sum 1
    assert sum(far) == pytest.approx(1) and far[-1] == pytest.approx(1)
    with pytest.raises(ValueError, match="train.gpa_std must be > 0"):
        selfreg.GaussianAggregate(5, 2, 0)


def test_gpa_aggregate_is_the_weighted_sum_and_survives_state_dict():
    E = 4
    states = [{"ctx": _rand(3, 5).float(), "deep.0": _rand(7).float()} for _ in range(E)]
    agg = selfreg.GaussianAggregate(E, 2.5, 1.3)
    w = agg.weights
    for e in range(2):
        agg.accumulate(states[e], e + 1)
    with pytest.raises(ValueError, match="only epochs"):
        agg.result()
    with pytest.raises(ValueError, match="epoch 4 given"):
        agg.accumulate(states[3], 4)
    again = selfreg.GaussianAggregate(E, 2.5, 1.3)
    again.load_state_dict(agg.state_dict())
    for e in range(2, E):
        again.accumulate(states[e], e + 1)
    got = again.result()
    for k in ("ctx", "deep.0"):
        want = sum(w[e] * states[e][k].double() for e in range(E))
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), want, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="gpa_mean, gpa_std"):
        selfreg.GaussianAggregate(E, 3, 1.3).load_state_dict(agg.state_dict())


# ------------------------------------------------------------------------------------------ tiny runs
def _model(clip):
    torch.manual_seed(0)
    return intcoop.IntCoOp.from_clip(clip, conditioning="none", attributes="off", text_depth=2,
                                     visual_prompts="independent", visual_ctx=3, visual_depth=2)


def _cfg(out, **train):
    base = dict(epochs=3, batch_size=8, lr=0.01, out=str(out), seed=3, log_every=1, lambda_attr=0, lambda_reg=0,
                regulariser="off", lambda_scl_text=25, lambda_scl_image=10, lambda_scl_logits=1, gpa_mean=2,
                gpa_std=1)
    return RunConfig(train=TrainConfig(**{**base, **train}), data=DataConfig(augment=True, workers=0))


def _learned(model):
    return {k: p.detach().clone() for k, p in model.prompt.named_parameters()}


def test_promptsrc_run_ends_on_the_aggregate(tmp_path, clip_tiny, small):
    """Visual + deep text prompts, the three SCL terms and GPA over 3 epochs: finite parts, an scl column > 0
    (loss = ce + scl, no other term), and the final prompt (model, last.pt, best.pt) = sum_e w_e * prompt_e."""
    per_epoch = []

    def record(trainer, info):
        if info["step_in_epoch"] == len(trainer.loader) - 1:
            per_epoch.append(_learned(trainer.model))
            assert all(torch.isfinite(info[k]) for k in ("loss", "ce", "scl_text", "scl_image", "scl_logits"))
            assert info["scl_text"] > 0 and info["scl_image"] > 0 and info["scl_logits"] > 0

    model = _model(clip_tiny)
    Trainer(_cfg(tmp_path), model, small.train, small.classnames, progress=False, callbacks=[record],
            val_items=small.val).fit()
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r["loss"]]
    assert len(rows) == 9
    for r in rows:
        assert float(r["scl"]) > 0 and math.isfinite(float(r["loss"]))
        assert float(r["loss"]) == pytest.approx(float(r["ce"]) + float(r["scl"]), rel=1e-4)
    w = selfreg.GaussianAggregate(3, 2, 1).weights
    final = _learned(model)
    assert len(per_epoch) == 3 and (per_epoch[2]["ctx"] - per_epoch[0]["ctx"]).abs().max() > 1e-5
    for k, v in final.items():
        want = sum(w[e] * per_epoch[e][k].double() for e in range(3)).float()
        assert torch.equal(v, want), f"{k}: {(v - want).abs().max().item():.3g}"
        assert not torch.equal(v, per_epoch[2][k])
    last, best = read_checkpoint(tmp_path / "last.pt"), read_checkpoint(tmp_path / "best.pt")
    for ckpt in (last, best):
        assert all(torch.equal(ckpt["prompt"][k], final[k]) for k in final)
    assert best["metrics"]["best_val_acc"] == last["metrics"]["val_acc"]
    assert last["gpa"]["done"] == [1, 2, 3]


class _Crash(RuntimeError):
    pass


def test_resume_equals_uninterrupted(tmp_path, clip_tiny, small):
    """3 epochs in one go vs. killed in the third epoch (2 done) and resumed: the same final (aggregated) prompt,
    bit for bit, and the same accumulator; a last.pt without the accumulator is refused."""
    full = _model(clip_tiny)
    Trainer(_cfg(tmp_path / "a"), full, small.train, small.classnames, progress=False).fit()

    def crash(trainer, info):
        if info["epoch"] == 2 and info["step_in_epoch"] == 1:
            raise _Crash("killed")
    cfg = _cfg(tmp_path / "b")
    with pytest.raises(_Crash):
        Trainer(cfg, _model(clip_tiny), small.train, small.classnames, progress=False, callbacks=[crash]).fit()
    ckpt = read_checkpoint(tmp_path / "b" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["gpa"]["done"] == [1, 2]
    fresh = _model(clip_tiny)
    Trainer(cfg, fresh, small.train, small.classnames, progress=False).fit(resume=True)
    a, b = _learned(full), _learned(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ga, gb = (read_checkpoint(tmp_path / d / "last.pt")["gpa"] for d in "ab")
    assert all(torch.equal(ga["sum"][k], gb["sum"][k]) for k in ga["sum"])
    save_checkpoint(tmp_path / "c" / "last.pt", {k: v for k, v in ckpt.items() if k not in ("format", "gpa")})
    with pytest.raises(ValueError, match="written without prompt aggregation"):
        Trainer(_cfg(tmp_path / "c"), _model(clip_tiny), small.train, small.classnames,
                progress=False).fit(resume=True)
