"""Local CLIP checkpoint files: reading them, and which activation their weights were trained with.

`read_clip_file(name, path, name_says_quick)` -> (state dict, quick_gelu, what decided it), for
`clip.load_clip(name, "/path/file")`:
- a TorchScript archive (OpenAI's release format, e.g. ViT-B-16.pt): its code names the activation module
  (class QuickGELU: OpenAI's x * sigmoid(1.702 x); without it, nn.GELU); its state dict is read with
  torch.jit.load and OpenAI's extra entries (input_resolution, context_length, vocab_size) are dropped.
- a state dict holding those extra entries (extracted from OpenAI's archive): QuickGELU.
- a state dict with an open_clip_config.json beside it (a Hugging Face hub snapshot) whose model_cfg states
  quick_gelu: that.
- any other state dict (torch.save or .safetensors; open_clip's or OpenAI's key layout, which are the same for
  the plain ViTs): the file does not say, and the model NAME decides: "ViT-B-16" is nn.GELU, "ViT-B-16-quickgelu"
  QuickGELU. OpenAI's (and other QuickGELU-trained) weights saved as a plain state dict must be loaded under the
  "-quickgelu" name.
A file whose code says nn.GELU loaded under a "-quickgelu" name raises ValueError (never a silent switch).
"""
from __future__ import annotations

import os
import zipfile

import torch

__all__ = ["read_clip_file", "is_torchscript", "OPENAI_EXTRA_KEYS"]

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def is_torchscript(path: str) -> bool:
    """Whether `path` is a TorchScript archive (a zip with code/ and constants.pkl, unlike torch.save's zips)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/__torch__/" in n for n in z.namelist())


def _archive_says_quick_gelu(path: str) -> bool:
    """Whether the archive's code defines or calls QuickGELU (module class name, or its 1.702 constant)."""
    with zipfile.ZipFile(path) as z:
        for n in z.namelist():
            if "/code/" in n and n.endswith(".py"):
                code = z.read(n)
                if b"QuickGELU" in code or b"1.702" in code:
                    return True
    return False


def load_error(exc: BaseException) -> str:
    """torch.load's error in one line, without its advice (retry with weights_only=False, allowlist globals: never
    for a file of unknown origin, that runs pickled code)."""
    import re

    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if "weights only load failed" in first.lower() or "weights_only" in first:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(r"Unsupported operand \d+", text)
        first = "it holds more than tensors and plain types" + (
            f" ({found.group(1) if found.groups() else found.group(0)})" if found else "")
    else:
        first = first.split(". ")[0].rstrip(".")
    return f"{type(exc).__name__}: {first}"


def _read_state_dict(path: str) -> dict:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"pretrained={path!r} is not a readable CLIP checkpoint ({load_error(exc)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"pretrained={path!r} is not a CLIP state dict (a dict of tensors, or {{'state_dict': "
                         f"...}}); found {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _sibling_config(path: str):
    """(quick_gelu, how) from an open_clip_config.json beside the file (a Hugging Face hub snapshot, or a folder
    saved by open_clip) whose model_cfg states quick_gelu; (None, "") otherwise."""
    import json

    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "open_clip_config.json")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return None, ""
    model_cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else {}
    if not isinstance(model_cfg, dict) or "quick_gelu" not in model_cfg:
        return None, ""
    quick = bool(model_cfg["quick_gelu"])
    return quick, f"{cfg_path} (quick_gelu={quick})"


def read_clip_file(name: str, path: str, name_says_quick: bool):
    """(state dict, quick_gelu: bool, what decided it) of a local CLIP checkpoint; see the module docstring."""
    path = os.fspath(path)           # clip.load_clip has checked that it is a file (WeightsUnavailable if not)
    detected = None
    if is_torchscript(path):
        detected = _archive_says_quick_gelu(path)
        try:
            state = dict(torch.jit.load(path, map_location="cpu").state_dict())
        except Exception as exc:
            raise ValueError(f"pretrained={path!r} is a TorchScript archive that cannot be read "
                             f"({load_error(exc)})") from None
        how = f"the TorchScript code of {path} ({'QuickGELU' if detected else 'no QuickGELU: nn.GELU'})"
    else:
        state = _read_state_dict(path)
        if any(k in state for k in OPENAI_EXTRA_KEYS):
            detected = True
            how = f"{path}'s OpenAI entries ({', '.join(k for k in OPENAI_EXTRA_KEYS if k in state)}: OpenAI's CLIP)"
        else:
            detected, how = _sibling_config(path)
    for k in OPENAI_EXTRA_KEYS:
        state.pop(k, None)
    if detected is None:
        return state, name_says_quick, (f"the model name {name!r} ({path} is a plain state dict, which does not "
                                        f"say; QuickGELU-trained weights such as OpenAI's need the '-quickgelu' "
                                        f"name)")
    if name_says_quick and not detected:
        raise ValueError(f"{path} was built with nn.GELU ({how}), but the model name {name!r} says QuickGELU: load "
                         f"it under the name without '-quickgelu'")
    return state, detected, how
