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
    versions    torch and intcoop versions
Files are written atomically (`torch.save` into memory, then `config.atomic_write_bytes`).

`check_compatible(saved_model_config, model, state)` raises CheckpointMismatchError naming the first field that
differs (clip, pretrained, n_ctx, conditioning, heads, attribute slot, attr_tokens, attr_hidden, suffix) or the
first parameter whose name or shape differs. `load_trained(path, clip=None)` rebuilds the IntCoOp.
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

from .config import ModelConfig, atomic_write_bytes
from .model import IntCoOp

__all__ = ["FORMAT", "CheckpointMismatchError", "save_checkpoint", "read_checkpoint", "check_compatible",
           "load_prompt_state", "load_trained", "rng_state", "set_rng_state"]

FORMAT = "intcoop-checkpoint-v1"
# ModelConfig fields that change what the learned parameters mean (ctx_init and seed only set initial values).
STRUCTURAL = ("n_ctx", "conditioning", "heads", "attr_tokens", "attr_hidden", "suffix")


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
    except Exception as exc:
        raise CheckpointMismatchError(f"{path} is not a readable intcoop checkpoint "
                                      f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointMismatchError(f"{path} is not an {FORMAT} checkpoint (format: {found!r})")
    return ckpt


# ------------------------------------------------------------------------------------------ compatibility
def _named(name) -> bool:
    return bool(name) and name != "custom"


def check_compatible(saved: dict, model: IntCoOp, state: dict | None = None, where: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError when a checkpoint's model config / prompt state does not fit `model`."""
    have = dataclasses.asdict(model.config)
    if _named(saved.get("clip")) and _named(have["clip"]):
        for f in ("clip", "pretrained"):
            if saved.get(f) != have[f]:
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


def load_prompt_state(model: IntCoOp, ckpt: dict, where: str = "checkpoint") -> None:
    """Check, then copy the checkpoint's learned parameters into `model.prompt`."""
    check_compatible(ckpt["config"]["model"], model, ckpt["prompt"], where)
    model.prompt.load_state_dict(ckpt["prompt"])


def load_trained(checkpoint_path: str | os.PathLike, clip=None, *, device=None) -> IntCoOp:
    """An IntCoOp (eval mode) with the checkpoint's learned parameters.

    clip: None builds the CLIP from the saved config's clip name and pretrained tag; or an open_clip model /
    `backbone.Clip` / name to use instead (checked against the checkpoint: names, structure, shapes).
    """
    ckpt = read_checkpoint(checkpoint_path)
    saved = dict(ckpt["config"]["model"])
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    rest = {k: v for k, v in saved.items() if k in fields and k not in ("clip", "pretrained")}
    if clip is None:
        if not _named(saved.get("clip")):
            raise CheckpointMismatchError(f"{checkpoint_path} was trained on a CLIP model instance (clip="
                                          f"{saved.get('clip')!r}); pass the same model as clip=")
        if saved.get("pretrained") is None:
            warnings.warn(f"{checkpoint_path} was trained on {saved['clip']} with random weights (pretrained=None): "
                          f"they are rebuilt from model.seed={saved.get('seed')}, as a run that built its model from "
                          f"the config did (intcoop train, sweeps); if the run was given another instance, pass "
                          f"it as clip=")
        from .train_parts import build_model
        model = build_model(ModelConfig(**{k: v for k, v in saved.items() if k in fields}))
    else:
        model = IntCoOp.from_clip(clip, **rest)
    load_prompt_state(model, ckpt, str(checkpoint_path))
    if device is not None:
        model = model.to(device)
    return model.eval()
