"""Training checkpoints: what they hold, how they are written and read, and `load_trained`.

A checkpoint (`<out>/last.pt`, `<out>/best.pt`) is a dict of plain types and tensors only, so that
`torch.load(weights_only=True)` reads it (no pickled code is ever executed):
    format      FORMAT
    config      the run's RunConfig as a dict (its "model" section is the trained model's own ModelConfig)
    prompt      model.learnable_state_dict(): the prompt learner's parameters (CPU tensors); nothing of CLIP
    optimizer   SGD state_dict;   scheduler   LambdaLR state_dict
    epoch       epochs completed; step   optimiser steps done
    rng         RNG states at the start of epoch `epoch`: torch (CPU ByteTensor), cuda (list of ByteTensors),
                numpy (MT19937 key as an int64 tensor + pos + gauss fields), python (version, 625 ints, gauss),
                loader (the data loader's torch.Generator state)
    classnames  the N training class names; template: the hand-crafted prompt; metrics: the last epoch's
    clip        what rebuilds or verifies the frozen CLIP (`clip_record`): name, pretrained (tag / file / None),
                source (tag, file, random, instance), activation (quick_gelu / gelu), architecture (tower widths,
                layers, patch and image size), dtype, fingerprint (`clip.fingerprint`: sha256 over its weights)
    gpa         PromptSRC's prompt aggregation so far (`selfreg.GaussianAggregate.state_dict()`), or None
    versions    torch and intcoop versions
Files are written atomically (`torch.save` into memory, then `config.atomic_write_bytes`).

`check_compatible(saved_model_config, model, state)` raises CheckpointMismatchError naming the first field that
differs (clip, pretrained, n_ctx, conditioning, heads, attribute slot, attr_tokens, attr_hidden, suffix) or the
first parameter whose name or shape differs, then (`check_clip`) every way the CLIP differs from the one the
checkpoint was trained on (architecture, activation, weights fingerprint). `load_trained(path, clip=None,
pretrained=...)` rebuilds the IntCoOp: it reproduces the saved model's logits or raises CheckpointMismatchError.
"""
from __future__ import annotations

import dataclasses
import io
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig

from .._io import atomic_write_bytes
from ..model import IntCoOp

__all__ = ["FORMAT", "CheckpointMismatchError", "save_checkpoint", "read_checkpoint", "check_compatible",
           "load_prompt_state", "load_trained", "rng_state", "set_rng_state", "clip_record", "check_clip"]

FORMAT = "intcoop-checkpoint-v1"
# ModelConfig fields that change what the learned parameters mean (ctx_init and seed only set initial values).
STRUCTURAL = ("n_ctx", "conditioning", "heads", "attr_tokens", "attr_hidden", "suffix", "text_depth", "visual_prompts")


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model it is loaded into; the message names the field or parameter."""


# ------------------------------------------------------------------------------------------------ RNG states
def rng_state(loader_generator: torch.Generator | None = None) -> dict:
    """Every RNG state a training run depends on, as tensors and plain types (weights_only-loadable)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": [version, list(internal), py_gauss],
    }
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def set_rng_state(state: dict, loader_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"])


# --------------------------------------------------------------------------------------------- files
def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write `payload` (see the module docstring) atomically to `path`."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint written by `save_checkpoint`, loaded with weights_only=True; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:                      # torch's own text advises weights_only=False: never for this file
        from ..clip_files import load_error
        raise CheckpointMismatchError(f"{path} is not a readable intcoop checkpoint ({load_error(exc)}); it may be "
                                      f"truncated or not a checkpoint: rerun the training or use another "
                                      f"file") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointMismatchError(f"{path} is not an {FORMAT} checkpoint (format: {found!r})")
    return ckpt


# ------------------------------------------------------------------------------------------ compatibility
def _named(name) -> bool:
    return bool(name) and name != "custom"


def _base(name: str) -> str:
    """The architecture of an open_clip name ("ViT-B-16-quickgelu" and "ViT-B-16" are one)."""
    return name[:-len("-quickgelu")] if name.endswith("-quickgelu") else name


def check_compatible(saved: dict, model: IntCoOp, state: dict | None = None, where: str = "checkpoint",
                     names: bool = True) -> None:
    """Raise CheckpointMismatchError when a checkpoint's model config / prompt state does not fit `model`.
    names=False skips the clip name / pretrained comparison (`check_clip` then verifies the CLIP itself)."""
    have = dataclasses.asdict(model.config)
    if names and _named(saved.get("clip")) and _named(have["clip"]):
        for f in ("clip", "pretrained"):
            if (_base(saved.get(f) or "") != _base(have[f] or "")) if f == "clip" else saved.get(f) != have[f]:
                raise CheckpointMismatchError(f"{where} was trained on model.{f}={saved.get(f)!r}; this model has "
                                              f"{f}={have[f]!r}")
    slot_saved, slot_have = saved.get("attributes") != "off", have["attributes"] != "off"
    if slot_saved != slot_have:
        raise CheckpointMismatchError(
            f"{where} was trained with model.attributes={saved.get('attributes')!r}; this model has "
            f"attributes={have['attributes']!r} (the attribute slot is {'' if slot_saved else 'not '}part of the "
            f"trained prompt)")
    for f in STRUCTURAL:
        if f == "attr_tokens" and not slot_have:
            continue
        if f in saved and saved[f] != have[f]:
            raise CheckpointMismatchError(f"{where} was trained with model.{f}={saved[f]!r}; this model has "
                                          f"{f}={have[f]!r}")
    if state is None:
        return
    own = model.prompt.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointMismatchError(f"{where}: prompt parameters differ: missing {missing}, unexpected "
                                      f"{unexpected}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointMismatchError(f"{where}: parameter prompt.{k} has shape {tuple(state[k].shape)}, this "
                                          f"model's is {tuple(v.shape)} (a different CLIP width?)")


def _architecture(clip) -> dict:
    v, t = clip.visual, clip.transformer
    size = getattr(v, "image_size", None)
    patch = getattr(v, "patch_size", None)
    return {"embed_dim": int(clip.text_projection.shape[-1]), "text_width": int(clip.token_embedding.weight.shape[1]),
            "text_layers": len(t.resblocks), "vision": type(v).__name__,
            "vision_width": int(getattr(getattr(v, "conv1", None), "out_channels", 0) or 0),
            "vision_layers": len(getattr(getattr(v, "transformer", None), "resblocks", ()) or ()),
            "patch_size": list(patch) if isinstance(patch, (tuple, list)) else patch,
            "image_size": list(size) if isinstance(size, (tuple, list)) else size}


def clip_record(model: IntCoOp) -> dict:
    """What the checkpoint needs to rebuild or verify `model`'s frozen CLIP (plain types; see the module doc)."""
    from ..clip import activation_of, fingerprint
    c = model.config
    pre = c.pretrained
    source = ("instance" if not _named(c.clip) else "random" if pre is None else
              "file" if os.path.isfile(str(pre)) else "tag")
    return {"name": c.clip, "pretrained": pre, "source": source, "activation": activation_of(model.clip),
            "architecture": _architecture(model.clip), "dtype": str(model.dtype).replace("torch.", ""),
            "fingerprint": fingerprint(model.clip)}


def check_clip(saved: dict | None, model: IntCoOp, where: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError listing every way `model`'s CLIP differs from the recorded one (`clip_record`);
    a checkpoint without a record (older files) is loaded with a warning that it cannot be verified."""
    if not saved:
        warnings.warn(f"{where} records no CLIP fingerprint (written by an older intcoop): the CLIP it is loaded "
                      f"into cannot be verified")
        return
    have = clip_record(model)
    diffs = []
    for k in ("architecture", "activation", "dtype"):
        if saved.get(k) is not None and saved[k] != have[k]:
            if k == "architecture":
                parts = [f"{f} {saved[k].get(f)!r} -> {have[k].get(f)!r}" for f in have[k]
                         if saved[k].get(f) != have[k][f]]
                diffs.append("architecture (" + ", ".join(parts) + ")")
            else:
                diffs.append(f"{k} {saved[k]} -> {have[k]}")
    if saved.get("fingerprint") != have["fingerprint"]:
        diffs.append(f"weights (fingerprint {str(saved.get('fingerprint'))[:12]} -> {have['fingerprint'][:12]})")
    if diffs:
        def who(r):
            return f"{r['name']} (pretrained={r['pretrained']!r}, {r['source']})"
        raise CheckpointMismatchError(
            f"{where} was trained on another CLIP: it had {who(saved)}, this model has {who(have)}; differs in "
            + "; ".join(diffs) + ". Its logits would not be reproduced: load it into the CLIP it was trained on")


def load_prompt_state(model: IntCoOp, ckpt: dict, where: str = "checkpoint") -> None:
    """Check (config, prompt shapes, the CLIP itself), then copy the learned parameters into `model.prompt`."""
    check_compatible(ckpt["config"]["model"], model, ckpt["prompt"], where, names=not ckpt.get("clip"))
    check_clip(ckpt.get("clip"), model, where)
    model.prompt.load_state_dict(ckpt["prompt"])


_UNSET = object()


def load_trained(checkpoint_path: str | os.PathLike, clip=None, *, pretrained=_UNSET, device=None) -> IntCoOp:
    """An IntCoOp (eval mode) with the checkpoint's learned parameters, on the CLIP it was trained on.

    clip: None rebuilds the CLIP from the checkpoint (its clip name and pretrained tag or file; random weights
    from model.seed); a model name (with `pretrained`: a tag or file, default the checkpoint's); or an open_clip
    model / `clip.Clip` to use. Every way is verified against the checkpoint's CLIP record (architecture,
    activation, weights fingerprint): the result reproduces the saved logits, or CheckpointMismatchError says
    what differs.
    """
    ckpt = read_checkpoint(checkpoint_path)
    where = str(checkpoint_path)
    saved = dict(ckpt["config"]["model"])
    rec = ckpt.get("clip") or {}
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    rest = {k: v for k, v in saved.items() if k in fields and k not in ("clip", "pretrained")}
    if clip is None or isinstance(clip, str):
        name = saved.get("clip") if clip is None else clip
        if not _named(name):
            raise CheckpointMismatchError(f"{where} was trained on a CLIP model instance (clip={name!r}); pass the "
                                          f"same model as clip=")
        if _named(saved.get("clip")) and _base(name) != _base(saved["clip"]):
            raise CheckpointMismatchError(f"{where} was trained on model.clip={saved['clip']!r}; clip={name!r} is "
                                          f"another architecture")
        pre = saved.get("pretrained") if pretrained is _UNSET else pretrained
        if pre is None and saved.get("pretrained") is None and not rec:
            warnings.warn(f"{where} was trained on {name} with random weights (pretrained=None): they are rebuilt "
                          f"from model.seed={saved.get('seed')}, as a run that built its model from the config did "
                          f"(intcoop train, sweeps); if the run was given another instance, pass it as clip=")
        from .inputs import build_model
        model = build_model(ModelConfig(**{**rest, "clip": name, "pretrained": pre}))
    else:
        if pretrained is not _UNSET:
            raise TypeError("pretrained= goes with a model name (clip='ViT-B-16'), not with a model instance")
        model = IntCoOp.from_clip(clip, **rest)
    load_prompt_state(model, ckpt, where)
    if device is not None:
        model = model.to(device)
    return model.eval()
