"""What each method costs on this engine: one training step and evaluation throughput, per (method, precision).

Owns the cost table of the 8 methods of `intcoop.experiments.protocols.BASELINES` (IntCoOp, CoOp, CoCoOp, KgCoOp,
IVLP, VPT, MaPLe, PromptSRC), each the `VARIANTS` overrides on one base RunConfig, in fp32 (model.precision fp32,
train.precision fp32) and bf16 (model.precision bf16: the CLIP stored in bf16, the prompt learner fp32).

Model: ViT-B-16-quickgelu (open_clip, random weights, seed 0; `intcoop.clip.load_clip`), one CLIP copied for
every row; the deep methods run their shipped depths (ViT-B-16 has the 12 layers they ask for). PromptSRC keeps
its SCL weights (25 / 10 / 1); GPA is off (train.gpa_std 0 and gpa_mean 0: one epoch has nothing to aggregate,
and the config refuses a gpa_mean without a gpa_std).

Training step: the real code path, `intcoop.train.Trainer(...).fit()` for one epoch over 1 + STEPS batches of
B real photos (scikit-image's, written as JPEGs; labels 0..N-1 over N ImageNet class names; data.augment on as in
the shipped configs, workers 0; IntCoOp gets one attribute word per image, so its attribute loss is on). The
prompt learner starts from its init plus seeded noise (std 0.02, `intcoop.testing.perturb_prompt`, as the other
benches' model): at the bare init KgCoOp's regulariser is exactly 0 in fp32 (its learned prompt is the template).
A callback (called by the Trainer after every optimiser step) takes the wall time between consecutive steps,
synchronised on a GPU: the whole step as the Trainer runs it (JPEG decode and augmentation of the batch, the
frozen or prompted image tower, prompt learner, fast text encoder, the method's losses, backward, SGD). The
first step is not timed; reported is the median of the others divided by B. Whatever loss terms the step returns
(`loss_terms`: the nonzero parts of the Trainer's step) are listed, so a loss added to the step shows up here.
Peak memory of a step: on a GPU torch.cuda.max_memory_allocated during it minus the allocation before it; on the
CPU the process's resident set size sampled every 2 ms after malloc_trim (benches/bench_train.py's PeakRSS),
peak minus the level before the step; the largest over the timed steps, MiB. `first_step_s`: fit() up to the end
of the first step, i.e. the run's one-time setup (hand-crafted prompt features, PromptSRC's 60-template ensemble of
frozen text features, attribute targets, the CLIP fingerprint, config, loader) plus one step.

Evaluation: `intcoop.inference.batched_logits` (the one inference loop) of the trained model on EVAL_B photos
(the model's own eval preprocess) against EVAL_N = 1000 ImageNet class names (suffixes tokenised beforehand),
after a warm-up call (one image, 10 classes); images/s of one call (CPU) or the median of 3 (GPU).

Sizes (environment overrides INTCOOP_BENCH_METHODS_{B,N,EVAL_B,EVAL_N,STEPS}; INTCOOP_BENCH_METHODS_ONLY=CoOp,VPT
runs a subset): CPU B = 4, N = 100, EVAL_B = 8, STEPS = 2; GPU B = 32, N = 100, EVAL_B = 64, STEPS = 5.
INTCOOP_BENCH_REHEARSE=1 without a GPU (tests/test_bench_rehearsal.py): intcoop's tiny CLIP, B 2, N 5, EVAL_B 2,
EVAL_N 7, STEPS 1, deep depths cut to its 2 layers; it checks the code, its figures mean nothing.
Runtime on the project's 2-core CPU: about 14 minutes for the 16 rows when PromptSRC's one-time setup (its
60-template ensemble) ran through the padded 77-token text tower (340 s fp32, 150 s bf16 at N = 100); it now runs
through the fast encoder (22 s fp32 at N = 100). The other 14 rows take about 5 minutes
(INTCOOP_BENCH_METHODS_ONLY to leave PromptSRC out). bf16 rows skip on a CPU without bf16 matmul instructions
(`intcoop.inference.slow_matmul_note`). See benches/RESULTS.md.
"""
import copy
import dataclasses
import gc
import os
import statistics
import time

import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image

from bench_train import PeakCUDA, PeakRSS   # benches/ is on sys.path under pytest

from intcoop.benchmarking import REHEARSE_ENV, skip_slow_precision
from intcoop.clip import TINY_CLIP, load_clip, register_tiny_clip
from intcoop.config import RunConfig, apply_overrides
from intcoop.data import Item
from intcoop.experiments.protocols import BASELINES, VARIANTS
from intcoop.inference import batched_logits
from intcoop.model import IntCoOp
from intcoop.testing import perturb_prompt
from intcoop.train.trainer import Trainer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REHEARSE = DEVICE == "cpu" and os.environ.get(REHEARSE_ENV) == "1"
GPU = DEVICE == "cuda"
BENCH_CLIP = "ViT-B-16-quickgelu"                    # benches/conftest.py's BENCH_CLIP: OpenAI's ViT-B/16 shape


def _size(name: str, cpu: int, gpu: int, rehearse: int) -> int:
    key = f"INTCOOP_BENCH_METHODS_{name}"
    raw = os.environ.get(key)
    value = int(raw) if raw else rehearse if REHEARSE else gpu if GPU else cpu
    if value < 1:
        raise ValueError(f"{key} must be >= 1, got {raw!r}")
    return value


B, N = _size("B", 4, 32, 2), _size("N", 100, 100, 5)
EVAL_B, EVAL_N = _size("EVAL_B", 8, 64, 2), _size("EVAL_N", 1000, 1000, 7)
STEPS = _size("STEPS", 2, 5, 1)                       # timed steps, after one untimed first step
EVAL_ROUNDS = 3 if GPU else 1
CLIP_NAME = TINY_CLIP if REHEARSE else BENCH_CLIP
PRECS = ("fp32", "bf16")
_only = [m.strip() for m in os.environ.get("INTCOOP_BENCH_METHODS_ONLY", "").split(",") if m.strip()]
if [m for m in _only if m not in BASELINES]:
    raise ValueError(f"INTCOOP_BENCH_METHODS_ONLY names {[m for m in _only if m not in BASELINES]}: not among "
                     f"the methods {', '.join(BASELINES)}")
METHODS = [m for m in BASELINES if not _only or m in _only]
WORDS = ("red", "white", "small", "round", "metal", "furry", "striped")   # IntCoOp's attribute labels
PeakMemory = PeakCUDA if GPU else PeakRSS
MEMORY = "CUDA allocation growth" if GPU else "resident set growth"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Paths of 5 scikit-image photographs written as JPEGs (the Trainer reads files, as a real run does)."""
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera"):
        path = folder / f"{name}.jpg"
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(path, quality=90)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def base_clip():
    """The frozen CLIP every row copies (CPU, fp32)."""
    if CLIP_NAME == TINY_CLIP:
        register_tiny_clip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = load_clip(CLIP_NAME, None)
    if CLIP_NAME == BENCH_CLIP:
        assert clip.activation == "quick_gelu", f"{BENCH_CLIP} built with {clip.activation}, not QuickGELU"
    return clip


def _config(method: str, prec: str, clip, out) -> tuple[RunConfig, str]:
    """The method's RunConfig at the bench's sizes, and its depths as 'text/visual' (cut to the CLIP's layers only
    for the tiny rehearsal CLIP)."""
    base = RunConfig()
    base = apply_overrides(base, {
        "model.clip": CLIP_NAME, "model.pretrained": None, "data.augment": True, "data.workers": 0,
        "train.batch_size": B, "train.epochs": 1, "train.out": str(out), "train.log_every": 1000, "train.seed": 1})
    ov = dict(VARIANTS[method])
    ov.update({"model.precision": prec, "train.precision": "fp32" if prec == "fp32" else "auto",
               "train.gpa_std": 0.0, "train.gpa_mean": 0.0})
    text_layers = len(clip.model.transformer.resblocks)
    visual_layers = len(clip.model.visual.transformer.resblocks)
    for key, layers in (("model.text_depth", text_layers), ("model.visual_depth", visual_layers)):
        if ov.get(key, 0) > layers:
            assert REHEARSE, f"{method}: {key} {ov[key]} > the {CLIP_NAME} tower's {layers} layers"
            ov[key] = layers
    cfg = apply_overrides(base, ov)
    mc = cfg.model
    visual = ("-" if mc.visual_prompts == "off" else
              f"{mc.text_depth} coupled" if mc.visual_prompts == "coupled" else str(mc.visual_depth))
    return cfg, f"{mc.text_depth}/{visual}"


def _now() -> float:
    if GPU:
        torch.cuda.synchronize()
    return time.perf_counter()


class StepClock:
    """Trainer callback: seconds and peak memory growth (MiB) of every optimiser step after the first, measured
    from the end of one callback to the next (the Trainer's whole step, its batch's loading included), and the
    loss parts of the last step."""

    def __init__(self):
        self.seconds, self.peaks, self.parts = [], [], {}
        self._start, self._mem = None, None
        self.fit_start = self.first_end = None

    def __call__(self, trainer, info):
        end = _now()
        if self.first_end is None:
            self.first_end = end
        if self._mem is not None:
            self.close()
            self.seconds.append(end - self._start)
            self.peaks.append(self._mem_mib)
        self.parts = {k: float(v) for k, v in info.items() if k not in ("epoch", "step", "step_in_epoch")}
        self._mem = PeakMemory().__enter__()
        self._start = _now()

    def close(self):
        """Stop the memory measurement started after the last step (its sampler thread, on the CPU)."""
        if self._mem is not None:
            self._mem.__exit__(None, None, None)
            self._mem_mib, self._mem = self._mem.mib, None


def _train(method, prec, clip, photos, out):
    cfg, depths = _config(method, prec, clip, out)
    names = list(IMAGENET_CLASSNAMES[:N])
    n_items = B * (1 + STEPS)
    items = [Item(photos[i % len(photos)], label=(7 * i) % N, classname=names[(7 * i) % N], id=f"bench/{i}")
             for i in range(n_items)]
    labels = ({it.id: WORDS[i % len(WORDS)] for i, it in enumerate(items)}
              if cfg.model.attributes != "off" else None)
    with torch.random.fork_rng(devices=[]):        # as train.inputs.build_model seeds it
        torch.manual_seed(cfg.model.seed)
        model = IntCoOp(dataclasses.replace(clip, model=copy.deepcopy(clip.model)), cfg.model)
    perturb_prompt(model, std=0.02)                # every learned part active (as benches/conftest.py's model)
    clock = StepClock()
    trainer = Trainer(cfg, model=model, train_items=items, classnames=names, labels=labels, device=DEVICE,
                      progress=False, callbacks=[clock])
    clock.fit_start = _now()
    try:
        trainer.fit()
    finally:
        clock.close()
    return trainer, clock, depths


def _eval(model, photos, precision, timed):
    """(images/s of batched_logits over EVAL_B photos x EVAL_N classes, logits)."""
    x = torch.stack([model.preprocess(Image.open(photos[i % len(photos)]).convert("RGB")) for i in range(EVAL_B)])
    suf = model.suffixes(list(IMAGENET_CLASSNAMES[:EVAL_N]))
    warm = model.suffixes(list(IMAGENET_CLASSNAMES[:10]))
    batched_logits(model, [(x[:1], None)], warm, precision=precision)                 # warm-up (not timed)
    t, (logits, _) = timed(lambda: batched_logits(model, [(x, None)], suf, precision=precision),
                           rounds=EVAL_ROUNDS, warmup=0)
    return EVAL_B / t, logits


@pytest.mark.parametrize("prec", PRECS)
@pytest.mark.parametrize("method", METHODS)
def test_method_cost(benchmark, timed, record, base_clip, photos, tmp_path, method, prec):
    """One row: the method's training step (s/image, peak memory) and evaluation throughput at EVAL_N classes."""
    skip_slow_precision(prec, DEVICE)
    row = dict(bench="method cost", method=method, precision=prec, B=B, N=N)
    try:
        trainer, clock, depths = _train(method, prec, base_clip, photos, tmp_path / "run")
        model = trainer.model
        assert len(clock.seconds) == STEPS, f"{len(clock.seconds)} timed steps, expected {STEPS}"
        parts = clock.parts
        assert all(torch.isfinite(torch.tensor(v)) for v in parts.values()), parts
        if method in ("IntCoOp",):
            assert parts["attr"] > 0, f"{method}: no attribute loss in the step ({parts})"
        if method in ("IntCoOp", "KgCoOp"):
            assert parts["reg"] > 0, f"{method}: no KgCoOp regulariser in the step ({parts})"
        learned = [(n, p) for n, p in model.prompt.named_parameters() if p.requires_grad]
        no_grad = [n for n, p in learned if p.grad is None]
        assert learned and not no_grad, f"{method}: learned parameters without a gradient: {no_grad}"
        step = statistics.median(clock.seconds)
        first = clock.first_end - clock.fit_start           # fit() up to the end of the first step
        images_per_s, logits = _eval(model, photos, trainer.precision, timed)
        assert logits.shape == (EVAL_B, EVAL_N) and torch.isfinite(logits).all()
    except Exception as exc:                  # a method that fails is a finding: its row says so, the test fails
        record(**row, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        raise
    terms = "+".join(k for k, v in parts.items() if k not in ("loss", "correct") and v != 0) or "none"
    peak = max(clock.peaks)
    benchmark.extra_info.update(
        method=method, precision=prec, step_precision=trainer.precision, B=B, N=N, steps_timed=STEPS,
        step_seconds=clock.seconds, first_step_seconds=first, step_s_per_image=step / B, peak_MiB=peak,
        peak_memory=MEMORY,
        eval_B=EVAL_B, eval_N=EVAL_N, eval_images_per_s=images_per_s, loss_parts=parts, depths=depths,
        clip=CLIP_NAME, device=DEVICE)
    record(**row, depths_text_visual=depths, learned_params=sum(p.numel() for _, p in learned),
           loss_terms=terms, step_s_per_image=round(step / B, 3), step_images_per_s=round(B / step, 2),
           peak_MiB=round(peak), first_step_s=round(first, 1), eval_B=EVAL_B, eval_N=EVAL_N,
           eval_images_per_s=round(images_per_s, 3))
    print(f"\n{method} {prec}: {step / B:.3f} s/image (B={B}, N={N}), peak {peak:.0f} MiB ({MEMORY}), "
          f"eval {images_per_s:.3f} images/s at N={EVAL_N}, terms {terms}, depths {depths}")
    del trainer, model
    gc.collect()
    if GPU:
        torch.cuda.empty_cache()
