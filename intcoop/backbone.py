"""The frozen CLIP: loading it with open_clip, and an image tower that returns the pooled feature and the patch tokens.

`load_clip` accepts an open_clip model instance, or a model name with an open_clip pretrained tag
("openai", "laion2b_s34b_b88k", ...) or a local checkpoint path, or `pretrained=None` for random weights.
When the weights cannot be had (no network, not cached), it raises `WeightsUnavailable`, saying how to
provide them. `image_features` gives f(x) [B, E] and Z(x) [B, L, Wv] (all final-layer tokens after ln_post, the
class token included: L = 197 for ViT-B/16 at 224 px).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["Clip", "load_clip", "image_features", "WeightsUnavailable", "check_supported", "register_tiny_clip",
           "TINY_CLIP"]

DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-B-16", "openai"
TINY_CLIP = "intcoop-tiny"   # a test-sized open_clip config shipped in intcoop/configs (use with pretrained=None)


def register_tiny_clip() -> str:
    """Make `intcoop-tiny` an open_clip model name (intcoop/configs/intcoop-tiny.json: the real BPE vocabulary and
    77-token context, towers of width 64, 2 layers, 32 px images); idempotent."""
    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(Path(__file__).with_name("configs") / f"{TINY_CLIP}.json")
    return TINY_CLIP


class WeightsUnavailable(RuntimeError):
    """The pretrained weights asked for are not on this machine and cannot be downloaded."""


@dataclass
class Clip:
    """An open_clip model with its preprocessing (eval transform) and tokenizer."""

    model: nn.Module
    preprocess: object
    tokenizer: object
    name: str = "custom"
    pretrained: str | None = None


def _tokenizer_for(model: nn.Module, name: str | None):
    import open_clip

    if name is not None:
        return open_clip.get_tokenizer(name)
    if getattr(model, "vocab_size", 49408) != 49408:
        raise ValueError("a CLIP model instance with a non-CLIP vocabulary needs its tokenizer: pass tokenizer=")
    return open_clip.SimpleTokenizer(context_length=model.context_length)


def load_clip(clip_or_name="ViT-B-16", pretrained: str | None = None, *, device=None, tokenizer=None,
              preprocess=None) -> Clip:
    """An open_clip CLIP, frozen and in eval mode. See the module docstring for what is accepted."""
    import open_clip

    if isinstance(clip_or_name, Clip):
        clip = clip_or_name
    elif isinstance(clip_or_name, nn.Module):
        model = clip_or_name
        if preprocess is None:
            size = getattr(model.visual, "image_size", 224)
            size = size[0] if isinstance(size, (tuple, list)) else size
            preprocess = open_clip.image_transform(size, is_train=False)
        clip = Clip(model, preprocess, tokenizer or _tokenizer_for(model, None))
    elif isinstance(clip_or_name, str):
        if clip_or_name == TINY_CLIP:
            register_tiny_clip()
        if clip_or_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {clip_or_name!r}; see open_clip.list_models()")
        try:
            model, _, pre = open_clip.create_model_and_transforms(clip_or_name, pretrained=pretrained)
        except Exception as exc:  # network errors, missing cache files, bad paths
            where = (f"the local file {pretrained!r}" if pretrained and os.path.sep in pretrained
                     else f"open_clip's pretrained tag {pretrained!r}")
            raise WeightsUnavailable(
                f"could not load weights for {clip_or_name} from {where}: {type(exc).__name__}: {exc}\n"
                f"Provide them by downloading once with network access (open_clip caches them under "
                f"~/.cache/huggingface), or pass pretrained='/path/to/checkpoint.pt' (an open_clip or OpenAI "
                f"checkpoint), or an open_clip model instance. pretrained=None gives random weights.") from exc
        clip = Clip(model, preprocess or pre, tokenizer or _tokenizer_for(model, clip_or_name),
                    clip_or_name, pretrained)
    else:
        raise TypeError(f"expected an open_clip model, a Clip or a model name, got {type(clip_or_name).__name__}")
    check_supported(clip.model)
    clip.model.eval().requires_grad_(False)
    if device is not None:
        clip.model.to(device)
    return clip


def check_supported(model: nn.Module) -> None:
    """Raise a clear error for open_clip models whose text tower the fast encoder does not cover."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    missing = [n for n in needed if not hasattr(model, n)]
    if missing:
        raise ValueError(f"unsupported model {type(model).__name__}: the fast text encoder needs a CLIP text "
                         f"tower with {', '.join(missing)} (open_clip CLIP; CustomTextCLIP/CoCa are not supported)")
    if getattr(model, "text_pool_type", "argmax") != "argmax":
        raise ValueError(f"unsupported text pooling {model.text_pool_type!r}: the fast encoder reads the EOT token")
    block = model.transformer.resblocks[0]
    if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
        raise ValueError("unsupported text block: the fast encoder expects open_clip's ResidualAttentionBlock")


def image_size(model: nn.Module) -> tuple[int, int]:
    size = getattr(model.visual, "image_size", 224)
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _plain_vit(visual: nn.Module) -> bool:
    return (hasattr(visual, "_embeds") and getattr(visual, "attn_pool", None) is None
            and not getattr(visual, "final_ln_after_pool", False) and hasattr(visual, "_global_pool"))


def image_features(model: nn.Module, images: torch.Tensor, tokens: bool = True):
    """The frozen image tower: (f(x) [B, E], Z(x) [B, L, Wv] or None).

    For open_clip's VisionTransformer Z(x) is every final-layer token after ln_post (class token first). For
    other towers only the pooled feature is available, and tokens=True raises.
    """
    visual = model.visual
    if not tokens:
        out = visual(images)
        return (out[0] if getattr(visual, "output_tokens", False) else out), None
    if not _plain_vit(visual):
        raise ValueError(f"attention conditioning needs patch tokens from a plain ViT image tower; "
                         f"{type(visual).__name__} does not give them (use conditioning='additive' or 'none')")
    x = visual.transformer(visual._embeds(images))
    x = visual.ln_post(x)
    pooled, _ = visual._global_pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled, x
