"""compile=None means eager on this CPU; the compiled logits (two dynamic graphs, `model._compiled_logits`) serve
new class lists, batch sizes and class chunkings without recompiling, and match the eager logits."""
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from torch._dynamo.testing import CompileCounter

import intcoop
from intcoop.inference import default_compile
from intcoop.model import IntCoOp, logits_function
from intcoop.testing import assert_close, perturb_prompt

from conftest import tiny_clip


def test_compile_auto_is_eager_on_the_cpu():
    assert default_compile(torch.device("cpu")) is False
    assert logits_function(default_compile("cpu")) is IntCoOp.logits_from_features


def test_compiled_graphs_are_reused_across_class_lists_and_batch_sizes():
    """Counted with a compile-counting backend (dynamo graphs, run eagerly): the first call compiles exactly the
    two pieces (prefix, suffix). Then, asserted: no further graph for a second and a third class list (other N,
    other suffix lengths, longest and shortest suffix), a second and a third batch size (B >= 2), and a list split
    into chunks of unequal size by a small max_rows; every result equals the eager logits. Sizes of 1 (one image,
    a one-class chunk) are left out: dynamo specialises them, one more graph each."""
    torch._dynamo.reset()
    model = perturb_prompt(IntCoOp.from_clip(tiny_clip())).eval()
    counter = CompileCounter()
    compiled = logits_function(counter)
    calls = [(3, 7, 1 << 16), (3, 5, 1 << 16), (3, 12, 1 << 16), (4, 12, 1 << 16), (2, 9, 1 << 16),
             (5, 40, 150)]                 # the last: 40 classes in 6 chunks of 5-8 classes (about 150 packed rows)
    for i, (B, N, max_rows) in enumerate(calls):
        x = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(i))
        names = list(IMAGENET_CLASSNAMES[20 * i:20 * i + N])
        with torch.inference_mode():
            feats, tokens = model.image_features(x)
            suf = model.suffixes(names)
            out = compiled(model, feats, tokens, suf, None, max_rows)
            ref = model.logits_from_features(feats, tokens, suf, None, max_rows)
        assert_close(out, ref, torch.float32, f"call {i}: B={B}, N={N}")
        assert counter.frame_count == 2, f"call {i} (B={B}, N={N}) compiled again: {counter.frame_count} graphs"
    sizes = [len(c.lengths) for c in model.suffixes(list(IMAGENET_CLASSNAMES[100:140])).chunks(5, 150)]
    assert len(sizes) > 2 and len(set(sizes)) > 1 and min(sizes) >= 2, sizes   # unequal chunks, none of 1 class


def test_fast_logits_compile_none_matches_eager():
    model = perturb_prompt(IntCoOp.from_clip(tiny_clip())).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    names = ["cat", "tree frog", "airliner"]
    assert torch.equal(intcoop.fast_logits(x, names, model), intcoop.fast_logits(x, names, model, compile=False))
