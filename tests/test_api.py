"""fast_logits: tensors, PIL images and files give the same logits; bad input fails before any work, named."""
import numpy as np
import pytest
import torch
from PIL import Image

import intcoop
from intcoop.images import ImageInputError

NAMES = ["astronaut", "cat", "coffee"]


@pytest.fixture(scope="module")
def model(clip_tiny):
    return intcoop.IntCoOp.from_clip(clip_tiny)


def test_paths_pil_and_tensor_agree(model, photos, tmp_path):
    paths = []
    for i, im in enumerate(photos[:3]):
        paths.append(tmp_path / f"p{i}.png")
        im.save(paths[-1])
    x = torch.stack([model.preprocess(im) for im in photos[:3]])
    a = intcoop.fast_logits(x, NAMES, model)
    b = intcoop.fast_logits(photos[:3], NAMES, model)
    c = intcoop.fast_logits([str(p) for p in paths], NAMES, model)
    assert a.shape == (3, 3) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    one = intcoop.fast_logits(photos[0], NAMES, model)
    torch.testing.assert_close(one, a[:1])


def test_chunks_of_images_and_classes_are_exact(model, photos):
    x = torch.stack([model.preprocess(im) for im in photos])
    whole = intcoop.fast_logits(x, NAMES * 5, model)
    chunked = intcoop.fast_logits(x, NAMES * 5, model, batch_size=2, max_rows=10)
    torch.testing.assert_close(chunked, whole, rtol=2e-4, atol=2e-5)


def test_compiled_equals_eager(model, photos):
    """compile=True (inductor) over chunks of unequal size (a recompile, dynamic): the eager logits."""
    from intcoop.testing import assert_close, perturb_prompt

    m = perturb_prompt(intcoop.IntCoOp.from_clip(model.clip))
    x = torch.stack([m.preprocess(im) for im in photos])
    torch._dynamo.reset()
    compiled = intcoop.fast_logits(x, NAMES * 2, m, batch_size=3, compile=True)
    assert_close(compiled, intcoop.fast_logits(x, NAMES * 2, m), torch.float32)


def test_grey_and_palette_images_are_converted(model, photos):
    grey = photos[0].convert("L")
    torch.testing.assert_close(intcoop.fast_logits(grey, NAMES, model),
                               intcoop.fast_logits(grey.convert("RGB"), NAMES, model))


@pytest.mark.parametrize("bad,match", [
    (torch.randn(3, 32, 32), r"batch \[B, 3, H, W\]"),
    (torch.randn(2, 1, 32, 32), r"shape \(2, 1, 32, 32\)"),
    (torch.randn(2, 3, 64, 64), "64x64 px"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "dtype torch.uint8"),
    (torch.full((2, 3, 32, 32), float("nan")), "NaN"),
    (torch.randn(0, 3, 32, 32), "empty"),
    ([], "no images"),
    ([42], "is a int"),
])
def test_bad_images(model, bad, match):
    with pytest.raises(ImageInputError, match=match):
        intcoop.fast_logits(bad, NAMES, model)


def test_bad_files_are_named_before_work(model, photos, tmp_path, monkeypatch):
    good = tmp_path / "good.png"
    photos[0].save(good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    called = []
    monkeypatch.setattr(model, "image_features", lambda *a, **k: called.append(1))
    with pytest.raises(ImageInputError, match="broken.jpg"):
        intcoop.fast_logits([good, broken], NAMES, model)
    with pytest.raises(ImageInputError, match="not found: .*missing.png"):
        intcoop.fast_logits([good, tmp_path / "missing.png"], NAMES, model)
    with pytest.raises(ValueError, match="empty"):
        intcoop.fast_logits([good], [], model)
    assert not called


def test_sixteen_bit_mode_is_refused(model):
    im = Image.new("I;16", (32, 32))
    im.putdata(list(np.arange(32 * 32) * 50))
    with pytest.raises(ImageInputError, match="mode 'I;16'"):
        intcoop.fast_logits(im, NAMES, model)
