"""torch.compile sees the fast path as one graph: the custom ops' fake implementations trace, no graph breaks."""
import pytest
import torch

import intcoop
from intcoop.testing import assert_close, perturb_prompt


@pytest.fixture(scope="module")
def setup(clip_tiny):
    model = perturb_prompt(intcoop.IntCoOp.from_clip(clip_tiny))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    feats, tokens = model.image_features(x)
    return model, feats, tokens, model.suffixes(["cat", "dog", "crane", "crane", "t-shirt/top"])


def test_no_graph_breaks(setup):
    model, feats, tokens, suf = setup
    explained = torch._dynamo.explain(lambda f, t: model.logits_from_features(f, t, suf))(feats, tokens)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_forward_and_backward_match_eager(setup, backend):
    model, feats, tokens, suf = setup
    torch._dynamo.reset()
    step = torch.compile(lambda f, t: model.logits_from_features(f, t, suf), backend=backend, fullgraph=True)
    params = list(model.prompt.parameters())
    eager = model.logits_from_features(feats, tokens, suf)
    compiled = step(feats, tokens)
    assert_close(compiled, eager, torch.float32)
    g_e = torch.autograd.grad(eager.square().sum(), params)
    g_c = torch.autograd.grad(compiled.square().sum(), params)
    for a, b in zip(g_c, g_e):
        assert_close(a, b, torch.float32)
