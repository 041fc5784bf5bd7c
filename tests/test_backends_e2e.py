"""The whole method through each backend, on the GPU when there is one, else on this CPU (Triton interpreted).

`INTCOOP_BACKEND` forces one backend for both ops; its logits and prompt-learner gradients must equal those of the
plain path (torch backend, CoCoOp-style 77-token loop) for the same weights; bf16 within the table's bf16
tolerance of that fp32 reference (compared as cosines); on a GPU also the compiled step (inductor) and a short
bf16-autocast training run. A backend that cannot run on this device is skipped with that reason.
"""
import copy
import csv

import pytest
import torch

import intcoop
from intcoop.config import DataConfig, RunConfig, TrainConfig
from intcoop.data import load_dataset
from intcoop.demo.data import build_demo_dataset
from intcoop.ops import dispatch
from intcoop.reference import reference_logits
from intcoop.testing import assert_close, perturb_prompt
from intcoop.train.trainer import Trainer

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NAMES = ["astronaut", "cat", "crane", "crane", "t-shirt/top", "a very long class name of many tokens"]
WHERE = {"triton": ("cuda", "cpu"), "cuda": ("cuda",), "cpp": ("cpu",), "torch": ("cuda", "cpu")}
CHOSEN = {"triton": "intcoop.kernels", "cuda": "intcoop.ops._ext", "cpp": "intcoop.ops._ext",
          "torch": "TorchPrefixAttention"}     # in the repr of the prefix_attention implementation chosen


def _force(monkeypatch, backend):
    if DEVICE not in WHERE[backend]:
        pytest.skip(f"the {backend} backend does not run on {DEVICE}" + ("" if CUDA else " (no CUDA device)"))
    monkeypatch.setenv("INTCOOP_BACKEND", backend)
    assert CHOSEN[backend] in repr(dispatch.choose("prefix_attention", torch.ones(1, device=DEVICE)))


@pytest.fixture(scope="module")
def model(clip_tiny):
    """On DEVICE; a copy of the session's tiny CLIP, which other tests keep using on the CPU."""
    return perturb_prompt(intcoop.IntCoOp.from_clip(copy.deepcopy(clip_tiny))).to(DEVICE)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7)).to(DEVICE)


def _logits_and_grads(model, images, fn):
    logits = fn(model, images, NAMES)
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(logits)
    return logits, torch.autograd.grad((logits * w).sum(), list(model.prompt.parameters()))


@pytest.fixture(scope="module")
def plain(model, images):
    """Logits and gradients of the plain path: torch backend, 77-token loop."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INTCOOP_BACKEND", "torch")
        return _logits_and_grads(model, images, reference_logits)


@pytest.mark.parametrize("backend", list(WHERE))
def test_fast_path_equals_plain_path(monkeypatch, model, images, plain, backend):
    _force(monkeypatch, backend)
    logits, grads = _logits_and_grads(model, images, lambda m, x, n: m(x, n))
    ref_logits, ref_grads = plain
    assert logits.device.type == DEVICE
    assert_close(logits, ref_logits, torch.float32, f"{backend} logits")
    for (name, _), g, r in zip(model.prompt.named_parameters(), grads, ref_grads):
        assert_close(g, r, torch.float32, f"{backend} d{name}")
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_bf16_within_tolerance(monkeypatch, model, images, plain, backend):
    _force(monkeypatch, backend)
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    logits = intcoop.fast_logits(images, NAMES, m16)          # images cast to the model's dtype inside
    scale = float(model.clip.logit_scale.exp())               # cosines: the bf16 tolerances are for O(1) values
    assert_close(logits / scale, plain[0].detach().cpu() / scale, torch.bfloat16, backend)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (tests/test_compile.py covers the CPU)")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compiled_step_equals_eager_on_gpu(monkeypatch, model, images, backend):
    _force(monkeypatch, backend)
    feats, tokens = model.image_features(images)
    suf = model.suffixes(NAMES)
    torch._dynamo.reset()
    step = torch.compile(lambda f, t: model.logits_from_features(f, t, suf), backend="inductor", fullgraph=True)
    eager = model.logits_from_features(feats, tokens, suf)
    compiled = step(feats, tokens)
    assert_close(compiled, eager, torch.float32)
    params = list(model.prompt.parameters())
    for a, b in zip(torch.autograd.grad(compiled.square().sum(), params),
                    torch.autograd.grad(eager.square().sum(), params)):
        assert_close(a, b, torch.float32)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (tests/train/test_trainer.py covers the CPU)")
def test_training_on_gpu_bf16_compiled(tmp_path, clip_tiny):
    """A short run on real photos: bf16 autocast, compiled step, cached features; the loss falls, a checkpoint
    is written, and evaluation runs on the GPU."""
    root = build_demo_dataset(tmp_path / "photos", classes=6, per_class=8, val_per_class=1, test_per_class=4,
                              size=32, seed=0, source="photos")
    sp = load_dataset("imagefolder", root)
    torch.manual_seed(0)
    model = intcoop.IntCoOp.from_clip(copy.deepcopy(clip_tiny))
    cfg = RunConfig(train=TrainConfig(epochs=6, batch_size=16, lr=0.02, warmup_epochs=0, regulariser="off",
                                      out=str(tmp_path / "run"), seed=3, log_every=1, precision="bf16",
                                      compile=True, cache_features=True),
                    data=DataConfig(augment=False, workers=0))
    with pytest.warns(UserWarning, match="attribute loss is skipped"):
        trainer = Trainer(cfg, model, sp.train, sp.classnames, device="cuda", progress=False)
        trainer.fit()
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert (tmp_path / "run" / "last.pt").is_file()
    assert 0.0 <= trainer.evaluate(sp.test) <= 1.0
