"""The frozen CLIP: loading it with open_clip, and an image tower that returns the pooled feature and the patch tokens.

`load_clip` accepts an open_clip model instance, or a model name with an open_clip pretrained tag
("openai", "laion2b_s34b_b88k", ...) or a local checkpoint path, or `pretrained=None` for random weights.
When the weights cannot be had (no network, not cached), it raises `WeightsUnavailable`, saying how to provide
them, and in seconds: before open_clip is asked for a pretrained tag, the file the tag resolves to (the Hugging Face
hub file, else the URL, as open_clip's `download_pretrained` picks) is looked up in its cache; if it is not there,
`hub_reachable(url)` tries one TCP connection to the host (or to the *_proxy proxy), `PROBE_TIMEOUT` s, instead of
huggingface_hub's ~45 s of retries (INTCOOP_SKIP_NETWORK_PROBE=1 turns the probe off).
The activation is the one the weights were trained with (`Clip.activation`, "quick_gelu" or "gelu"; open_clip 3.3
builds "ViT-B-16" with nn.GELU even for the `openai` tag and only warns): a tag's pretrained config decides
(`quick_gelu`: True for OpenAI's, DFN's and MetaCLIP's weights); a local file's format decides when it can
(intcoop/clip_files.py: OpenAI's TorchScript archives and state dicts extracted from them are QuickGELU; a hub
snapshot's open_clip_config.json), else the name (a plain state dict of QuickGELU-trained weights, e.g. OpenAI's, needs "ViT-B-16-quickgelu"); a file
that contradicts an explicit "-quickgelu" name raises. `fingerprint(model)` is a sha256 over the frozen weights
(cached per model), which checkpoints record. Tokenizers are built once: one per model name
(`tokenizer_for_name`) and one CLIP BPE per context length (`default_tokenizer`, for model instances).
`image_features` gives f(x) [B, E] and Z(x) [B, L, Wv] (all final-layer tokens after ln_post, the class token
included: L = 197 for ViT-B/16 at 224 px).
"""
from __future__ import annotations

import functools
import hashlib
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["Clip", "load_clip", "image_features", "WeightsUnavailable", "check_supported", "register_tiny_clip",
           "TINY_CLIP", "hub_reachable", "activation_of", "default_tokenizer", "tokenizer_for_name", "fingerprint", "activation_plan"]

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
    """An open_clip model with its preprocessing (eval transform) and tokenizer. activation: what its MLPs compute
    ("quick_gelu": OpenAI's x * sigmoid(1.702 x), "gelu": exact GELU; `activation_of`); activation_source says what
    decided it (the tag's pretrained config, the checkpoint file, the model name, or a given instance)."""

    model: nn.Module
    preprocess: object
    tokenizer: object
    name: str = "custom"
    pretrained: str | None = None
    activation: str = ""
    activation_source: str = "the model instance"

    def __post_init__(self):
        self.activation = self.activation or activation_of(self.model)


def activation_of(model: nn.Module) -> str:
    """The activation the CLIP's transformer MLPs compute: "quick_gelu", "gelu", or the class names found
    (joined with "+" when the towers differ)."""
    from open_clip.transformer import QuickGELU

    found = set()
    for name, mod in model.named_modules():
        if name.endswith("mlp.gelu") or name.endswith("mlp.act"):
            found.add("quick_gelu" if isinstance(mod, QuickGELU) else
                      "gelu" if isinstance(mod, nn.GELU) and mod.approximate == "none" else type(mod).__name__)
    return "+".join(sorted(found)) or "unknown"


def default_tokenizer(context_length: int = 77):
    """CLIP's BPE tokenizer, built once per context length (its tables are ~20 MiB; the class-suffix cache of
    `text.class_suffixes` is keyed on the tokenizer instance, so one instance is what makes it hit)."""
    return _default_tokenizer(int(context_length))


@functools.lru_cache(maxsize=None)
def _default_tokenizer(context_length: int):
    import open_clip

    return open_clip.SimpleTokenizer(context_length=context_length)


@functools.lru_cache(maxsize=None)
def tokenizer_for_name(name: str):
    """open_clip's tokenizer for model `name`, built once per name."""
    import open_clip

    if name == TINY_CLIP:
        register_tiny_clip()
    return open_clip.get_tokenizer(name)


def _tokenizer_for(model: nn.Module, name: str | None):
    if name is not None:
        return tokenizer_for_name(name)
    if getattr(model, "vocab_size", 49408) != 49408:
        raise ValueError("a CLIP model instance with a non-CLIP vocabulary needs its tokenizer: pass tokenizer=")
    return default_tokenizer(getattr(model, "context_length", 77))


NO_WEIGHTS = ("none", "null", "")                    # pretrained strings that mean "no weights" (random)


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
        if isinstance(pretrained, str) and pretrained.strip().lower() in NO_WEIGHTS:
            pretrained = None                             # "none" / "None" / "null": random weights, as None
        if clip_or_name == TINY_CLIP:
            register_tiny_clip()
        if clip_or_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {clip_or_name!r}; see open_clip.list_models()")
        model, pre, quick, why = _load_named(clip_or_name, pretrained)
        clip = Clip(model, preprocess or pre, tokenizer or _tokenizer_for(model, clip_or_name), clip_or_name,
                    pretrained, activation_source=why)
        want = "quick_gelu" if quick else "gelu"
        if clip.activation != want:                       # open_clip ignored what we asked for: never go on silently
            raise RuntimeError(f"{clip_or_name} with pretrained={pretrained!r} was built with {clip.activation}, but "
                               f"{why} says {want}")
    else:
        raise TypeError(f"expected an open_clip model, a Clip or a model name, got {type(clip_or_name).__name__}")
    check_supported(clip.model)
    clip.model.eval().requires_grad_(False)
    if device is not None:
        clip.model.to(device)
    return clip


def activation_plan(name: str, pretrained: str | None) -> tuple[bool, str] | None:
    """(quick_gelu, what decides it) for open_clip model `name` with random weights (None) or a pretrained tag,
    without loading any weights; None for a local file (its format decides: `clip_files.read_clip_file`)."""
    import open_clip

    if name == TINY_CLIP:
        register_tiny_clip()
    base_quick = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
    if not pretrained:
        return base_quick, f"the model name {name!r} (random weights)"
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        return None
    # The tag's pretrained config says what its weights were trained with (OpenAI's: QuickGELU); a tag silent on
    # it keeps the model config's value. open_clip itself only warns on a mismatch and builds nn.GELU.
    quick = bool(tag_cfg.get("quick_gelu", base_quick))
    return quick, f"open_clip's pretrained config of tag {pretrained!r} (quick_gelu={quick})"


def _load_named(name: str, pretrained: str | None):
    """(model, preprocess, quick_gelu, what decided the activation) for an open_clip name and tag / file / None."""
    import open_clip

    plan = activation_plan(name, pretrained)
    if plan is None:                                   # a local checkpoint file
        from .clip_files import read_clip_file

        if not os.path.isfile(pretrained):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise WeightsUnavailable(f"pretrained={pretrained!r} is neither a pretrained tag of {name} (open_clip "
                                     f"knows: {tags}) nor a file")

        base_quick = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
        state, quick, why = read_clip_file(name, pretrained, base_quick)
        model, _, pre = open_clip.create_model_and_transforms(name, pretrained=None, force_quick_gelu=quick)
        _load_state(model, state, pretrained)
        return model, pre, quick, why
    quick, why = plan
    if pretrained:
        _fail_fast_if_unavailable(name, pretrained)
    try:
        model, _, pre = open_clip.create_model_and_transforms(name, pretrained=pretrained, force_quick_gelu=quick)
    except Exception as exc:  # network errors, missing cache files
        raise WeightsUnavailable(
            f"could not load weights for {name} from open_clip's pretrained tag {pretrained!r}: "
            f"{type(exc).__name__}: {exc}\n"
            f"Provide them by downloading once with network access (open_clip caches them under "
            f"~/.cache/huggingface), or pass pretrained='/path/to/checkpoint.pt' (an open_clip or OpenAI "
            f"checkpoint), or an open_clip model instance. pretrained=None gives random weights.") from exc
    return model, pre, quick, why


def _load_state(model: nn.Module, state: dict, path: str) -> None:
    """Load a CLIP state dict (OpenAI's or open_clip's key layout) into `model`, strictly, naming what differs."""
    from open_clip.factory import convert_state_dict

    state = convert_state_dict(model, state)
    for k in {n for n, _ in model.named_buffers()} - set(model.state_dict()):
        state.pop(k, None)                       # non-persistent buffers (attn_mask) that a traced archive keeps
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"the checkpoint {path} does not fit this model: {exc}") from exc


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


_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
FINGERPRINT_SAMPLE = 4096     # elements per tensor that the fingerprint reads (evenly spaced; all of a small one)


def fingerprint(model) -> str:
    """sha256 (hex) of a frozen CLIP's weights: for every state-dict entry (sorted by name) its name, shape and up
    to FINGERPRINT_SAMPLE evenly spaced elements as float32 (so the same weights on any device agree). Computed
    once per model instance and cached (the CLIP is frozen: load new weights into a new instance)."""
    model = model.model if isinstance(model, Clip) else model
    cached = _FINGERPRINTS.get(model)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            flat = t.detach().reshape(-1)
            n = flat.numel()
            if n > FINGERPRINT_SAMPLE:
                idx = torch.arange(FINGERPRINT_SAMPLE, dtype=torch.int64) * (n - 1) // (FINGERPRINT_SAMPLE - 1)
                flat = flat[idx.to(flat.device)]
            h.update(f"{name}:{tuple(t.shape)};".encode())
            h.update(flat.to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest = _FINGERPRINTS[model] = h.hexdigest()
    return digest


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
    other towers only the pooled feature is available, and tokens=True raises. With visual prompts:
    `vision.prompted_image_features`.
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
