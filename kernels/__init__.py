"""Triton kernels of intcoop, installed as `intcoop.kernels` (never as a top-level `kernels`).

OPS maps each op name of `intcoop.ops.dispatch` to an object with `fwd` and `bwd`, the same positional
signatures as the op's torch backend. Importing this package does not import triton: each entry imports its
kernel module (`prefix_attention.py`, `patch_pool.py`, which import triton) on first call. That also keeps it
harmless when transformers, probing for the Hub's top-level `kernels` package, imports this folder from the repo
root: nothing runs, there is no version, and transformers reports its `kernels` as unavailable.
"""
from __future__ import annotations

import importlib

__all__ = ["OPS"]


class _LazyOp:
    """fwd / bwd of `intcoop.kernels.<module>.<cls>`, imported on first use."""

    def __init__(self, module: str, cls: str):
        self.name = "triton"
        self._module, self._cls, self._impl = module, cls, None

    def _get(self):
        if self._impl is None:
            self._impl = getattr(importlib.import_module(f"{__name__}.{self._module}"), self._cls)
        return self._impl

    def fwd(self, *args):
        return self._get().fwd(*args)

    def bwd(self, *args):
        return self._get().bwd(*args)

    def __repr__(self):
        return f"<triton {self._module}: {__name__}.{self._module}.{self._cls}>"


OPS = {
    "prefix_attention": _LazyOp("prefix_attention", "TritonPrefixAttention"),
    "patch_pool": _LazyOp("patch_pool", "TritonPatchPool"),
}
