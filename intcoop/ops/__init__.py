"""The package's ops: each a registered custom op with a fake implementation, an autograd formula, a
differentiable PyTorch reference (run in float64 by tests) and backends chosen by `dispatch`.

Modules: `prefix_attention` (text encoder attention), `patch_pool` (cross-attention prompt generation),
`segments` (the checks of prefix_attention's segment offsets), `dispatch` (the backends and their choice).
"""
from . import dispatch, patch_pool, prefix_attention, segments

__all__ = ["dispatch", "patch_pool", "prefix_attention", "segments"]
