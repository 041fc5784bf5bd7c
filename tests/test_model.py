"""IntCoOp: the zero-shot identity, fast logits = reference logits for every switch, gradients, attribute modes."""
import pytest
import torch

import intcoop
from intcoop.clip import WeightsUnavailable, image_size
from intcoop.images import to_batch
from intcoop.reference import reference_logits, zero_shot_logits
from intcoop.testing import assert_close, perturb_prompt

NAMES = ["astronaut", "cat", "coffee", "rocket", "crane", "crane", "flower"]


def test_untrained_model_is_clip_zero_shot(clip_b16, photos):
    """METHOD.md identity: W_o = 0, attribute slot off -> CLIP's logits for 'a photo of a {c}.' (real photos)."""
    model = intcoop.IntCoOp.from_clip(clip_b16, attributes="off")
    x = to_batch(photos, clip_b16.preprocess, image_size(clip_b16.model))
    with torch.no_grad():
        expected = zero_shot_logits(clip_b16.model, clip_b16.tokenizer, x, NAMES)
    got = intcoop.fast_logits(x, NAMES, model)
    assert got.shape == (len(photos), len(NAMES))
    assert_close(got, expected, torch.float32)


@pytest.mark.parametrize("conditioning", ["attention", "additive", "none"])
@pytest.mark.parametrize("attributes", ["predicted", "shuffled", "off"])
def test_fast_equals_reference(clip_tiny, conditioning, attributes):
    model = perturb_prompt(intcoop.IntCoOp.from_clip(clip_tiny, conditioning=conditioning, attributes=attributes))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fast = model(x, NAMES)
    ref = reference_logits(model, x, NAMES)
    assert_close(fast, ref, torch.float32)
    params = [p for p in model.prompt.parameters()]
    w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(2))
    g_fast = torch.autograd.grad((fast * w).sum(), params)
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    for (name, _), a, b in zip(model.prompt.named_parameters(), g_fast, g_ref):
        assert_close(a, b, torch.float32, msg=name)
    assert sum(g.abs().sum() for g in g_fast) > 0


def test_attribute_modes(clip_tiny):
    model = perturb_prompt(intcoop.IntCoOp.from_clip(clip_tiny))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prefix, pred = model.prompt_prefix(x, return_attrs=True)
    assert prefix.shape == (3, 1 + 4 + 1, 64) and pred.shape == (3, 1, 64)
    torch.testing.assert_close(prefix[:, -1:], pred)
    model.set_attributes("shuffled")
    shuffled = model.prompt_prefix(x)
    torch.testing.assert_close(shuffled[:, -1:], pred.roll(1, 0))
    torch.testing.assert_close(shuffled[:, :-1], prefix[:, :-1])
    model.set_attributes("oracle")
    targets = torch.randn(3, 64)
    targets[1] = float("nan")                       # image 1 has no label: its predicted attribute is kept
    oracle = model.prompt_prefix(x, attr_targets=targets)
    torch.testing.assert_close(oracle[[0, 2], -1], targets[[0, 2]])
    torch.testing.assert_close(oracle[1, -1], pred[1, 0])
    with pytest.raises(ValueError, match="attr_targets"):
        model.prompt_prefix(x)
    with pytest.raises(ValueError, match="slot"):
        model.set_attributes("off")
    with pytest.raises(ValueError, match="attributes must be"):
        model.set_attributes("random")


def test_context_init_and_zero_output_projection(clip_tiny):
    model = intcoop.IntCoOp.from_clip(clip_tiny)
    tok = clip_tiny.tokenizer
    emb = clip_tiny.model.token_embedding.weight
    torch.testing.assert_close(model.prompt.ctx.data, emb[tok.encode("a photo of a")])
    assert model.prompt.cond.o.weight.abs().sum() == 0
    x = torch.randn(2, 3, 32, 32)
    ctx = model.prompt.context(*model.image_features(x))
    torch.testing.assert_close(ctx, model.prompt.ctx.expand(2, -1, -1))
    assert not any(p.requires_grad for p in model.clip.parameters())


def test_bad_switches(clip_tiny):
    with pytest.raises(ValueError, match="conditioning"):
        intcoop.IntCoOp.from_clip(clip_tiny, conditioning="film")
    with pytest.raises(ValueError, match="attributes must be"):
        intcoop.IntCoOp.from_clip(clip_tiny, attributes="sometimes")
    with pytest.raises(ValueError, match="n_ctx = 5"):
        intcoop.IntCoOp.from_clip(clip_tiny, n_ctx=5)       # "a photo of a" has 4 tokens: too few
    three = intcoop.IntCoOp.from_clip(clip_tiny, n_ctx=3)   # legal: "a photo of" learned, the last "a" fixed
    assert three.prompt.fixed.shape[0] == 1 and three.prompt.prefix_len == three.config.prefix_len == 1 + 3 + 1 + 1
    with pytest.raises(ValueError, match=r"text_depth must be in \[0, 2\]"):
        intcoop.IntCoOp.from_clip(clip_tiny, text_depth=3)  # the tiny text tower has 2 layers
    with pytest.raises(ValueError, match=r"visual_depth must be in \[1, 2\]"):
        intcoop.IntCoOp.from_clip(clip_tiny, visual_prompts="independent", visual_depth=3)
    with pytest.raises(ValueError, match="visual_prompts must be one of"):
        intcoop.IntCoOp.from_clip(clip_tiny, visual_prompts="deep")


def test_from_name_random_weights_and_offline_error(monkeypatch):
    model = intcoop.IntCoOp.from_clip("ViT-B-16", None, attributes="off")
    assert model.prompt.prefix_len == 5 and model.clip_name == "ViT-B-16"
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                       # no network retries: fail at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailable, match="pretrained="):
        intcoop.IntCoOp.from_clip("ViT-B-16", "openai")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        intcoop.IntCoOp.from_clip("ViT-Nope-1", None)


def test_attention_conditioning_under_bf16_autocast(clip_tiny, monkeypatch):
    """Custom ops are not autocast: the conditioner casts fp32 patch tokens to the autocast dtype itself (tensor
    cores on a GPU), and the prefix stays within the bf16 tolerance of fp32."""
    from intcoop.ops import patch_pool as pp

    model = perturb_prompt(intcoop.IntCoOp.from_clip(clip_tiny))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    feats, tokens = model.image_features(x)
    seen = []
    real = pp.dispatch.choose
    monkeypatch.setattr(pp.dispatch, "choose", lambda op, *t, **kw: seen.append(t[1].dtype) or real(op, *t, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.prompt_prefix(feats=feats, tokens=tokens)
    assert seen and set(seen) == {torch.bfloat16}
    assert_close(mixed.float(), model.prompt_prefix(feats=feats, tokens=tokens), torch.bfloat16)
