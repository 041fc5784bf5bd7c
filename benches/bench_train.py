"""One training step of the engine against a CoCoOp-style step (per-image loop over N full 77-token prompts).

ViT-B-16-shaped random weights, fp32, this machine's CPU (threads from benches/conftest.py: 2 by default) or the
GPU when there is one. Both steps start from the frozen image tower's outputs (feature + patch tokens, as a run
with `train.cache_features` does), then: prompt learner -> text features -> logits -> IntCoOp's objective
(cross-entropy + attribute loss + KgCoOp regulariser) -> backward -> SGD step. The engine's step is
`intcoop.train.step.StepModule` (the fast encoder); the CoCoOp-style step computes the text features with
`intcoop.reference.encode_prompts_reference`, same weights, same objective.

The engine runs at B = 32, N = 100 ImageNet class names; the reference at N = 100 costs tens of seconds per image
here, so it runs at B = 2 and the comparison is per image (stated in extra_info). Before timing, both steps are run
at a small size (B = 3, N = 7) and their losses and every gradient must agree.

Peak memory: on a GPU, torch.cuda.max_memory_allocated during the step minus the allocation before it; on the CPU a
thread samples the process's resident set size (/proc/self/statm) every 2 ms during the step, after malloc_trim;
reported is the peak minus the level just before the step (MiB).
"""
import ctypes
import threading

import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from intcoop.train import losses
from intcoop.config import TrainConfig
from intcoop.reference import encode_prompts_reference
from intcoop.testing import assert_close
from intcoop.benchmarking import wall_median, wall_time
from intcoop.train.step import StepModule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B_FAST, B_REF, N = 32, 2, 100
TC = TrainConfig()                                       # lambda_attr 1, lambda_reg 8, cosine attribute loss


@pytest.fixture(scope="module")
def model(vit_b16_model):
    return vit_b16_model


def _inputs(model, B, names, seed=0):
    """Cached image features, labels, attribute targets (one image in 3 unlabelled) and hand features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 224, 224, generator=g).to(DEVICE)
    feats, tokens = model.image_features(x)
    labels = torch.randint(0, len(names), (B,), generator=g).to(DEVICE)
    target = model.clip.token_embedding.weight[torch.randint(0, 49000, (B,), generator=g).to(DEVICE)].detach()
    valid = (torch.arange(B) % 3 != 2).to(DEVICE)
    hand = losses.HandFeatures(model.clip, model.tokenizer, names).classes()
    return None, feats, tokens, labels, target.float(), valid, None, hand   # (images: none, features given)


def _params(model):
    return [p for p in model.prompt.parameters()]


def fast_step(model, module, opt, inputs):
    opt.zero_grad(set_to_none=True)
    parts = module(*inputs)
    parts["loss"].backward()
    opt.step()
    return parts


def reference_step(model, names, opt, inputs):
    """The same objective with CoCoOp's text side: per image, N padded 77-token prompts through open_clip."""
    _, feats, tokens, labels, target, valid, denom, hand = inputs
    opt.zero_grad(set_to_none=True)
    prefix, pred = model.prompt_prefix(feats=feats, tokens=tokens, return_attrs=True)
    text = encode_prompts_reference(model.clip, prefix, names, model.tokenizer, model.config.suffix)
    logits = model.scores(feats, text)
    parts = losses.objective(logits, labels, pred_attrs=pred, attr_target=target, attr_valid=valid,
                             attr_denom=denom, text=text, hand=hand, lambda_attr=TC.lambda_attr,
                             lambda_reg=TC.lambda_reg, attr_loss=TC.attr_loss)
    parts["loss"].backward()
    opt.step()
    return parts


class PeakCUDA:
    """Peak growth of PyTorch's CUDA allocations (MiB) during a `with` block."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20


class PeakRSS:
    """Peak resident set size growth (MiB) during a `with` block, sampled every 2 ms."""

    def __enter__(self):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.page = 4096
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.mib = (self.peak - self.base) / 2**20


PeakMemory = PeakCUDA if DEVICE == "cuda" else PeakRSS


def test_steps_agree(model):
    """Losses and every gradient of the two steps agree (B = 3, N = 7; no optimiser step: lr 0)."""
    names = list(IMAGENET_CLASSNAMES[:7])
    inputs = _inputs(model, 3, names, seed=1)
    module = StepModule(model, model.suffixes(names), TC, use_attr=True)
    grads = []
    for step in (lambda opt: fast_step(model, module, opt, inputs),
                 lambda opt: reference_step(model, names, opt, inputs)):
        opt = torch.optim.SGD(_params(model), lr=0.0)
        parts = step(opt)
        grads.append(([p.grad.clone() for p in _params(model)], {k: v.detach() for k, v in parts.items()}))
    (g_fast, l_fast), (g_ref, l_ref) = grads
    for k in ("loss", "ce", "attr", "reg"):
        assert_close(l_fast[k], l_ref[k], torch.float32, msg=k)
    for (name, _), a, b in zip(model.prompt.named_parameters(), g_fast, g_ref):
        assert_close(a, b, torch.float32, msg=name)
    assert l_fast["attr"] > 0 and l_fast["reg"] > 0


def test_train_step(benchmark, timed, record, model):
    names = list(IMAGENET_CLASSNAMES[:N])
    state = {k: v.clone() for k, v in model.prompt.state_dict().items()}
    inputs = _inputs(model, B_FAST, names)
    module = StepModule(model, model.suffixes(names), TC, use_attr=True)
    opt = torch.optim.SGD(_params(model), lr=1e-6, momentum=0.9)
    fast_step(model, module, opt, inputs)                               # warm-up (not timed)
    wall_time(lambda: None)                                             # waits for the GPU
    with PeakMemory() as mem_fast:
        t_fast, _ = timed(lambda: fast_step(model, module, opt, inputs), rounds=2, warmup=0)

    ref_inputs = tuple(v[:B_REF] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == B_FAST else v
                       for v in inputs)
    opt_ref = torch.optim.SGD(_params(model), lr=1e-6, momentum=0.9)
    with PeakMemory() as mem_ref:
        t_ref, _ = wall_time(reference_step, model, names, opt_ref, ref_inputs)
    model.prompt.load_state_dict(state)

    x = torch.randn(B_REF, 3, 224, 224, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    t_tower = wall_median(lambda: model.image_features(x), 2)[0] / B_REF

    ratio = (t_ref / B_REF) / (t_fast / B_FAST)
    benchmark.extra_info.update(
        B=B_FAST, N=N, B_reference=B_REF, compared="seconds per image (the reference runs at B=2: minutes at B=32)",
        fast_s_per_image=t_fast / B_FAST, loop77_s_per_image=t_ref / B_REF, ratio_per_image=ratio,
        fast_images_per_s=B_FAST / t_fast, image_tower_s_per_image=t_tower,
        step="from cached image features: prompt learner, text, logits, CE + attr + KgCoOp reg, backward, SGD",
        peak_memory=f"{'CUDA allocation' if DEVICE == 'cuda' else 'resident set'} growth over the pre-step level, MiB",
        fast_peak_MiB=round(mem_fast.mib, 1), loop77_peak_MiB=round(mem_ref.mib, 1), device=DEVICE)
    record(bench="train step", B=f"{B_FAST} (ref {B_REF})", N=N, fast_ms_per_image=round(1e3 * t_fast / B_FAST, 1),
           loop77_ms_per_image=round(1e3 * t_ref / B_REF, 1), speedup=round(ratio, 1),
           fast_images_per_s=round(B_FAST / t_fast, 2), fast_peak_MiB=round(mem_fast.mib),
           loop77_peak_MiB=round(mem_ref.mib), image_tower_ms_per_image=round(1e3 * t_tower, 1))
