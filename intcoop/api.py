"""The front door for other code: `fast_logits(images, classnames, model=None)` and the default model.

Inputs are checked (class list, images) before any work; the work runs under `torch.inference_mode`, in chunks of
images and of classes, so memory stays bounded at N = 1000 classes on a CPU machine.
"""
from __future__ import annotations

import functools

import torch

from .backbone import DEFAULT_MODEL, DEFAULT_PRETRAINED, image_size
from open_clip import SimpleTokenizer

from .images import open_all, to_batch
from .model import IntCoOp, logits_function
from .text import class_suffixes

__all__ = ["fast_logits", "default_model"]


@functools.lru_cache(maxsize=1)
def _clip_tokenizer() -> SimpleTokenizer:
    """CLIP's BPE tokenizer, built once (its tables are large; the suffix cache is keyed on the instance)."""
    return SimpleTokenizer()


@functools.lru_cache(maxsize=1)
def default_model() -> IntCoOp:
    """ViT-B-16 with OpenAI's weights and an untrained prompt (attribute slot off): exactly CLIP zero-shot for
    "a photo of a {c}.", computed the fast way. Raises backbone.WeightsUnavailable (saying how to provide the
    weights) when they are not on this machine and cannot be downloaded."""
    return IntCoOp.from_clip(DEFAULT_MODEL, DEFAULT_PRETRAINED, attributes="off").eval()


def fast_logits(images, classnames, model: IntCoOp | None = None, *, batch_size: int = 64,
                max_rows: int = 1 << 16, attr_targets: torch.Tensor | None = None,
                compile: bool | str = False) -> torch.Tensor:
    """Logits [B, N] of every image for every class name.

    images: a preprocessed [B, 3, H, W] float tensor, PIL image(s), or image file path(s) (the model's own
    preprocessing is applied to PIL images and files). classnames: N names (duplicates allowed).
    model: a trained or untrained IntCoOp; None uses `default_model()`. batch_size: images per chunk;
    max_rows: packed suffix rows (images x class tokens) per text-encoder chunk. compile: run the text side
    under torch.compile (True: inductor; or a backend name), worth it on a GPU for many images. Returns float32
    on CPU.
    """
    if model is None:                                            # check the inputs before loading weights
        images = open_all(images)
        class_suffixes(_clip_tokenizer(), classnames, "{}.", 5)
        model = default_model()
    suf = model.suffixes(classnames)                             # validates the class list before any work
    x = to_batch(images, model.preprocess, image_size(model.clip))
    if model.attributes_mode == "oracle" and (attr_targets is None or len(attr_targets) != len(x)):
        raise ValueError("attributes='oracle' needs attr_targets [B, D] for the B images")
    logits = logits_function(compile)
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, x.shape[0], batch_size):
                chunk = x[start:start + batch_size].to(model.device, model.dtype)
                feats, tokens = model.image_features(chunk)
                targets = attr_targets[start:start + batch_size].to(model.device) if attr_targets is not None else None
                out.append(logits(model, feats, tokens, suf, targets, max_rows).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out, 0)
