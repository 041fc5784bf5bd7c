"""The frozen CLIP: loading it with open_clip, and an image tower that returns the pooled feature and the patch tokens.

`load_clip` accepts an open_clip model instance, or a model name with an open_clip pretrained tag
("openai", "laion2b_s34b_b88k", ...) or a local checkpoint path, or `pretrained=None` for random weights.
When the weights cannot be had (no network, not cached), it raises `WeightsUnavailable`, saying how to provide
them, and in seconds: before open_clip is asked for a pretrained tag, the file the tag resolves to (the Hugging Face
hub file, else the URL, as open_clip's `download_pretrained` picks) is looked up in its cache; if it is not there,
`hub_reachable(url)` tries one TCP connection to the host (or to the *_proxy proxy), `PROBE_TIMEOUT` s, instead of
huggingface_hub's ~45 s of retries (INTCOOP_SKIP_NETWORK_PROBE=1 turns the probe off).
`image_features` gives f(x) [B, E] and Z(x) [B, L, Wv] (all final-layer tokens after ln_post, the class token
included: L = 197 for ViT-B/16 at 224 px).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["Clip", "load_clip", "image_features", "WeightsUnavailable", "check_supported", "register_tiny_clip",
           "TINY_CLIP", "hub_reachable"]

DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-B-16", "openai"
TINY_CLIP = "intcoop-tiny"   # a test-sized open_clip config shipped in intcoop/configs (use with pretrained=None)
PROBE_TIMEOUT = 3.0          # seconds for the reachability probe's TCP connect (name lookup included: 2x at most)


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
        if pretrained:
            _fail_fast_if_unavailable(clip_or_name, pretrained)
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


def hub_reachable(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to `url`'s host (or to the proxy the environment names for it) opens in time.

    The name lookup and connect run in a daemon thread that is given 2 * timeout in all (a hung resolver is not
    bounded by a socket timeout). INTCOOP_SKIP_NETWORK_PROBE=1: always True (no probe)."""
    import socket
    import threading
    import urllib.parse
    import urllib.request

    if os.environ.get("INTCOOP_SKIP_NETWORK_PROBE", "") not in ("", "0"):
        return True
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and host and not urllib.request.proxy_bypass(host):
        pp = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = pp.hostname, pp.port or (443 if pp.scheme == "https" else 1080 if "socks" in pp.scheme else 80)
    if not host:
        return True                                        # nothing to probe: let the download say what is wrong
    ok = []

    def connect():
        try:
            socket.create_connection((host, port), timeout).close()
            ok.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=connect, daemon=True, name="intcoop-hub-probe")
    worker.start()
    worker.join(2 * timeout)
    return bool(ok)


def _cached_hub_file(repo_id: str, filenames) -> str | None:
    """The local path of the first of `filenames` in the Hugging Face cache for `repo_id` (revision main), or None."""
    from huggingface_hub import try_to_load_from_cache

    for f in filenames:
        path = try_to_load_from_cache(repo_id, f)
        if isinstance(path, str):
            return path
    return None


def _fail_fast_if_unavailable(name: str, tag: str) -> None:
    """Raise WeightsUnavailable at once when open_clip's pretrained `tag` of `name` is neither cached nor reachable.

    Mirrors open_clip's `download_pretrained`: a 'file' entry is local; the 'hf_hub' entry ('org/repo/file', or
    'org/repo/' for open_clip_pytorch_model.bin; a .safetensors alternative is tried first) when huggingface_hub
    is installed; else the 'url' (cached as ~/.cache/clip/<basename>). Tags it does not know are left to open_clip.
    """
    import open_clip
    from open_clip import pretrained as ocp

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg or cfg.get("file"):
        return
    hub = cfg.get("hf_hub", "") if ocp.has_hf_hub() else ""
    if hub:
        from huggingface_hub import constants

        repo, filename = os.path.split(hub)
        filename = filename or ocp.HF_WEIGHTS_NAME
        names = ([ocp.HF_SAFE_WEIGHTS_NAME] if filename == ocp.HF_WEIGHTS_NAME else
                 [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else []) + [filename]
        if _cached_hub_file(repo, names) is not None:
            return
        url, cache, offline = constants.ENDPOINT, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
        what = f"Hugging Face hub repo {repo} (file {' or '.join(names)})"
        fix = (f"on a machine with network access run open_clip.create_model_and_transforms({name!r}, "
               f"pretrained={tag!r}) once (or `hf download {repo}`), copy its cache to {cache} here and set "
               f"HF_HUB_OFFLINE=1")
    elif cfg.get("url"):
        url, cache, offline = cfg["url"], os.path.expanduser("~/.cache/clip"), False
        if os.path.isfile(os.path.join(cache, os.path.basename(url))):
            return
        what = url
        fix = f"download {url} elsewhere and put it at {os.path.join(cache, os.path.basename(url))}"
    else:
        return
    if offline:
        reason = "HF_HUB_OFFLINE is set"
    elif not hub_reachable(url):
        reason = f"{url} cannot be reached (no connection within {PROBE_TIMEOUT:g} s)"
    else:
        return
    raise WeightsUnavailable(
        f"no weights for {name} with open_clip's pretrained tag {tag!r}: they come from {what}, are not in the "
        f"local cache ({cache}) and {reason}.\nFix: {fix}; or pass pretrained='/path/to/checkpoint.pt' (an open_clip "
        f"or OpenAI checkpoint), or an open_clip model instance. pretrained=None gives random weights.")


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
