"""encode_prompts against open_clip's own computation on full 77-token sequences (values and gradients)."""
import pytest
import torch

from intcoop.reference import encode_prompts_reference
from intcoop.testing import assert_close
from intcoop.text import class_suffixes, encode_prompts


def _prefix(clip, B, P, dtype=torch.float32, seed=0):
    """[SOS, P-1 random embeddings], scaled like token embeddings."""
    g = torch.Generator().manual_seed(seed)
    emb = clip.model.token_embedding.weight
    sos = emb[clip.tokenizer.sot_token_id].detach()
    rest = torch.randn(B, P - 1, emb.shape[1], generator=g) * emb.detach().std()
    return torch.cat([sos.expand(B, 1, -1), rest], 1).to(dtype)


def _max_name(tokenizer, n_tokens):
    """A class name whose '{}.' suffix with EOT takes exactly n_tokens tokens."""
    name = " ".join(["dog"] * (n_tokens - 2))
    assert len(tokenizer.encode(name + ".")) + 1 == n_tokens
    return name


NAMES = ["tree frog", "crane", "crane", "golden_retriever", "café au lait!", "x", "Ünïcödé—名前 (test)", "t-shirt/top"]


@pytest.mark.parametrize("B,P", [(1, 1), (3, 5), (2, 6)])
def test_equals_open_clip_full_sequences(clip_b16, B, P):
    prefix = _prefix(clip_b16, B, P, torch.float64, seed=B + P)
    model = clip_b16.model.double()
    try:
        fast = encode_prompts(clip_b16, prefix, NAMES)
        ref = encode_prompts_reference(model, prefix, NAMES, clip_b16.tokenizer)
    finally:
        model.float()
    assert fast.shape == (B, len(NAMES), model.text_projection.shape[1])
    assert_close(fast, ref, torch.float64)


def test_gradients_match_reference(clip_tiny):
    model = clip_tiny.model.double()
    try:
        prefix = _prefix(clip_tiny, 3, 6, torch.float64, seed=3).requires_grad_()
        names = NAMES[:5]
        fast = encode_prompts(clip_tiny, prefix, names)
        ref = encode_prompts_reference(model, prefix, names, clip_tiny.tokenizer)
        w = torch.randn(fast.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        (g_fast,) = torch.autograd.grad((fast * w).sum(), prefix)
        (g_ref,) = torch.autograd.grad((ref * w).sum(), prefix)
    finally:
        model.float()
    assert_close(fast, ref, torch.float64)
    assert g_ref.abs().sum() > 0
    assert_close(g_fast, g_ref, torch.float64)


def test_fp32_names_of_every_length(clip_tiny):
    """Names of 1 token up to the longest that fits after a 6-token prefix, N = 1 and many, B = 1."""
    tok = clip_tiny.tokenizer
    longest = 77 - 6
    names = ["a"] + [_max_name(tok, n) for n in (3, 4, 7, 13, longest)]
    prefix = _prefix(clip_tiny, 1, 6)
    fast = encode_prompts(clip_tiny, prefix, names)
    ref = encode_prompts_reference(clip_tiny.model, prefix, names, tok)
    assert_close(fast, ref, torch.float32)
    single = encode_prompts(clip_tiny, prefix, [names[-1]])
    assert_close(single[:, 0], ref[:, -1], torch.float32)


def test_duplicates_give_identical_rows(clip_tiny):
    out = encode_prompts(clip_tiny, _prefix(clip_tiny, 2, 5), ["crane", "bird", "crane"])
    assert_close(out[:, 0], out[:, 2], torch.float32)
    assert not torch.allclose(out[:, 0], out[:, 1])


def test_chunking_over_classes_is_exact(clip_tiny):
    prefix = _prefix(clip_tiny, 3, 6)
    whole = encode_prompts(clip_tiny, prefix, NAMES)
    chunked = encode_prompts(clip_tiny, prefix, NAMES, max_rows=7)    # forces one class per chunk
    assert_close(chunked, whole, torch.float32)


def test_custom_suffix(clip_tiny):
    prefix = _prefix(clip_tiny, 2, 3)
    suffix = "{}, a type of pet."
    fast = encode_prompts(clip_tiny, prefix, NAMES[:3], suffix=suffix)
    ref = encode_prompts_reference(clip_tiny.model, prefix, NAMES[:3], clip_tiny.tokenizer, suffix)
    assert_close(fast, ref, torch.float32)


def test_tokenisation_is_cached(clip_tiny, monkeypatch):
    """A second call with the same class list (list or tuple) and suffix does no tokenisation; another list or
    another suffix does. The names are used by no other test, so the first call cannot hit the cache."""
    tok = clip_tiny.tokenizer
    calls = []
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, *a, **kw: calls.append(text) or real(text, *a, **kw))
    names = ["cache probe okapi", "cache probe quokka", "cache probe okapi"]
    first = class_suffixes(tok, names, "{}.", 6)
    assert calls == [f"{n}." for n in names]                 # one encode per name on the first call
    calls.clear()
    again = class_suffixes(tok, tuple(names), "{}.", 6)
    assert calls == []                                       # cached: no tokenisation at all
    assert again.lengths == first.lengths and torch.equal(again.ids, first.ids) and torch.equal(again.cu, first.cu)
    class_suffixes(tok, names[:2], "{}.", 6)                 # a different class list tokenises
    assert calls == [f"{n}." for n in names[:2]]
    calls.clear()
    class_suffixes(tok, names, "{}, a kind of animal.", 6)   # the same list under another suffix tokenises
    assert len(calls) == len(names)


def test_tokenisation_matches_open_clip(clip_b16):
    tok = clip_b16.tokenizer
    a = class_suffixes(tok, NAMES, "{}.", 6)
    full = tok([f"{n}." for n in NAMES])
    for c, name in enumerate(NAMES):
        seg = a.ids[a.cu[c]:a.cu[c + 1]].tolist()
        assert seg == full[c, 1:1 + len(seg)].tolist()      # open_clip's tokens after SOS, EOT included
        assert seg[-1] == tok.eot_token_id


@pytest.mark.parametrize("names,match", [
    ([], "empty"),
    ("cat", "list of names"),
    (["cat", ""], "non-empty strings"),
    (["cat", 3], "non-empty strings"),
])
def test_bad_class_lists(clip_tiny, names, match):
    with pytest.raises((ValueError, TypeError), match=match):
        encode_prompts(clip_tiny, _prefix(clip_tiny, 1, 5), names)


def test_too_long_name_is_named(clip_tiny):
    long = " ".join(["dog"] * 80)
    with pytest.raises(ValueError, match=r"class name 'dog dog.*too long"):
        encode_prompts(clip_tiny, _prefix(clip_tiny, 1, 5), ["cat", long])
    # exactly the longest that fits is accepted
    encode_prompts(clip_tiny, _prefix(clip_tiny, 1, 5), [_max_name(clip_tiny.tokenizer, 72)])


def test_bad_prefix(clip_tiny):
    with pytest.raises(ValueError, match=r"\[B, P, 64\]"):
        encode_prompts(clip_tiny, torch.randn(2, 5, 63), ["cat"])
    with pytest.raises(ValueError, match="floating point"):
        encode_prompts(clip_tiny, torch.ones(2, 5, 64, dtype=torch.long), ["cat"])


@pytest.mark.parametrize("quick", [False, True], ids=["gelu", "quickgelu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_inference_reuses_buffers_and_equals_the_reference(quick, dtype, monkeypatch):
    """Autograd off: the suffix pass writes into buffers it reuses layer after layer and adds the residuals in
    place (text.Scratch). Its features equal the allocating path's (autograd on) and open_clip's 77-token
    sequences: to fp64 rounding, and in bf16 within the bf16 tolerance (GELU and QuickGELU MLPs, deep tokens)."""
    from conftest import tiny_clip

    from intcoop import text
    from intcoop.clip import load_clip
    from intcoop.testing import PRECISION_TOLERANCES

    clip = load_clip(tiny_clip(seed=3, layers=4, quick_gelu=quick).to(dtype))
    assert text.TextTower(clip.model)._quick == quick
    prefix = _prefix(clip, 3, 5, dtype, seed=4)
    deep = [torch.randn(3, 64, generator=torch.Generator().manual_seed(5)).to(dtype) * 0.02]
    names = NAMES * 3
    asked = []
    real_get = text.Scratch.get
    monkeypatch.setattr(text.Scratch, "get", lambda self, name, shape, like: asked.append(name) or
                        real_get(self, name, shape, like))
    with torch.inference_mode():
        fast = encode_prompts(clip, prefix, names, deep=deep)
    assert {"qkv", "mlp"} <= set(asked), asked                 # the buffered path ran
    asked.clear()
    with torch.enable_grad():
        plain = encode_prompts(clip, prefix.clone().requires_grad_(), names, deep=deep)
    assert not asked                                                   # and this one did not
    with torch.no_grad():
        ref = encode_prompts_reference(clip.model, prefix, names, clip.tokenizer, deep=deep)
    if dtype == torch.float64:
        assert_close(fast, plain.detach(), dtype)
        assert_close(fast, ref, dtype)
    else:
        cos = PRECISION_TOLERANCES[dtype]["cos_atol"]
        unit = [torch.nn.functional.normalize(t.detach().float(), dim=-1) for t in (fast, plain, ref)]
        assert float((unit[0] - unit[2]).abs().max()) <= cos
        assert float((unit[0] - unit[1]).abs().max()) <= cos


def test_template_features_equal_encode_text(clip_tiny, monkeypatch):
    """text.template_features: encode_text(t.format(c)) for every template and class, the head as a prefix run once
    and the names as packed suffixes; a template whose split tokenisation differs ("a photo of a{}": "adog" is
    not "a" + "dog") or whose prompt is longer than the context goes through encode_text, as before."""
    from intcoop.text import template_features

    clip, tok = clip_tiny.model, clip_tiny.tokenizer
    long = _max_name(tok, 75)                                          # fits "{}." alone, not after a head
    names = ["dog", "tree frog", "crane", "crane", "café au lait!", long]
    templates = ["a photo of a {}.", "{} in the wild", "itap of the {}.", "a photo of a{}"]
    calls = []
    real = clip.encode_text
    monkeypatch.setattr(clip, "encode_text", lambda ids, **kw: calls.append(ids.shape[0]) or real(ids, **kw))
    got = template_features(clip, tok, templates, names, batch_size=4)
    assert got.shape == (4, len(names), clip.text_projection.shape[1]) and got.dtype == torch.float32
    assert calls == [4, 2, 4, 2, 4, 2, 4, 2]       # the long name: every template through encode_text
    calls.clear()
    got_short = template_features(clip, tok, templates, names[:-1])
    assert calls == [5]                             # without it, only the glued head
    with torch.no_grad():
        want = torch.stack([real(tok([t.format(c) for c in names])) for t in templates])
    assert_close(got, want, torch.float32)
    assert_close(got_short, want[:, :-1], torch.float32)
    assert (got[0, 2] == got[0, 3]).all()           # duplicate names, identical rows
