"""The one batched inference loop: logits of a model over batches of images, in eval mode, without autograd.

    batched_logits(model, batches, suffixes, *, compile=None (auto), max_rows=1 << 16, precision="fp32", extra=None)
        batches: iterable of (images [b, 3, H, W] preprocessed, attr_targets [b, D] or None)
        -> (logits [n, N] float32 on the CPU, [extra(feats, tokens) per batch])

`fast_logits`, evaluation (`accuracy`, which training's validation also runs), and `explain` all go through it:
the model's train flag is restored afterwards, the work runs under `torch.inference_mode`, and a compiled logits
function that fails to compile falls back, with one warning, to the eager path.
`autocast(precision, device)` is the precision context that training and inference share; `warn_slow_matmuls`
warns when that precision has no fast matmuls on the device (bf16 on a CPU without AVX512-BF16 or AMX).
`default_model()` (CLIP zero-shot, the fast way) and `check_inputs(images, classnames, model)` (everything checked
before a model is loaded) serve the callers that take `model=None`.
"""
from __future__ import annotations

import functools
import warnings
from contextlib import nullcontext
from typing import Callable, Iterable

import torch

from .clip import DEFAULT_MODEL, DEFAULT_PRETRAINED
from .config import ModelConfig
from .images import open_all
from .model import IntCoOp, logits_function
from .text import class_suffixes

__all__ = ["batched_logits", "autocast", "default_compile", "default_model", "check_inputs", "DEFAULT_CONFIG",
           "slow_matmul_note", "warn_slow_matmuls"]


def _clip_tokenizer():
    """CLIP's BPE tokenizer: the one instance `clip.default_tokenizer()` keeps (its tables are large; the suffix
    cache is keyed on the instance)."""
    from .clip import default_tokenizer

    return default_tokenizer()


DEFAULT_CONFIG = ModelConfig(clip=DEFAULT_MODEL, pretrained=DEFAULT_PRETRAINED, attributes="off")


def check_inputs(images, classnames, model: IntCoOp | None = None):
    """Check images and class names before any model is loaded or run: (opened images, the class suffixes of
    `model`, or None when model is None: the class list is then checked against the default model's prefix)."""
    images = open_all(images)
    if model is not None:
        return images, model.suffixes(classnames)
    class_suffixes(_clip_tokenizer(), classnames, DEFAULT_CONFIG.suffix, DEFAULT_CONFIG.prefix_len)
    return images, None


@functools.lru_cache(maxsize=1)
def default_model() -> IntCoOp:
    """ViT-B-16 with OpenAI's weights and an untrained prompt (attribute slot off): exactly CLIP zero-shot for
    "a photo of a {c}.", computed the fast way. Raises clip.WeightsUnavailable (saying how to provide the
    weights) when they are not on this machine and cannot be downloaded."""
    c = DEFAULT_CONFIG
    return IntCoOp.from_clip(c.clip, c.pretrained, attributes=c.attributes).eval()


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device):
    """A fresh autocast context for `precision` on `device`: bf16 / fp16 autocast for "bf16" / "fp16" (bf16 for
    "auto" on a GPU), else nullcontext ("fp32", "auto" on a CPU). A model stored in bf16 (model.precision)
    needs none: it runs in its dtype; on a float32 model this is the autocast path (its image tower stays in
    float32, see `IntCoOp.image_features`)."""
    device = torch.device(device)
    if precision not in ("auto", "fp32", *AUTOCAST):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision in AUTOCAST or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=AUTOCAST.get(precision, torch.bfloat16))
    return nullcontext()


_NATIVE = {"bf16": ("_is_avx512_bf16_supported", "_is_amx_tile_supported"), "fp16": ("_is_amx_fp16_supported",)}
_warned: set = set()


def slow_matmul_note(precision: str, device) -> str | None:
    """Why matmuls in `precision` ("bf16", "fp16") would be slow on `device`, or None. torch runs bf16 matmuls on
    a CPU at speed only with AVX512-BF16 or AMX instructions, fp16 ones only with AMX-FP16; without them it
    falls back to a plain loop (measured on a 2-core AVX2 EPYC: 0.46 GFLOP/s in bf16 against 70 in fp32)."""
    checks = _NATIVE.get(precision)
    if checks is None or torch.device(device).type != "cpu":
        return None
    if any(getattr(torch.cpu, name, lambda: False)() for name in checks):
        return None
    need = "AVX512-BF16 or AMX" if precision == "bf16" else "AMX-FP16"
    return (f"{precision} on this CPU ({torch.backends.cpu.get_cpu_capability()}, no {need} instructions): torch "
            f"runs {precision} matmuls here about 100x slower than fp32; use precision fp32 on this machine")


def warn_slow_matmuls(precision: str, device) -> None:
    """Warn (once per precision and device kind) when `slow_matmul_note` has something to say."""
    note = slow_matmul_note(precision, device)
    if note and (precision, torch.device(device).type) not in _warned:
        _warned.add((precision, torch.device(device).type))
        warnings.warn(note, RuntimeWarning, stacklevel=3)


def default_compile(device) -> bool:
    """What compile=None (auto) means on `device`: eager everywhere today. On this kind of CPU the compiled text
    side is slower than eager (fp32 2.78 s against 2.28 s, bf16 1.40 s against 1.26 s at 4 x 100, ViT-B-16, after
    a 49 s compile; benches/bench_precision.py measures both); on a GPU it has not been measured yet (measure on
    GPU with that bench, then make "cuda" compiled here if it wins)."""
    return False


def batched_logits(model: IntCoOp, batches: Iterable, suffixes, *, compile: bool | str | None = None,
                   max_rows: int = 1 << 16, precision: str = "fp32",
                   extra: Callable | None = None) -> tuple[torch.Tensor, list]:
    """Logits [n, N] (float32, CPU) of every image of `batches` for the classes of `suffixes`
    (`model.suffixes(names)`), and `extra(feats, tokens)` of every batch (e.g. attention maps), in order."""
    logits_of = logits_function(default_compile(model.device) if compile is None else compile)
    warn_slow_matmuls(model.config.precision if model.config.precision != "fp32" else precision, model.device)
    out, extras = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, targets in batches:
                x = images.to(model.device, model.dtype)
                t = targets.to(model.device) if targets is not None else None
                with autocast(precision, model.device):
                    feats, tokens = model.image_features(x)
                    try:
                        logits = logits_of(model, feats, tokens, suffixes, t, max_rows)
                    except Exception as exc:          # a compiler failure: warn once and go on eagerly
                        if logits_of is IntCoOp.logits_from_features:
                            raise
                        warnings.warn(f"compiled logits failed ({type(exc).__name__}: {exc}); running eagerly")
                        logits_of = IntCoOp.logits_from_features
                        logits = logits_of(model, feats, tokens, suffixes, t, max_rows)
                    out.append(logits.float().cpu())
                    if extra is not None:
                        extras.append(extra(feats, tokens))
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("no images to compute logits for")
    return torch.cat(out), extras
