"""Loading of the compiled core `intcoop._C` (C++ CPU and CUDA twins of the ops, built from `csrc/`).

The extension is optional: the package imports and its PyTorch paths work without it, and the error for a
missing build says what to run. The library registers its kernels as `torch.ops.intcoop_C.<op>_{fwd,bwd}`
for the CPU and/or CUDA dispatch keys; the backends in `dispatch` wrap them.
"""
from __future__ import annotations

import functools

import torch

BUILD_HINT = "build it with: pip install --no-build-isolation -e .  (INTCOOP_SKIP_CUDA=1 skips the CUDA part)"
OP_NAMES = ("prefix_attention", "patch_pool")


@functools.lru_cache(None)
def load_error() -> str | None:
    """None when `intcoop._C` is importable, else the reason and how to build it."""
    try:
        from intcoop import _C  # noqa: F401  (importing registers the torch.ops.intcoop_C ops)
    except ImportError as exc:
        return f"compiled extension intcoop._C not built ({exc}); {BUILD_HINT}"
    return None


def has_kernel(op: str, device: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"intcoop_C::{op}", key)
    except RuntimeError:
        return False


def missing_kernels(device: str) -> str | None:
    """None when at least one op has a `device` kernel in the built library, else why not."""
    if any(has_kernel(f"{op}_fwd", device) for op in OP_NAMES):
        return None
    if device == "cuda":
        return "intcoop._C was built without CUDA (no nvcc or INTCOOP_SKIP_CUDA=1 at build time)"
    return f"intcoop._C has no {device} kernels"


class _Compiled:
    """fwd/bwd of one op, forwarding to torch.ops.intcoop_C (which dispatches on the tensors' device)."""

    def __init__(self, op: str):
        self.name = op
        self._fwd = getattr(torch.ops.intcoop_C, f"{op}_fwd")
        self._bwd = getattr(torch.ops.intcoop_C, f"{op}_bwd")

    def fwd(self, *args):
        return tuple(self._fwd(*args))

    def bwd(self, *args):
        return tuple(self._bwd(*args))


def ops(device: str) -> dict:
    """The compiled ops that have a kernel for `device`."""
    return {op: _Compiled(op) for op in OP_NAMES if has_kernel(f"{op}_fwd", device)}
