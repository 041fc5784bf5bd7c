"""Attention pooling of raw patch tokens: the core of the cross-attention prompt generator (FAST_PATH.md trick 6).

The M context vectors are queries shared by every image. With W_k folded into each head's query
(q~ = q_h W_k,h^T, a vector in the patch-token width) and W_v applied after pooling, the image-dependent part of
the cross-attention is one pass over the raw patch tokens:

    pooled[b, r] = softmax_l(scale * qt[r] . z[b, l]) @ z[b]          r = j * H + h  (context j, head h)

Shapes (R = M*H query rows, B images, L patch tokens, W patch width):
    qt      [R, W]        folded queries (shared by all images)
    z       [B, L, W]     patch tokens
    pooled  [B, R, W]
    lse     [B, R] float32 (float64 for float64 inputs): natural log-sum-exp of the scaled scores
Backward: dqt [R, W] (summed over images) and, when asked, dz [B, L, W].
"""
from __future__ import annotations

import torch

from . import dispatch
from .dispatch import lse_dtype

__all__ = ["patch_pool", "reference", "TorchPatchPool"]


def reference(qt, z, scale: float):
    """Plain differentiable torch: pooled [B, R, W]. Tests and benches compare every backend with it."""
    p = (torch.einsum("rw,blw->brl", qt, z) * scale).softmax(-1)
    return torch.einsum("brl,blw->brw", p, z)


class TorchPatchPool:
    """The PyTorch backend: two batched GEMMs and a softmax, accumulated in at least float32."""

    name = "torch"

    @staticmethod
    def fwd(qt, z, scale: float):
        acc = torch.promote_types(z.dtype, torch.float32)
        s = torch.einsum("rw,blw->brl", qt.to(acc), z.to(acc)) * scale
        lse = torch.logsumexp(s, -1)
        pooled = torch.einsum("brl,blw->brw", torch.exp(s - lse[..., None]), z.to(acc))
        return pooled.to(z.dtype), lse.to(lse_dtype(z.dtype))

    @staticmethod
    def bwd(dpooled, qt, z, pooled, lse, scale: float, need_dz: bool):
        acc = torch.promote_types(z.dtype, torch.float32)
        qt_, z_, dp_ = qt.to(acc), z.to(acc), dpooled.to(acc)
        p = torch.exp(torch.einsum("rw,blw->brl", qt_, z_) * scale - lse.to(acc)[..., None])   # [B, R, L]
        dprob = torch.einsum("brw,blw->brl", dp_, z_)
        delta = (dp_ * pooled.to(acc)).sum(-1, keepdim=True)
        ds = p * (dprob - delta) * scale
        dqt = torch.einsum("brl,blw->rw", ds, z_).to(qt.dtype)
        if not need_dz:
            return dqt, z.new_empty(0)
        dz = torch.einsum("brl,brw->blw", p, dp_) + torch.einsum("brl,rw->blw", ds, qt_)
        return dqt, dz.to(z.dtype)


dispatch.register_op("patch_pool", TorchPatchPool, inputs=("qt", "z"))


@torch.library.custom_op("intcoop::patch_pool_fwd", mutates_args=())
def _fwd(qt: torch.Tensor, z: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch.choose("patch_pool", qt, z).fwd(qt, z, scale)


@_fwd.register_fake
def _fwd_fake(qt, z, scale):
    B, R = z.shape[0], qt.shape[0]
    return z.new_empty((B, R, z.shape[2])), z.new_empty((B, R), dtype=lse_dtype(z.dtype))


@torch.library.custom_op("intcoop::patch_pool_bwd", mutates_args=())
def _bwd(dpooled: torch.Tensor, qt: torch.Tensor, z: torch.Tensor, pooled: torch.Tensor, lse: torch.Tensor,
         scale: float, need_dz: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch.choose("patch_pool", qt, z).bwd(dpooled, qt, z, pooled, lse, scale, need_dz)


@_bwd.register_fake
def _bwd_fake(dpooled, qt, z, pooled, lse, scale, need_dz):
    return qt.new_empty(qt.shape), (z.new_empty(z.shape) if need_dz else z.new_empty(0))


def _setup_context(ctx, inputs, output):
    qt, z, scale = inputs
    pooled, lse = output
    ctx.save_for_backward(qt, z, pooled, lse)
    ctx.scale = scale
    ctx.need_dz = ctx.needs_input_grad[1]


def _backward(ctx, dpooled, dlse):
    qt, z, pooled, lse = ctx.saved_tensors
    dqt, dz = _bwd(dpooled.contiguous(), qt, z, pooled, lse, ctx.scale, ctx.need_dz)
    return dqt, (dz if ctx.need_dz else None), None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def patch_pool(qt: torch.Tensor, z: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention pooling of patch tokens z [B, L, W] by folded queries qt [R, W]: pooled [B, R, W].

    Differentiable in qt and (when z requires grad) in z; one opaque op for torch.compile.
    """
    if qt.dim() != 2 or z.dim() != 3 or qt.shape[1] != z.shape[2]:
        raise ValueError(f"patch_pool wants qt [R, W] and z [B, L, W]; got {tuple(qt.shape)} and {tuple(z.shape)}")
    return _fwd(qt, z, float(scale))[0]
