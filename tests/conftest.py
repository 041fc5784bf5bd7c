"""Shared fixtures: tiny and ViT-B-16-shaped open_clip models with random weights, and real photos.

No weights or data are downloaded: models are built with pretrained=None; photos come from scikit-image and
scikit-learn, which ship them.
"""
import os

import torch

if not torch.cuda.is_available():   # Triton kernels run through the interpreter on a CPU-only machine
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from intcoop.testing import patch_triton_interpreter  # noqa: E402

patch_triton_interpreter()   # old triton interpreters under numpy >= 2.4 (a no-op on triton >= 3.8)

torch.set_num_threads(min(2, torch.get_num_threads()))
# fp32 on a GPU means fp32: no TF32 in cuDNN convolutions (the patch embedding) or matmuls, whose kernel choice
# differs with the batch size and would move fp32 results by ~1e-4 between two batch sizes of the same images.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def tiny_clip(seed: int = 0, image_size: int = 32, layers: int = 2, quick_gelu: bool = False):
    """An open_clip CLIP with the real BPE vocabulary and 77-token context, but tiny towers (width 64); GELU MLPs,
    or QuickGELU ones (OpenAI's) with quick_gelu."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=48,
        vision_cfg=CLIPVisionCfg(layers=layers, width=64, head_width=32, patch_size=8, image_size=image_size),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=layers),
        quick_gelu=quick_gelu,
    )
    _randomise(model, seed)
    return model.eval()


def _randomise(model, seed):
    """open_clip initialises some weights to zero or one (biases, LayerNorm, out-projections): give every
    parameter random values so that no identity holds by accident."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            if p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="session")
def clip_tiny():
    from intcoop.clip import load_clip

    return load_clip(tiny_clip())


@pytest.fixture(scope="session")
def clip_b16():
    """ViT-B-16 shapes, random weights."""
    import open_clip

    from intcoop.clip import load_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    _randomise(model, 0)
    return load_clip(model, tokenizer=open_clip.get_tokenizer("ViT-B-16"))


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """A small ImageFolder of real photos for training runs: 4 classes x 6 training photos (seeded crops of 4
    sample photographs), 2 val and 2 test per class, 32 px."""
    from intcoop.data import load_dataset
    from intcoop.demo.data import build_demo_dataset

    root = tmp_path_factory.mktemp("small")
    build_demo_dataset(root, classes=4, per_class=6, val_per_class=2, test_per_class=2, size=32, source="photos",
                       overwrite=True)
    return load_dataset("imagefolder", root)


@pytest.fixture(scope="session")
def photos():
    """Real photos as PIL RGB images (scikit-image and scikit-learn sample images)."""
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    arrays = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()] + list(load_sample_images().images)
    return [Image.fromarray(a).convert("RGB") for a in arrays]
