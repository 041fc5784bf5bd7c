"""The plain reference for the text side: CoCoOp's way, one image at a time, N full 77-token prompts each.

Written once; tests check the fast path against it and benches time the fast path against it. It runs open_clip's
own text transformer (`model.transformer` with its causal mask) on padded sequences, as CoCoOp's code does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .text import class_suffixes

__all__ = ["encode_prompts_reference", "reference_logits"]


def encode_prompts_reference(model: nn.Module, prefix: torch.Tensor, classnames, tokenizer, suffix: str = "{}.",
                             pad_to: int | None = None) -> torch.Tensor:
    """Text features [B, N, E]: for each image, N prompts [prefix_b, suffix_c, EOT, padding] of pad_to tokens."""
    B, P, _ = prefix.shape
    L = pad_to or model.positional_embedding.shape[0]
    suf = class_suffixes(tokenizer, classnames, suffix, P, L)
    N = len(suf.lengths)
    ids = torch.zeros(N, L - P, dtype=torch.long)
    for c in range(N):
        a, b = int(suf.cu[c]), int(suf.cu[c + 1])
        ids[c, : b - a] = suf.ids[a:b]
    ids = ids.to(prefix.device)
    eot = torch.tensor(suf.lengths, device=prefix.device) - 1 + P
    cast = model.transformer.get_cast_dtype()
    tail = model.token_embedding(ids).to(cast)                           # [N, L - P, D]
    mask = model.attn_mask[:L, :L] if getattr(model, "attn_mask", None) is not None else None
    feats = []
    for b in range(B):                                                   # CoCoOp: one image at a time
        x = torch.cat([prefix[b].to(cast).expand(N, -1, -1), tail], 1) + model.positional_embedding[:L].to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=mask))
        x = x[torch.arange(N, device=x.device), eot]
        proj = model.text_projection
        feats.append(proj(x) if isinstance(proj, nn.Linear) else x @ proj)
    return torch.stack(feats, 0)


def reference_logits(model, images: torch.Tensor, classnames, attr_targets=None) -> torch.Tensor:
    """IntCoOp logits [B, N] with the text side computed by `encode_prompts_reference` (same weights)."""
    feats, tokens = model.image_features(images)
    prefix = model.prompt_prefix(feats=feats, tokens=tokens, attr_targets=attr_targets)
    text = encode_prompts_reference(model.clip, prefix, classnames, model.tokenizer, model.config.suffix)
    return model.scores(feats, text)


def zero_shot_logits(clip_model: nn.Module, tokenizer, images: torch.Tensor, classnames,
                     template: str = "a photo of a {}.") -> torch.Tensor:
    """Plain CLIP zero-shot logits [B, N]: the floor the benches compare with, and the identity the tests keep."""
    img = F.normalize(clip_model.encode_image(images), dim=-1)
    txt = F.normalize(clip_model.encode_text(tokenizer([template.format(c) for c in classnames]).to(images.device)),
                      dim=-1)
    return clip_model.logit_scale.exp() * img @ txt.T
