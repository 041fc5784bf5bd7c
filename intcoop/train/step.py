"""One optimiser step's pieces: the train config's checks, the learning-rate schedule, and `StepModule`.

- `check_train_config(train_config)`: the train section's values, checked before anything is built.
- `step_precision(model_precision, train_precision)`: the precision a step (and validation) runs in.
- `lr_factor(epoch, train_config)`: CoOp's schedule as a multiplier of lr, per epoch (warm-up, then cosine).
- `StepModule`: the differentiable part of one step (prefix, fast text encoder, logits, objective), the module
  that DDP wraps and torch.compile traces.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import losses, selfreg
from ..model import IntCoOp

__all__ = ["check_train_config", "step_precision", "lr_factor", "StepModule"]


def check_train_config(tc) -> None:
    """Raise ValueError naming the first train.* field with a value the trainer does not accept."""
    if tc.attr_loss not in losses.ATTR_LOSSES:
        raise ValueError(f"train.attr_loss must be one of {losses.ATTR_LOSSES}, got {tc.attr_loss!r}")
    if tc.regulariser not in losses.REGULARISERS:
        raise ValueError(f"train.regulariser must be one of {losses.REGULARISERS}, got {tc.regulariser!r}")
    if tc.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"train.precision must be auto, fp32 or bf16, got {tc.precision!r}")
    if not 0 <= tc.label_noise <= 1:
        raise ValueError(f"train.label_noise must be in [0, 1], got {tc.label_noise}")
    if tc.epochs < 1 or tc.batch_size < 1 or tc.log_every < 1 or tc.warmup_epochs < 0:
        raise ValueError("train.epochs, batch_size and log_every must be >= 1 and warmup_epochs >= 0")
    for name in ("lambda_scl_text", "lambda_scl_image", "lambda_scl_logits", "gpa_std"):
        if not getattr(tc, name) >= 0:
            raise ValueError(f"train.{name} must be >= 0, got {getattr(tc, name)}")
    if tc.gpa_mean and not tc.gpa_std:
        raise ValueError(f"train.gpa_mean={tc.gpa_mean} is set but train.gpa_std = 0 (no aggregation): set "
                         f"train.gpa_std > 0")


def step_precision(model_precision: str, train_precision: str) -> str:
    """The precision `inference.autocast` wraps a training step (and validation) in.

    model.precision "fp32" (the CLIP stored in float32): train.precision decides, as before ("auto": bf16
    autocast on a GPU, fp32 on a CPU; "bf16" / "fp32" force it). model.precision "bf16" / "fp16" (the CLIP
    stored in that dtype): the step runs in it, and train.precision must be "auto" or the same precision.
    The prompt learner's parameters and the optimiser state are float32 either way."""
    if model_precision == "fp32" or train_precision in ("auto", model_precision):
        return train_precision if model_precision == "fp32" else model_precision
    raise ValueError(f"train.precision={train_precision} conflicts with model.precision={model_precision} (the CLIP "
                     f"is stored in {model_precision}): use train.precision=auto, or model.precision=fp32 for a "
                     f"float32 model under {train_precision} autocast")


def lr_factor(epoch: int, tc) -> float:
    """Multiplier of tc.lr in epoch `epoch` (0-based): warm-up at warmup_lr, then cosine over the remaining epochs."""
    if epoch < tc.warmup_epochs:
        return tc.warmup_lr / tc.lr if tc.lr else 0.0
    t, T = epoch - tc.warmup_epochs, max(tc.epochs - tc.warmup_epochs, 1)
    return 0.5 * (1 + math.cos(math.pi * t / T))


class StepModule(nn.Module):
    """The differentiable part of a step: forward(images, feats, tokens, labels, attr_target, attr_valid, attr_denom,
    hand, frozen_text=None) -> `losses.objective`'s parts {"loss", "ce", "attr", "reg", "scl_text", "scl_image",
    "scl_logits", "scl"} and "correct". With visual prompts `images` [B, 3, H, W] go through the prompted image
    tower here (feats, tokens None); without them the frozen tower's feats / tokens are given (images None). Its
    only submodule is the prompt learner (what DDP synchronises and torch.compile traces with the frozen towers);
    CLIP is referenced, not owned.

    PromptSRC's SCL (any train.lambda_scl_* > 0): frozen_text [N, E] (`selfreg.ensemble_text_features`, computed
    once by the caller) is needed for lambda_scl_text / lambda_scl_logits. Frozen CLIP's image features are the
    unprompted tower on `images` (one more tower pass, no grad) with visual prompts, else the given feats (the
    tower has no prompts then). Zero-shot logits: `model.scores(frozen image, frozen_text)`, no grad."""

    def __init__(self, model: IntCoOp, suffixes, tc, use_attr: bool):
        super().__init__()
        self.prompt = model.prompt
        object.__setattr__(self, "_model", model)
        self.suffixes, self.tc = suffixes, tc
        self.use_attr = use_attr and model.prompt.attr is not None and bool(tc.lambda_attr)
        self.oracle = model.config.attributes == "oracle"
        self.scl = selfreg.enabled(tc)

    def forward(self, images, feats, tokens, labels, target, valid, denom, hand, frozen_text=None):
        m, tc = self._model, self.tc
        frozen = None
        if images is not None:
            if tc.lambda_scl_image or tc.lambda_scl_logits:
                frozen = selfreg.frozen_image_features(m, images)
            feats, tokens = m.image_features(images)
        elif self.scl:
            frozen = feats
        if (tc.lambda_scl_text or tc.lambda_scl_logits) and frozen_text is None:
            raise ValueError("train.lambda_scl_text / lambda_scl_logits need frozen_text "
                             "(selfreg.ensemble_text_features of the classes)")
        oracle = torch.where(valid[:, None], target, torch.full_like(target, float("nan"))) if self.oracle else None
        prefix, pred = m.prompt_prefix(feats=feats, tokens=tokens, attr_targets=oracle, return_attrs=True)
        text = m.text_features(m.text_rows(prefix), self.suffixes)   # the fast encoder, suffixes tokenised once
        logits = m.scores(feats, text)
        zs = None
        if tc.lambda_scl_logits:
            with torch.no_grad():
                zs = m.scores(frozen, frozen_text[None])
        parts = losses.objective(logits, labels, pred_attrs=pred if self.use_attr else None, attr_target=target,
                                 attr_valid=valid, attr_denom=denom, text=text, hand=hand,
                                 lambda_attr=tc.lambda_attr, lambda_reg=tc.lambda_reg, attr_loss=tc.attr_loss,
                                 feats=feats, frozen_feats=frozen, frozen_text=frozen_text, zs_logits=zs,
                                 lambda_scl_text=tc.lambda_scl_text, lambda_scl_image=tc.lambda_scl_image,
                                 lambda_scl_logits=tc.lambda_scl_logits)
        parts["correct"] = (logits.detach().argmax(-1) == labels).sum()
        return parts
