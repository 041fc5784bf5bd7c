"""IntCoOp: a frozen open_clip CLIP, a prompt learner, and the logits of METHOD.md through the fast text encoder.

    logit(x, c) = exp(logit_scale) * cos(f(x), t_c(x)),   t_c(x) = text feature of [prefix(x)] [c] [.] [EOT]

`IntCoOp.from_clip(clip_or_name, pretrained=None, **config)` builds it; the switches (conditioning, attributes)
and every other ModelConfig field are keyword arguments. Only the prompt learner is trainable; checkpoints hold
`learnable_state_dict()` and the config.

Precision (`precision="fp32" | "bf16" | "fp16"`, `set_precision`): the frozen CLIP is stored, and runs, in that
dtype; the prompt learner's parameters stay float32 (what the optimiser updates) and run under autocast in the
CLIP's dtype, so gradients reach them in float32; the prefix enters the text tower in its dtype; logits are
float32 (cosines of float32-normalised features). An outer `torch.autocast` on a float32 model is honoured too
(see `image_features`).

Deep prompts (text_depth, visual_prompts; README "Deep prompts"): the deep text tokens go to the prefix pass of
the fast encoder, the visual tokens to the image tower (`clip.prompted_image_features`), which then runs with
gradients to them. When the prefix is the same for every image (no conditioning, no attribute slot: CoOp,
KgCoOp, IVLP, VPT, MaPLe, PromptSRC) the text tower runs once, for one row, and its features serve every image.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .clip import Clip, image_features, load_clip
from .config import ModelConfig
from .images import check_finite
from .prompts import PromptLearner
from .text import ClassSuffixes, TextTower, class_suffixes
from .vision import prompted_image_features

__all__ = ["IntCoOp", "ATTRIBUTE_MODES", "PRECISIONS", "precision_dtype", "logits_function"]

ATTRIBUTE_MODES = ("predicted", "oracle", "shuffled", "off")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}   # model.precision -> dtype


def precision_dtype(precision: str, what: str = "precision") -> torch.dtype:
    """The dtype of a precision name; ValueError naming `what` (the argument or config key) for another value."""
    if precision not in PRECISIONS:
        raise ValueError(f"{what} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


class IntCoOp(nn.Module):
    """The model. `clip` is frozen; `prompt` (PromptLearner) holds every learned parameter."""

    def __init__(self, clip: Clip, config: ModelConfig):
        super().__init__()
        if config.attributes not in ATTRIBUTE_MODES:
            raise ValueError(f"attributes must be one of {', '.join(ATTRIBUTE_MODES)}, got {config.attributes!r}")
        if config.attributes == "oracle" and config.attr_tokens != 1:
            raise ValueError("attributes='oracle' puts one BLIP-2 word in the prompt: it needs attr_tokens=1")
        precision_dtype(config.precision)                 # checked before any weight is touched
        self.config = config
        self.clip = clip.model
        self.tokenizer, self.preprocess, self.clip_name = clip.tokenizer, clip.preprocess, clip.name
        tok = self.tokenizer
        emb = self.clip.token_embedding.weight.float()      # the learned context starts in float32
        init = tok.encode(config.ctx_init) if config.ctx_init else []
        visual = self.clip.visual
        patch_width = visual.ln_post.normalized_shape[0] if hasattr(visual, "ln_post") else None
        self.tower = TextTower(self.clip)
        self.prompt = PromptLearner(
            emb, tok.sot_token_id, init, n_ctx=config.n_ctx, embed_dim=self.clip.text_projection.shape[-1],
            patch_width=patch_width, conditioning=config.conditioning, heads=config.heads,
            attr_tokens=0 if config.attributes == "off" else config.attr_tokens, attr_hidden=config.attr_hidden,
            seed=config.seed, text_depth=config.text_depth, visual=_visual_plan(config, visual, len(self.tower.blocks)))
        self.set_precision(config.precision)

    @classmethod
    def from_clip(cls, clip_or_name="ViT-B-16", pretrained: str | None = None, *, device=None, **config) -> "IntCoOp":
        """Build from an open_clip model (instance, or name + pretrained tag / local checkpoint path). With
        precision="bf16" / "fp16" the CLIP is cast to that dtype (an instance in place, as nn.Module.to does)."""
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

    def set_precision(self, precision: str) -> "IntCoOp":
        """Store (and run) the frozen CLIP in `precision` ("fp32", "bf16", "fp16"); the prompt learner stays
        float32. A checkpoint is verified against the CLIP it was trained on, so load it first, then call this."""
        dtype = precision_dtype(precision)
        self.clip.to(dtype)
        self.config = dataclasses.replace(self.config, precision=precision)
        return self

    def _prompt_autocast(self):
        """The prompt learner's ops in the CLIP's dtype when that is not float32 (and no autocast is on already):
        its float32 parameters are cast per op, so their gradients stay float32."""
        dev = self.device.type
        if self.dtype not in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(dev):
            return contextlib.nullcontext()
        return torch.autocast(dev, dtype=self.dtype)

    @property
    def visual_prompted(self) -> bool:
        """True when the image tower carries learned tokens (it then runs with gradients, no feature cache)."""
        return self.prompt.visual is not None

    def deep_text(self) -> list[torch.Tensor]:
        """The deep text tokens [J_t - 1 tensors [M, D]] in the text tower's dtype (empty for text_depth <= 1)."""
        return [t.to(self.dtype) for t in self.prompt.deep_text]

    def text_rows(self, prefix: torch.Tensor) -> torch.Tensor:
        """The prefix rows the text tower needs: one when the prefix is the same for every image, else all."""
        return prefix[:1] if self.prompt.image_independent else prefix

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
        """Frozen image tower: f(x) [B, E] and (for attention conditioning) patch tokens [B, L, Wv], in the CLIP's
        dtype (images are cast to it).

        Under an outer autocast the tower runs without it, in its stored dtype: autocast turns off
        nn.MultiheadAttention's fused path, and the unfused one feeds a transposed [L, B, D] input to the
        in-projection, which torch's matmul runs as a bmm over a [L, D, 3D] expanded copy of the weight (3x the
        fp32 time of the whole fast_logits on a CPU at ViT-B-16). Store the model in bf16 (precision="bf16")
        for a bf16 image tower; an autocast of the stored dtype changes nothing here."""
        tokens = self.config.conditioning == "attention"
        dev = images.device.type
        outer = torch.is_autocast_enabled(dev)
        prompts = self.prompt.visual_tokens() if self.visual_prompted else None   # float32, cast in the tower
        grad = prompts is not None and torch.is_grad_enabled()
        with (contextlib.nullcontext() if grad else torch.no_grad()), \
                (torch.autocast(dev, enabled=False) if outer else contextlib.nullcontext()):
            if prompts is not None:
                return prompted_image_features(self.clip.visual, images.to(self.dtype), prompts, tokens)
            return image_features(self.clip, images.to(self.dtype), tokens=tokens)

    def prompt_prefix(self, images: torch.Tensor | None = None, *, feats=None, tokens=None,
                      attr_targets: torch.Tensor | None = None, return_attrs: bool = False):
        """The per-image prefix [B, P, D] (and the predicted attribute tokens [B, K, D] or None).

        attr_targets [B, D] (with NaN rows where an image has no label) is used by attributes='oracle'.
        """
        if feats is None:
            check_finite(images)                        # as fast_logits refuses them: NaN would spread silently
            feats, tokens = self.image_features(images)
        with self._prompt_autocast():
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
        prefix = self.prompt.prefix(ctx, attrs)          # float32 (the learned context's dtype)
        return (prefix, pred) if return_attrs else prefix

    def suffixes(self, classnames, suffix: str | None = None):
        return class_suffixes(self.tokenizer, classnames, suffix or self.config.suffix, self.prompt.prefix_len,
                              self.tower.context_length).to(self.device)

    def text_features(self, prefix: torch.Tensor, classnames, max_rows: int = 1 << 16) -> torch.Tensor:
        """t_c(x) [B, N, E] through the fast encoder. classnames: names, or `self.suffixes(names)` (tokenised
        once, outside any torch.compile region)."""
        suf = classnames if isinstance(classnames, ClassSuffixes) else self.suffixes(classnames)
        if prefix.dtype != self.dtype and self.dtype != torch.float32:   # (a float32 tower: autocast's business)
            prefix = prefix.to(self.dtype)                # into the tower's dtype; its gradient returns in float32
        return self.tower.encode(prefix, suf, max_rows, self.deep_text())

    def scores(self, feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """exp(logit_scale) * cos(f(x), t_c(x)) (+ logit_bias if the model has one): [B, N] in float32 at least,
        whatever the towers' dtype (a bf16 cosine has 3 significant digits: too few to rank 1000 classes); a
        float64 model keeps float64. text [B, N, E], or [1, N, E] for every image (`text_rows`)."""
        dt = torch.promote_types(torch.promote_types(feats.dtype, text.dtype), torch.float32)
        text = text.expand(feats.shape[0], -1, -1)
        with torch.autocast(feats.device.type, enabled=False):
            f = F.normalize(feats.to(dt), dim=-1)
            cos = torch.einsum("be,bne->bn", f, F.normalize(text.to(dt), dim=-1))
            logits = self.clip.logit_scale.to(dt).exp() * cos
            bias = getattr(self.clip, "logit_bias", None)
            return logits + bias.to(dt) if bias is not None else logits

    def logits_from_features(self, feats, tokens, classnames, attr_targets=None, max_rows: int = 1 << 16):
        """Logits [B, N] from the frozen tower's outputs (cached features; the compiled step's body)."""
        prefix = self.prompt_prefix(feats=feats, tokens=tokens, attr_targets=attr_targets)
        return self.scores(feats, self.text_features(self.text_rows(prefix), classnames, max_rows))

    def forward(self, images: torch.Tensor, classnames, attr_targets=None) -> torch.Tensor:
        """Logits [B, N] for preprocessed images [B, 3, H, W]; differentiable in the prompt learner."""
        check_finite(images)
        return self.logits_from_features(*self.image_features(images), classnames, attr_targets)


def _prefix_kv(model: IntCoOp, feats, tokens, attr_targets):
    """Compiled piece 1 (depends on the images only): the prefix [B, P, D] and each text layer's prefix K / V."""
    prefix = model.text_rows(model.prompt_prefix(feats=feats, tokens=tokens, attr_targets=attr_targets))
    if prefix.dtype != model.dtype and model.dtype != torch.float32:
        prefix = prefix.to(model.dtype)
    return prefix, model.tower.prefix_pass(prefix, model.deep_text())


def _suffix_text(model: IntCoOp, kv, part: ClassSuffixes, P: int, dtype):
    """Compiled piece 2: text features [B, n, E] of one chunk of classes against the prefix K / V."""
    return model.tower.suffix_pass(kv, part, P, dtype)


@functools.cache
def _compiled_logits(backend):
    """`IntCoOp.logits_from_features` in two compiled pieces joined on the host, so that one pair of graphs
    serves every class list and batch size: the chunk planning (a loop over the class list) runs outside them,
    and the suffix piece sees the class count as a tensor's length (the chunk's `lengths` replaced by its eot
    [n]: the piece only takes len() of it). Both are compiled with dynamic=True: B, n, the packed rows, the
    longest and shortest suffix are symbols from the first compile, not guarded constants (a size of 1, e.g.
    one image, is still specialised by dynamo: one more graph)."""
    prefix_kv = torch.compile(_prefix_kv, backend=backend, dynamic=True)
    suffix_text = torch.compile(_suffix_text, backend=backend, dynamic=True)

    def logits(model, feats, tokens, classnames, attr_targets=None, max_rows: int = 1 << 16):
        suf = classnames if isinstance(classnames, ClassSuffixes) else model.suffixes(classnames)
        prefix, kv = prefix_kv(model, feats, tokens, attr_targets)
        B, P = prefix.shape[:2]
        parts = [suffix_text(model, kv, dataclasses.replace(c, lengths=c.eot), P, prefix.dtype)
                 for c in suf.chunks(B, max_rows)]
        return model.scores(feats, parts[0] if len(parts) == 1 else torch.cat(parts, 1))
    return logits


def _visual_plan(config: ModelConfig, visual, text_layers: int) -> dict | None:
    """The visual prompts' shape {mode, n, depth, width} (None when off); ValueError for depths past the towers."""
    if not 0 <= config.text_depth <= text_layers:
        raise ValueError(f"text_depth must be in [0, {text_layers}] (the text tower's layers), got {config.text_depth}")
    if config.visual_prompts == "off":
        return None
    if config.visual_prompts not in ("independent", "coupled"):
        raise ValueError(f"visual_prompts must be one of off, independent, coupled, got {config.visual_prompts!r}")
    layers = len(visual.transformer.resblocks) if hasattr(visual, "transformer") else 0
    coupled = config.visual_prompts == "coupled"
    depth, n = (config.text_depth, config.n_ctx) if coupled else (config.visual_depth, config.visual_ctx)
    if not hasattr(visual, "conv1") or not 1 <= depth <= layers:
        raise ValueError(f"visual_depth must be in [1, {layers}] (the image tower's layers), got {depth}"
                         + (" (coupled: text_depth)" if coupled else ""))
    return {"mode": config.visual_prompts, "n": n, "depth": depth, "width": visual.conv1.out_channels}


def logits_function(compile=False):
    """f(model, feats, tokens, suffixes, attr_targets=None, max_rows=...) -> logits [B, N]: the evaluation loops'
    body, `IntCoOp.logits_from_features`, eager or under torch.compile (compile=True: inductor; a string or a
    callable names the backend). One compiled function per backend for every model; it holds no model. A new
    model compiles again; a new class list or batch size recompiles once (dimensions turn dynamic), then no more."""
    if not compile:
        return IntCoOp.logits_from_features
    return _compiled_logits("inductor" if compile is True else compile if callable(compile) else str(compile))
