"""The training objective (intcoop.train.losses) against hand computations, and the frozen hand-crafted text features."""
import math

import pytest
import torch
import torch.nn.functional as F

from intcoop.train import losses

G = torch.Generator().manual_seed(0)


def _rand(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def test_cross_entropy_by_hand():
    logits, labels = _rand(5, 7), torch.tensor([0, 6, 3, 3, 1])
    expected = sum(-logits[b, labels[b]] + math.log(sum(math.exp(v) for v in logits[b].tolist()))
                   for b in range(5)) / 5
    got = losses.cross_entropy(logits.float(), labels)
    assert got.dtype == torch.float32
    assert abs(got.item() - float(expected)) < 1e-5


@pytest.mark.parametrize("K", [1, 3])
def test_attribute_loss_cosine_masked_by_hand(K):
    B, D = 6, 11
    pred, target = _rand(B, K, D), _rand(B, D)
    valid = torch.tensor([True, False, True, True, False, True])
    target[1] = float("nan")                                      # unlabelled rows may hold anything
    expected, n = 0.0, 0
    for b in range(B):
        if valid[b]:
            p = pred[b].mean(0)
            expected += 1 - float(p @ target[b] / (p.norm() * target[b].norm()))
            n += 1
    got = losses.attribute_loss(pred, target, valid)
    assert abs(got.item() - expected / n) < 1e-6
    p = pred.clone().requires_grad_(True)
    losses.attribute_loss(p, target, valid).backward()
    assert torch.isfinite(p.grad).all()
    assert p.grad[1].abs().sum() == 0 and p.grad[4].abs().sum() == 0 and p.grad[0].abs().sum() > 0


def test_attribute_loss_mse_and_denominator():
    pred, target = _rand(4, 2, 5), _rand(4, 5)
    valid = torch.tensor([True, True, False, True])
    per = ((pred.mean(1) - target) ** 2).mean(-1)
    total = float(per[valid].sum())
    assert abs(losses.attribute_loss(pred, target, valid, "mse").item() - total / 3) < 1e-6
    # data parallel: the sum divided by the given (global count / world) denominator
    assert abs(losses.attribute_loss(pred, target, valid, "mse", denom=2.5).item() - total / 2.5) < 1e-6
    none = torch.zeros(4, dtype=torch.bool)
    assert losses.attribute_loss(pred, target, none).item() == 0.0
    with pytest.raises(ValueError, match="attr_loss"):
        losses.attribute_loss(pred, target, valid, "l1")


def test_regulariser_by_hand():
    B, N, E = 3, 4, 6
    text, hand = _rand(B, N, E), _rand(N, E)
    cos = [[float(text[b, c] @ hand[c] / (text[b, c].norm() * hand[c].norm())) for c in range(N)] for b in range(B)]
    expected = 1 - sum(map(sum, cos)) / (B * N)
    assert abs(losses.regulariser_loss(text, hand).item() - expected) < 1e-6
    per_image = _rand(B, N, E)
    cos = F.cosine_similarity(text, per_image, dim=-1)
    assert abs(losses.regulariser_loss(text, per_image).item() - (1 - cos.mean().item())) < 1e-6


def test_objective_weights_and_parts():
    B, N, K, D, E = 4, 5, 1, 8, 6
    logits, labels = _rand(B, N), torch.tensor([0, 1, 2, 4])
    pred, target, valid = _rand(B, K, D), _rand(B, D), torch.tensor([True, False, True, True])
    text, hand = _rand(B, N, E), _rand(N, E)
    out = losses.objective(logits, labels, pred_attrs=pred, attr_target=target, attr_valid=valid, text=text,
                           hand=hand, lambda_attr=0.5, lambda_reg=3.0)
    ce = losses.cross_entropy(logits, labels)
    attr = losses.attribute_loss(pred, target, valid)
    reg = losses.regulariser_loss(text, hand)
    torch.testing.assert_close(out["loss"], ce + 0.5 * attr + 3.0 * reg)
    torch.testing.assert_close(out["attr"], attr)
    torch.testing.assert_close(out["reg"], reg)
    off = losses.objective(logits, labels)                           # no slot, regulariser off
    assert off["attr"].item() == 0 and off["reg"].item() == 0
    torch.testing.assert_close(off["loss"], ce)


def test_hand_features_match_encode_text(clip_tiny):
    model, tok = clip_tiny.model, clip_tiny.tokenizer
    names = ["cat", "ankle boot", "crane", "crane", "sea lion"]
    template = "a photo of a {}, a type of pet."
    hand = losses.HandFeatures(model, tok, names, template)
    with torch.no_grad():
        expected = model.encode_text(tok([template.format(c) for c in names]))
    torch.testing.assert_close(hand.classes(), expected, rtol=1e-5, atol=1e-5)
    words = ["green", None, "black-and-white", "green"]
    got = hand.for_words(words)
    assert got.shape == (4, len(names), expected.shape[-1])
    for b, w in enumerate(words):
        if w is None:
            torch.testing.assert_close(got[b], expected)
            continue
        with torch.no_grad():
            want = model.encode_text(tok([losses.ATTRIBUTE_TEMPLATE.format(a=w, c=c) for c in names]))
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=2e-5)
    assert set(hand._words) == {"green", "black-and-white"}              # computed once per word
    assert not got.requires_grad


def test_hand_features_checks(clip_tiny):
    with pytest.raises(ValueError, match="empty"):
        losses.HandFeatures(clip_tiny.model, clip_tiny.tokenizer, [], "a photo of a {}.")
    with pytest.raises(ValueError, match="must contain"):
        losses.HandFeatures(clip_tiny.model, clip_tiny.tokenizer, ["cat"], "a photo")
