"""The plain references: the text side CoCoOp's way, one image at a time, N full 77-token prompts each; the deep
prompts the way MaPLe's and PromptSRC's code computes them.

Written once; tests check the fast path against them and benches time the fast path against them. The text
reference runs open_clip's own text transformer (`model.transformer` with its causal mask, or its blocks one by
one when deep tokens replace the context) on padded sequences, as CoCoOp's code does. The image reference
(`reference_image_features`) follows the authors' VisionTransformer: sequence-first ([L, B, W]) tokens, the
prompts concatenated after the positional embedding, each deeper layer's input rebuilt as the first L - n tokens
followed by that layer's prompts, the pooled feature ln_post(class token) @ proj.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .text import class_suffixes

__all__ = ["encode_prompts_reference", "reference_logits", "reference_image_features", "zero_shot_logits"]


def encode_prompts_reference(model: nn.Module, prefix: torch.Tensor, classnames, tokenizer, suffix: str = "{}.",
                             pad_to: int | None = None, deep=()) -> torch.Tensor:
    """Text features [B, N, E]: for each image, N prompts [prefix_b, suffix_c, EOT, padding] of pad_to tokens.
    deep (J - 1 tensors [n, D] or [B, n, D]): the rows 1..n of every prompt replaced at the input of layer j."""
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
        if deep:
            x = _deep_text_blocks(model.transformer, x, [t if t.dim() == 2 else t[b] for t in deep], mask)
        else:
            x = model.transformer(x, attn_mask=mask)
        x = model.ln_final(x)
        x = x[torch.arange(N, device=x.device), eot]
        proj = model.text_projection
        feats.append(proj(x) if isinstance(proj, nn.Linear) else x @ proj)
    return torch.stack(feats, 0)


def _deep_text_blocks(transformer, x: torch.Tensor, deep, mask) -> torch.Tensor:
    """open_clip's text blocks one by one on x [N, L, D], the rows 1..n replaced by deep[j - 1] before block j."""
    first = getattr(transformer, "batch_first", True)
    x = x if first else x.transpose(0, 1)                               # the blocks' own layout
    for j, blk in enumerate(transformer.resblocks):
        if 1 <= j <= len(deep):
            t = deep[j - 1].to(x.dtype)
            n = t.shape[0]
            if first:
                x = torch.cat([x[:, :1], t.expand(x.shape[0], -1, -1), x[:, 1 + n:]], 1)
            else:
                x = torch.cat([x[:1], t[:, None].expand(-1, x.shape[1], -1), x[1 + n:]], 0)
        x = blk(x, attn_mask=mask)
    return x if first else x.transpose(0, 1)


def reference_image_features(clip_model: nn.Module, images: torch.Tensor, prompts):
    """(pooled [B, E], tokens [B, 1 + L, Wv]) with visual prompts (J tensors [n, Wv]): the pooled feature as the
    authors' VisionTransformer computes it, on open_clip's weights (its blocks run on [B, L, W] when
    batch_first); tokens: ln_post of the class and patch tokens (ours: what attention conditioning reads)."""
    v = clip_model.visual
    x = v.conv1(images.to(v.conv1.weight.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)          # [B, grid**2, Wv]
    cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
    x = torch.cat([x, prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
    x = v.ln_pre(x).permute(1, 0, 2)                                    # [L, B, Wv], the authors' layout
    first = getattr(v.transformer, "batch_first", True)
    for j, blk in enumerate(v.transformer.resblocks):
        if 1 <= j < len(prompts):
            n = prompts[j].shape[0]
            x = torch.cat([x[0:x.shape[0] - n], prompts[j].to(x.dtype).expand(x.shape[1], -1, -1).permute(1, 0, 2)],
                          dim=0)
        x = blk(x.permute(1, 0, 2)).permute(1, 0, 2) if first else blk(x)
    n = prompts[0].shape[0]
    tokens = v.ln_post(x.permute(1, 0, 2)[:, : x.shape[0] - n])
    x = v.ln_post(x.permute(1, 0, 2)[:, 0, :])
    return (x @ v.proj if v.proj is not None else x), tokens


def reference_logits(model, images: torch.Tensor, classnames, attr_targets=None) -> torch.Tensor:
    """IntCoOp logits [B, N] with the text side computed by `encode_prompts_reference` (same weights), deep text
    tokens included, and, with visual prompts, the image side by `reference_image_features`."""
    if model.visual_prompted:
        feats, tokens = reference_image_features(model.clip, images, model.prompt.visual_tokens())
        tokens = tokens if model.config.conditioning == "attention" else None
    else:
        feats, tokens = model.image_features(images)
    prefix = model.prompt_prefix(feats=feats, tokens=tokens, attr_targets=attr_targets)
    text = encode_prompts_reference(model.clip, prefix, classnames, model.tokenizer, model.config.suffix,
                                    deep=list(model.prompt.deep_text))
    return model.scores(feats, text)


def zero_shot_logits(clip_model: nn.Module, tokenizer, images: torch.Tensor, classnames,
                     template: str = "a photo of a {}.") -> torch.Tensor:
    """Plain CLIP zero-shot logits [B, N]: the floor the benches compare with, and the identity the tests keep."""
    img = F.normalize(clip_model.encode_image(images), dim=-1)
    txt = F.normalize(clip_model.encode_text(tokenizer([template.format(c) for c in classnames]).to(images.device)),
                      dim=-1)
    return clip_model.logit_scale.exp() * img @ txt.T
