"""IntCoOp: a frozen open_clip CLIP, a prompt learner, and the logits of METHOD.md through the fast text encoder.

    logit(x, c) = exp(logit_scale) * cos(f(x), t_c(x)),   t_c(x) = text feature of [prefix(x)] [c] [.] [EOT]

`IntCoOp.from_clip(clip_or_name, pretrained=None, **config)` builds it; the switches (conditioning, attributes)
and every other ModelConfig field are keyword arguments. Only the prompt learner is trainable; checkpoints hold
`learnable_state_dict()` and the config.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Clip, image_features, load_clip
from .config import ModelConfig
from .prompts import PromptLearner
from .text import ClassSuffixes, TextTower, class_suffixes

__all__ = ["IntCoOp", "ATTRIBUTE_MODES", "logits_function"]

ATTRIBUTE_MODES = ("predicted", "oracle", "shuffled", "off")


class IntCoOp(nn.Module):
    """The model. `clip` is frozen; `prompt` (PromptLearner) holds every learned parameter."""

    def __init__(self, clip: Clip, config: ModelConfig):
        super().__init__()
        if config.attributes not in ATTRIBUTE_MODES:
            raise ValueError(f"attributes must be one of {', '.join(ATTRIBUTE_MODES)}, got {config.attributes!r}")
        if config.attributes == "oracle" and config.attr_tokens != 1:
            raise ValueError("attributes='oracle' puts one BLIP-2 word in the prompt: it needs attr_tokens=1")
        self.config = config
        self.clip = clip.model
        self.tokenizer, self.preprocess, self.clip_name = clip.tokenizer, clip.preprocess, clip.name
        tok = self.tokenizer
        emb = self.clip.token_embedding.weight
        init = tok.encode(config.ctx_init) if config.ctx_init else []
        visual = self.clip.visual
        patch_width = visual.ln_post.normalized_shape[0] if hasattr(visual, "ln_post") else None
        self.prompt = PromptLearner(
            emb, tok.sot_token_id, init, n_ctx=config.n_ctx, embed_dim=self.clip.text_projection.shape[-1],
            patch_width=patch_width, conditioning=config.conditioning, heads=config.heads,
            attr_tokens=0 if config.attributes == "off" else config.attr_tokens, attr_hidden=config.attr_hidden,
            seed=config.seed)
        self.tower = TextTower(self.clip)

    @classmethod
    def from_clip(cls, clip_or_name="ViT-B-16", pretrained: str | None = None, *, device=None, **config) -> "IntCoOp":
        """Build from an open_clip model (instance, or name + pretrained tag / local checkpoint path)."""
        clip = load_clip(clip_or_name, pretrained)
        name = clip.name if isinstance(clip_or_name, str) else "custom"
        cfg = ModelConfig(**{**dict(clip=name, pretrained=pretrained), **config})
        model = cls(clip, cfg)
        return model.to(device) if device is not None else model

    # --- switches ----------------------------------------------------------------------------------------------
    @property
    def attributes_mode(self) -> str:
        return self.config.attributes

    def set_attributes(self, mode: str) -> None:
        """Switch predicted / oracle / shuffled at evaluation time (a model trained with 'off' has no slot)."""
        if mode not in ATTRIBUTE_MODES:
            raise ValueError(f"attributes must be one of {', '.join(ATTRIBUTE_MODES)}, got {mode!r}")
        if (mode == "off") != (self.prompt.attr is None):
            raise ValueError(f"cannot switch attributes from {self.config.attributes!r} to {mode!r}: "
                             "the attribute slot is part of the trained prompt")
        self.config = dataclasses.replace(self.config, attributes=mode)

    def learnable_state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.prompt.state_dict().items()}

    # --- the pieces ----------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.clip.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.clip.token_embedding.weight.device

    def image_features(self, images: torch.Tensor):
        """Frozen image tower: f(x) [B, E] and (for attention conditioning) patch tokens [B, L, Wv]."""
        with torch.no_grad():
            return image_features(self.clip, images, tokens=self.config.conditioning == "attention")

    def prompt_prefix(self, images: torch.Tensor | None = None, *, feats=None, tokens=None,
                      attr_targets: torch.Tensor | None = None, return_attrs: bool = False):
        """The per-image prefix [B, P, D] (and the predicted attribute tokens [B, K, D] or None).

        attr_targets [B, D] (with NaN rows where an image has no label) is used by attributes='oracle'.
        """
        if feats is None:
            feats, tokens = self.image_features(images)
        ctx = self.prompt.context(feats, tokens)
        pred = self.prompt.attributes(feats) if self.prompt.attr is not None else None
        attrs, mode = pred, self.config.attributes
        if mode == "shuffled" and pred is not None and pred.shape[0] > 1:
            attrs = pred.roll(1, 0)                     # every image gets another image's attribute
        elif mode == "oracle":
            if attr_targets is None:
                raise ValueError("attributes='oracle' needs attr_targets (BLIP-2 label embeddings) for each image")
            known = ~attr_targets.isnan().any(-1)
            attrs = torch.where(known[:, None, None], attr_targets.nan_to_num()[:, None].to(pred.dtype), pred)
        prefix = self.prompt.prefix(ctx, attrs)
        return (prefix, pred) if return_attrs else prefix

    def suffixes(self, classnames, suffix: str | None = None):
        return class_suffixes(self.tokenizer, classnames, suffix or self.config.suffix, self.prompt.prefix_len,
                              self.tower.context_length).to(self.device)

    def text_features(self, prefix: torch.Tensor, classnames, max_rows: int = 1 << 16) -> torch.Tensor:
        """t_c(x) [B, N, E] through the fast encoder. classnames: names, or `self.suffixes(names)` (tokenised
        once, outside any torch.compile region)."""
        suf = classnames if isinstance(classnames, ClassSuffixes) else self.suffixes(classnames)
        return self.tower.encode(prefix, suf, max_rows)

    def scores(self, feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """exp(logit_scale) * cos(f(x), t_c(x)) (+ logit_bias if the model has one): [B, N]."""
        f = F.normalize(feats.to(text.dtype), dim=-1)
        logits = self.clip.logit_scale.exp() * torch.einsum("be,bne->bn", f, F.normalize(text, dim=-1))
        bias = getattr(self.clip, "logit_bias", None)
        return logits + bias if bias is not None else logits

    def logits_from_features(self, feats, tokens, classnames, attr_targets=None, max_rows: int = 1 << 16):
        """Logits [B, N] from the frozen tower's outputs (cached features; the compiled step's body)."""
        prefix = self.prompt_prefix(feats=feats, tokens=tokens, attr_targets=attr_targets)
        return self.scores(feats, self.text_features(prefix, classnames, max_rows))

    def forward(self, images: torch.Tensor, classnames, attr_targets=None) -> torch.Tensor:
        """Logits [B, N] for preprocessed images [B, 3, H, W]; differentiable in the prompt learner."""
        return self.logits_from_features(*self.image_features(images), classnames, attr_targets)


@functools.cache
def _compiled_logits(backend: str):
    return torch.compile(IntCoOp.logits_from_features, backend=backend)


def logits_function(compile: bool | str = False):
    """f(model, feats, tokens, suffixes, attr_targets=None, max_rows=...) -> logits [B, N]: the evaluation loops'
    body, `IntCoOp.logits_from_features`, eager or under torch.compile (compile=True: inductor; a string names
    the backend). One compiled function per backend for every model; it holds no model, and recompiles for a new
    model, class list or batch shape (dynamic after the first change)."""
    if not compile:
        return IntCoOp.logits_from_features
    return _compiled_logits("inductor" if compile is True else str(compile))
