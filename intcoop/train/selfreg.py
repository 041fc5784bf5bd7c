"""PromptSRC's self-regularisation (SCL) and Gaussian prompt aggregation (GPA): the frozen targets, the three
SCL losses, and the aggregate of the per-epoch prompts. `losses.objective` sums the losses; `step.StepModule`
feeds them; `trainer.Trainer` builds the text targets once and runs the aggregation.

Frozen targets (frozen CLIP, no prompts, no gradients):
- `ensemble_text_features(clip, tokenizer, classnames, templates=ENSEMBLE_TEMPLATES)` -> [N, E] float32:
  per class c, mean over the templates T of encode_text(T.format(c)) (un-normalised features averaged), then
  L2-normalised. Computed once per run, through the fast text encoder (`text.template_features`: each template's
  head is a prefix run once, the class names packed suffixes).
- `frozen_image_features(model, images [B, 3, H, W])` -> [B, E] in the model's dtype: the image tower WITHOUT
  visual prompts (`clip.image_features(..., tokens=False)`), autocast off, as `IntCoOp.image_features` runs it.
- Zero-shot logits are `model.scores(frozen_image, frozen_text[None])`: exp(logit_scale) * cos, [B, N].

Losses (float32, or float64 for float64 inputs; features are L2-normalised here):
- `scl_text(text [B', N, E] or [N, E], frozen [N, E])`  = mean |n(text) - n(frozen)|   (F.l1_loss, mean)
- `scl_image(img [B, E], frozen [B, E])`                = mean |n(img) - n(frozen)|
- `scl_logits(logits [B, N], zs_logits [B, N])`          = sum_{b,c} q (log q - log p) / (B * N),
  q = softmax(zs_logits) (zero-shot CLIP), p = softmax(logits) (the model): KL(q || p), PromptSRC's direction.

`GaussianAggregate(epochs, mean, std)`: w_e proportional to N(e; mean, std) for e = 1..epochs, sum 1;
`accumulate(state, e)` adds w_e * state (float64, CPU) after epoch e; `result()` the weighted sum in the
states' own dtypes; `state_dict` / `load_state_dict` carry it through checkpoints.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..clip import image_features
from ..data.templates import ENSEMBLE_TEMPLATES
from ..text import template_features

__all__ = ["enabled", "ensemble_text_features", "frozen_image_features", "scl_text", "scl_image", "scl_logits",
           "GaussianAggregate"]


def enabled(tc) -> bool:
    """Whether train config `tc` asks for any SCL term."""
    return bool(tc.lambda_scl_text or tc.lambda_scl_image or tc.lambda_scl_logits)


@torch.no_grad()
def ensemble_text_features(clip, tokenizer, classnames: Sequence[str], templates: Sequence[str] = ENSEMBLE_TEMPLATES,
                           device=None, batch_size: int = 256) -> torch.Tensor:
    """[N, E] float32 on `device` (default: the CLIP's): the L2-normalised mean over `templates` of frozen CLIP's
    encode_text(template.format(c)) for every class name c (the CLIP runs in its stored dtype; the mean is
    float32)."""
    if not classnames:
        raise ValueError("classnames is empty")
    if not templates:
        raise ValueError("templates is empty")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"template {bad[0]!r} must contain '{{}}' where the class name goes")
    dev = clip.token_embedding.weight.device
    feats = template_features(clip, tokenizer, templates, classnames, batch_size=batch_size)   # [T, N, E]
    return F.normalize(feats.mean(0), dim=-1).to(device if device is not None else dev)


@torch.no_grad()
def frozen_image_features(model, images: torch.Tensor) -> torch.Tensor:
    """[B, E] in the model's dtype: the frozen image tower on images [B, 3, H, W], without any visual prompt."""
    with torch.autocast(images.device.type, enabled=False):
        return image_features(model.clip, images.to(model.dtype), tokens=False)[0]


def _dtype(*xs) -> torch.dtype:
    dt = torch.float32
    for x in xs:
        dt = torch.promote_types(dt, x.dtype)
    return dt


def scl_text(text: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the normalised text features [B', N, E] (or [N, E]) and targets [N, E]."""
    dt = _dtype(text, frozen)
    t = F.normalize(text.to(dt), dim=-1)
    f = F.normalize(frozen.to(t.device, dt), dim=-1)
    return F.l1_loss(t, f.expand_as(t), reduction="mean")


def scl_image(img: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the normalised image features [B, E] and frozen CLIP's [B, E]."""
    dt = _dtype(img, frozen)
    return F.l1_loss(F.normalize(img.to(dt), dim=-1), F.normalize(frozen.to(dt), dim=-1), reduction="mean")


def scl_logits(logits: torch.Tensor, zs_logits: torch.Tensor) -> torch.Tensor:
    """KL(q || p) summed over the batch and classes, divided by B * N: q = softmax(zs_logits) [B, N] (zero-shot
    CLIP, the target), p = softmax(logits) [B, N] (the model)."""
    dt = _dtype(logits, zs_logits)
    log_p = F.log_softmax(logits.to(dt), dim=-1)
    log_q = F.log_softmax(zs_logits.to(dt), dim=-1)
    return F.kl_div(log_p, log_q, reduction="sum", log_target=True) / logits.numel()


class GaussianAggregate:
    """PromptSRC's GPA over `epochs` epochs: the prompts after epoch e (1-based) weighted by w_e, where
    w_e = N(e; mean, std) / sum_k N(k; mean, std). Sums are float64 on the CPU; `result()` casts back."""

    def __init__(self, epochs: int, mean: float, std: float):
        if epochs < 1:
            raise ValueError(f"train.epochs must be >= 1 for prompt aggregation, got {epochs}")
        if not std > 0:
            raise ValueError(f"train.gpa_std must be > 0 for prompt aggregation, got {std}")
        self.epochs, self.mean, self.std = int(epochs), float(mean), float(std)
        # log-space, max subtracted: the same normalised weights as the pdf, without underflow far from the mean
        logs = [-0.5 * ((e - self.mean) / self.std) ** 2 for e in range(1, self.epochs + 1)]
        top = max(logs)
        w = [math.exp(v - top) for v in logs]
        s = math.fsum(w)
        self.weights: list[float] = [v / s for v in w]
        self.done: list[int] = []
        self._sum: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}

    def accumulate(self, state: Mapping[str, torch.Tensor], epoch: int) -> None:
        """Add w_epoch * state (the learned parameters after epoch `epoch`, 1-based; each epoch once, in order)."""
        if epoch != len(self.done) + 1 or epoch > self.epochs:
            raise ValueError(f"prompt aggregation: epoch {epoch} given after epochs {self.done} of {self.epochs}")
        if self._sum and set(state) != set(self._sum):
            raise ValueError(f"prompt aggregation: epoch {epoch}'s parameters {sorted(state)} differ from the "
                             f"earlier epochs' {sorted(self._sum)}")
        w = self.weights[epoch - 1]
        for k, v in state.items():
            x = v.detach().to("cpu", torch.float64) * w
            if k in self._sum:
                self._sum[k] += x
            else:
                self._sum[k], self._dtypes[k] = x, v.dtype
        self.done.append(epoch)

    @property
    def complete(self) -> bool:
        return len(self.done) == self.epochs

    def result(self) -> dict[str, torch.Tensor]:
        """{name: sum_e w_e * state_e} (CPU, the states' dtypes), once every epoch is accumulated."""
        if not self.complete:
            raise ValueError(f"prompt aggregation: only epochs {self.done} of {self.epochs} accumulated")
        return {k: v.to(self._dtypes[k]) for k, v in self._sum.items()}

    def state_dict(self) -> dict:
        """Plain types and CPU tensors (a weights_only checkpoint reads them)."""
        return {"epochs": self.epochs, "mean": self.mean, "std": self.std, "done": list(self.done),
                "sum": {k: v.clone() for k, v in self._sum.items()},
                "dtypes": {k: str(d).removeprefix("torch.") for k, d in self._dtypes.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from `state_dict()`'s output; ValueError when it was made for other epochs / mean / std."""
        have, saved = (self.epochs, self.mean, self.std), (state["epochs"], state["mean"], state["std"])
        if tuple(map(float, saved)) != tuple(map(float, have)):
            raise ValueError(f"prompt aggregation state for (train.epochs, gpa_mean, gpa_std) = {saved}, but this "
                             f"run has {have}")
        self.done = [int(e) for e in state["done"]]
        self._sum = {k: v.to("cpu", torch.float64).clone() for k, v in state["sum"].items()}
        self._dtypes = {k: getattr(torch, d) for k, d in state["dtypes"].items()}
