"""Deep prompts: the fast text encoder's deep tokens and the prompted image tower equal the plain references (fp64,
values and gradients) for text depth 0..12 and visual depth 0..12 on ViT-B-16 shapes and on a tiny config; the
methods' shipped prompt configurations equal the authors' semantics; the zero-shot identity with every prompt off.
"""
import pytest
import torch

import intcoop
from intcoop.clip import image_features, load_clip
from intcoop.vision import prompted_image_features
from intcoop.config import load_config, resolve_config
from intcoop.reference import encode_prompts_reference, reference_image_features, reference_logits, zero_shot_logits
from intcoop.testing import assert_close, perturb_prompt
from intcoop.text import encode_prompts

from conftest import _randomise, tiny_clip

NAMES = ["tree frog", "crane", "crane", "a very long class name of many words", "x"]
SHORT = NAMES[:3]                                   # the ViT-B-16-shaped runs: fewer prompts, same checks


@pytest.fixture(scope="module")
def b16():
    """ViT-B-16 shapes (width 768 / 512, 12 + 12 layers, patch 16) in float64, at 48 px (9 patches) for speed."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_image_size=48)
    _randomise(model, 0)
    return load_clip(model.double().eval(), tokenizer=open_clip.get_tokenizer("ViT-B-16"))


@pytest.fixture(scope="module")
def tiny64():
    return load_clip(tiny_clip(layers=3).double())


def _rand(*shape, seed=0, std=0.1):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * std)


def _grads(out, leaves, seed=9):
    w = _rand(*out.shape, seed=seed, std=1.0)
    return torch.autograd.grad((out * w).sum(), leaves)


@pytest.mark.parametrize("depth", range(0, 13))
def test_text_depth_fast_equals_reference_b16(b16, depth):
    """Depth J: layers 1..J-1 get their own tokens (J <= 1: none). n = 3 context tokens, P = 6; fp64."""
    D = b16.model.token_embedding.weight.shape[1]
    prefix = _rand(2, 6, D, seed=1).requires_grad_()
    deep = [_rand(3, D, seed=10 + j).requires_grad_() for j in range(max(depth - 1, 0))]
    fast = encode_prompts(b16, prefix, SHORT, deep=deep)
    ref = encode_prompts_reference(b16.model, prefix, SHORT, b16.tokenizer, deep=deep)
    assert_close(fast, ref, torch.float64)
    for a, b in zip(_grads(fast, [prefix, *deep]), _grads(ref, [prefix, *deep])):
        assert_close(a, b, torch.float64)
        assert a.abs().sum() > 0
    if deep:                                        # the tokens change the features
        assert (fast - encode_prompts(b16, prefix, SHORT)).abs().max() > 1e-6


@pytest.mark.parametrize("n", [1, 2, 4])
def test_text_deep_tokens_tiny_any_count_and_per_image(tiny64, n):
    D = 64
    prefix = _rand(3, 1 + n + 1, D, seed=2).requires_grad_()
    deep = [_rand(n, D, seed=3).requires_grad_(), _rand(3, n, D, seed=4).requires_grad_()]   # shared, per image
    fast = encode_prompts(tiny64, prefix, NAMES, deep=deep, max_rows=7)                      # chunked classes
    ref = encode_prompts_reference(tiny64.model, prefix, NAMES, tiny64.tokenizer, deep=deep)
    assert_close(fast, ref, torch.float64)
    for a, b in zip(_grads(fast, [prefix, *deep]), _grads(ref, [prefix, *deep])):
        assert_close(a, b, torch.float64)


def test_text_deep_tokens_bad_input_is_named(tiny64):
    prefix = _rand(2, 4, 64)
    with pytest.raises(ValueError, match=r"deep\[0\] must be \[n, 64\] or \[2, n, 64\] with n < P = 4"):
        encode_prompts(tiny64, prefix, NAMES, deep=[_rand(4, 64)])
    with pytest.raises(ValueError, match=r"deep\[1\] must be"):
        encode_prompts(tiny64, prefix, NAMES, deep=[_rand(2, 64), _rand(3, 2, 64)])
    with pytest.raises(ValueError, match="at most 2"):
        encode_prompts(tiny64, prefix, NAMES, deep=[_rand(2, 64)] * 3)


@pytest.mark.parametrize("depth", range(0, 13))
def test_visual_depth_fast_equals_reference_b16(b16, depth):
    """VPT-deep on open_clip's ViT-B-16: pooled features (and the patch tokens) equal the authors' sequence-first
    formulation; gradients to every layer's tokens. Depth 0: open_clip's own encode_image."""
    x = _rand(2, 3, 48, 48, seed=5, std=1.0)
    if depth == 0:
        pooled, tokens = image_features(b16.model, x, tokens=True)
        assert_close(pooled, b16.model.encode_image(x), torch.float64)
        return
    prompts = [_rand(2, 768, seed=20 + j, std=0.5).requires_grad_() for j in range(depth)]
    pooled, tokens = prompted_image_features(b16.model.visual, x, prompts, tokens=True)
    ref, ref_tokens = reference_image_features(b16.model, x, prompts)
    assert tokens.shape == (2, 1 + 9, 768)           # class + patch tokens: the prompts' outputs are dropped
    assert_close(pooled, ref, torch.float64)
    assert_close(tokens, ref_tokens, torch.float64)
    for a, b in zip(_grads(pooled, prompts), _grads(ref, prompts)):
        assert_close(a, b, torch.float64)
        assert a.abs().sum() > 0
    assert (pooled - b16.model.encode_image(x)).abs().max() > 1e-6


@pytest.mark.parametrize("n", [1, 3, 5])
def test_visual_tokens_tiny_any_count(tiny64, n):
    x = _rand(3, 3, 32, 32, seed=6, std=1.0)
    prompts = [_rand(n, 64, seed=30).requires_grad_(), _rand(3, n, 64, seed=31).requires_grad_()]
    pooled, _ = prompted_image_features(tiny64.model.visual, x, prompts, tokens=False)
    ref, _ = reference_image_features(tiny64.model, x, [prompts[0], prompts[1][0]])
    assert_close(pooled[0], ref[0], torch.float64)   # image 0 has the shared tokens of layer 1 in both
    with pytest.raises(ValueError, match="4 layers of visual prompts but the image tower has 3 layers"):
        prompted_image_features(tiny64.model.visual, x, prompts * 2)


def _method(clip, name, **extra):
    """An IntCoOp built with the model section of a shipped config (clip and weights replaced)."""
    mc = load_config(resolve_config(name)).model
    kw = {k: getattr(mc, k) for k in ("n_ctx", "ctx_init", "conditioning", "attributes", "text_depth",
                                      "visual_prompts", "visual_ctx", "visual_depth")}
    return perturb_prompt(intcoop.IntCoOp.from_clip(clip, **{**kw, **extra})).double()


@pytest.mark.parametrize("name", ["ivlp", "vpt", "maple", "promptsrc", "coop", "kgcoop", "cocoop"])
def test_method_configs_fast_equals_reference_b16(b16, name):
    """Each shipped configuration on ViT-B-16 shapes: logits and every learned gradient of the fast path equal
    the plain reference (full 77-token prompts through open_clip's blocks, the authors' image tower)."""
    model = _method(b16, name)
    x = _rand(2, 3, 48, 48, seed=7, std=1.0)
    fast, ref = model(x, SHORT), reference_logits(model, x, SHORT)
    assert_close(fast, ref, torch.float64)
    named = [(k, p) for k, p in model.prompt.named_parameters() if p.requires_grad]
    for (k, _), a, b in zip(named, _grads(fast, [p for _, p in named]), _grads(ref, [p for _, p in named])):
        assert_close(a, b, torch.float64, msg=k)
        assert a.abs().sum() > 0, k
    cfg = model.config
    assert len(model.prompt.deep_text) == max(cfg.text_depth - 1, 0)
    if name == "vpt":                                 # the text side is CLIP's hand-crafted prompt, not learned
        assert not any(k.startswith("ctx") or k.startswith("deep_text") for k, _ in named)


def test_maple_visual_tokens_are_the_text_tokens_projected(b16):
    """MaPLe's coupling: layer 0's visual tokens are Linear(ctx), layer j's Linear_j(deep_text[j - 1]), 2 -> 768;
    the deeper projections start as copies of one layer (the authors clone one Linear)."""
    model = _method(b16, "maple")
    p, sd = model.prompt, model.prompt.state_dict()
    tokens = p.visual_tokens()
    assert len(tokens) == 9 and all(t.shape == (2, 768) for t in tokens)
    assert_close(tokens[0], sd["ctx"] @ sd["visual.proj.weight"].T + sd["visual.proj.bias"], torch.float64)
    for j in range(1, 9):
        w, b = sd[f"visual.projs.{j - 1}.weight"], sd[f"visual.projs.{j - 1}.bias"]
        assert_close(tokens[j], sd[f"deep_text.{j - 1}"] @ w.T + b, torch.float64)
    fresh = intcoop.IntCoOp.from_clip(b16, n_ctx=2, text_depth=9, visual_prompts="coupled", conditioning="none",
                                      attributes="off").double()
    w = [m.weight for m in fresh.prompt.visual.projs]
    assert all(torch.equal(w[0], v) for v in w[1:]) and not torch.equal(w[0], fresh.prompt.visual.proj.weight)


def test_fixed_words_of_the_context_init_are_in_the_prefix(b16):
    """n_ctx 2 with "a photo of a": "a photo" start the context, "of a" stay fixed before the class name."""
    model = intcoop.IntCoOp.from_clip(b16, n_ctx=2, conditioning="none", attributes="off").double()
    ids = b16.tokenizer.tokenizer.encode("a photo of a") if hasattr(b16.tokenizer, "tokenizer") else \
        model.tokenizer.encode("a photo of a")
    emb = b16.model.token_embedding.weight
    torch.testing.assert_close(model.prompt.ctx.double(), emb[ids[:2]].double())
    torch.testing.assert_close(model.prompt.fixed.double(), emb[ids[2:]].double())
    x = _rand(2, 3, 48, 48, seed=8, std=1.0)
    with torch.no_grad():                         # untrained: CLIP's own "a photo of a {c}."
        assert_close(model(x, NAMES), zero_shot_logits(b16.model, b16.tokenizer, x, NAMES), torch.float64)


def test_every_prompt_off_is_zero_shot_clip(b16):
    """text_depth 0 (the context fixed at "a photo of a"), no visual prompts: zero-shot CLIP exactly."""
    model = intcoop.IntCoOp.from_clip(b16, text_depth=0, conditioning="none", attributes="off").double()
    assert not any(p.requires_grad for p in model.prompt.parameters())
    x = _rand(3, 3, 48, 48, seed=9, std=1.0)
    with torch.no_grad():
        assert_close(model(x, NAMES), zero_shot_logits(b16.model, b16.tokenizer, x, NAMES), torch.float64)


def test_intcoop_with_visual_prompts_keeps_patch_tokens_for_attention(tiny64):
    """The IntCoOp option model.visual_prompts: attention conditioning reads the prompted tower's patch tokens;
    fast == reference, gradients reach the visual tokens and the cross-attention."""
    model = perturb_prompt(intcoop.IntCoOp.from_clip(tiny64, visual_prompts="independent", visual_depth=2,
                                                     visual_ctx=3)).double()
    x = _rand(2, 3, 32, 32, seed=10, std=1.0)
    fast, ref = model(x, NAMES), reference_logits(model, x, NAMES)
    assert_close(fast, ref, torch.float64)
    params = dict(model.prompt.named_parameters())
    g_fast = dict(zip(params, _grads(fast, list(params.values()))))
    g_ref = dict(zip(params, _grads(ref, list(params.values()))))
    for k in params:
        assert_close(g_fast[k], g_ref[k], torch.float64, msg=k)
    assert g_fast["visual.tokens.1"].abs().sum() > 0 and g_fast["cond.k.weight"].abs().sum() > 0


def test_shared_text_rows_only_when_the_prefix_is_image_independent(tiny64):
    """CoOp-like prompts run the text tower on one row; conditioned ones on every image."""
    coop = intcoop.IntCoOp.from_clip(tiny64, conditioning="none", attributes="off").double()
    cond = intcoop.IntCoOp.from_clip(tiny64, conditioning="additive", attributes="off").double()
    prefix = _rand(4, coop.prompt.prefix_len, 64)
    assert coop.text_rows(prefix).shape[0] == 1 and cond.text_rows(prefix).shape[0] == 4
    x = _rand(4, 3, 32, 32, seed=11, std=1.0)
    feats, tokens = coop.image_features(x)
    one = coop.logits_from_features(feats, tokens, NAMES)
    every = coop.scores(feats, coop.text_features(coop.prompt_prefix(feats=feats, tokens=tokens), NAMES))
    assert_close(one, every, torch.float64)


def test_quick_gelu_folded_into_the_gemms_is_exact():
    """OpenAI's activation (QuickGELU): the text encoder's and the prompted image tower's MLPs fold its 1.702 into
    the GEMMs (vision.block_mlp); fp64, against open_clip's own blocks, values and gradients."""
    import open_clip

    from intcoop.vision import quick_gelu_mlps

    torch.manual_seed(1)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None, force_image_size=32)
    _randomise(model, 1)
    clip = load_clip(model.double().eval(), tokenizer=open_clip.get_tokenizer("ViT-B-16"))
    assert quick_gelu_mlps(clip.model.transformer.resblocks) and quick_gelu_mlps(clip.model.visual.transformer.resblocks)
    prefix = _rand(2, 5, 512, seed=12).requires_grad_()
    deep = [_rand(3, 512, seed=13).requires_grad_()]
    fast = encode_prompts(clip, prefix, SHORT, deep=deep)
    ref = encode_prompts_reference(clip.model, prefix, SHORT, clip.tokenizer, deep=deep)
    assert_close(fast, ref, torch.float64)
    for a, b in zip(_grads(fast, [prefix, *deep]), _grads(ref, [prefix, *deep])):
        assert_close(a, b, torch.float64)
    x = _rand(2, 3, 32, 32, seed=14, std=1.0)
    prompts = [_rand(2, 768, seed=15, std=0.5).requires_grad_(), _rand(2, 768, seed=16, std=0.5).requires_grad_()]
    pooled, _ = prompted_image_features(clip.model.visual, x, prompts)
    ref_img, _ = reference_image_features(clip.model, x, prompts)
    assert_close(pooled, ref_img, torch.float64)
    for a, b in zip(_grads(pooled, prompts), _grads(ref_img, prompts)):
        assert_close(a, b, torch.float64)
