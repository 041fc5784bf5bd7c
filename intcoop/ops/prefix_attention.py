"""Prefix-shared varlen causal attention: the reference, the PyTorch backend, the custom op and its autograd.

This is the attention inside the batched per-instance text encoder (FAST_PATH.md tricks 2-5). Every image b
has P prefix tokens (SOS, context vectors, attribute tokens) whose keys/values every suffix token of that
image sees; the suffixes of its S prompts are packed at their true lengths, and attention inside a suffix is
causal.

Shapes (B images, P prefix rows, S segments = prompts per image, Tq / Tk packed rows per image, H heads,
Dh head dim):
    q       [B, Tq, H, Dh]  packed suffix queries; segment s holds rows cu_q[s]:cu_q[s+1]
    k, v    [B, Tk, H, Dh]  packed suffix keys/values; segment s holds rows cu_k[s]:cu_k[s+1]
    pk, pv  [B, P, H, Dh]   the image's prefix keys/values (P >= 1)
    cu_q, cu_k [S+1] int32  segment offsets, the same for every image, on q's device; len_q(s) <= len_k(s);
                       cu[0] = 0, non-decreasing, cu_q[S] = Tq, cu_k[S] = Tk (checked: `segments.check_offsets`)
    out     [B, Tq, H, Dh]
    lse     [B, H, Tq] float32 (float64 for float64 inputs): natural log-sum-exp of the scaled scores of each query row
A query at position i (0-based) of segment s sees every prefix key and the suffix keys j of its own segment
with j <= i + len_k(s) - len_q(s): causal, bottom-right aligned as in flash-attn's varlen API. With
cu_q == cu_k this is plain causal attention; with len_q(s) = 1 it is the last row of the segment (EOT).
"""
from __future__ import annotations

import torch

from . import dispatch
from .dispatch import lse_dtype
from .segments import HostSegments, check_offsets, check_values_on_device

__all__ = ["prefix_attention", "reference", "TorchPrefixAttention", "HostSegments"]


def reference(q, k, v, pk, pv, cu_q, cu_k, scale: float):
    """The plain, obviously correct computation: a loop over images and segments. Differentiable.

    Tests and benches compare every backend with this one (in float64). Returns out [B, Tq, H, Dh].
    """
    cq, ck = cu_q.tolist(), cu_k.tolist()
    out = torch.zeros_like(q)
    rows = []
    for b in range(q.shape[0]):
        segs = []
        for s in range(len(cq) - 1):
            qs = q[b, cq[s]:cq[s + 1]]                               # [lq, H, Dh]
            ks = torch.cat([pk[b], k[b, ck[s]:ck[s + 1]]], 0)        # [P + lk, H, Dh]
            vs = torch.cat([pv[b], v[b, ck[s]:ck[s + 1]]], 0)
            lq, lk, p = qs.shape[0], ck[s + 1] - ck[s], pk.shape[1]
            scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale     # [H, lq, P + lk]
            i = torch.arange(lq, device=q.device)[:, None]
            j = torch.arange(lk, device=q.device)[None, :]
            allowed = torch.cat([torch.ones(lq, p, dtype=torch.bool, device=q.device), j <= i + (lk - lq)], 1)
            scores = scores.masked_fill(~allowed, float("-inf"))
            segs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
        rows.append(torch.cat(segs, 0) if segs else out[b])
    return torch.stack(rows, 0)


def padded_index(cu: torch.Tensor, width: int):
    """Row index [S, width] of each segment's positions in the packed layout, and its validity mask."""
    lens = cu[1:] - cu[:-1]
    pos = torch.arange(width, device=cu.device)
    valid = pos[None, :] < lens[:, None]
    idx = torch.where(valid, cu[:-1, None].long() + pos[None, :], 0)
    return idx, valid, lens


def _padded_probs(q, k, pk, cu_q, cu_k, max_q, max_k, scale):
    """Scores in a padded layout: each segment padded to max_q queries and max_k suffix keys.

    Returns (iq, vq, ik, vk, s) with s [B, H, S, max_q, P + max_k] float32 or wider, masked with -inf.
    """
    iq, vq, lq = padded_index(cu_q, max_q)
    ik, vk, lk = padded_index(cu_k, max_k)
    acc = torch.promote_types(q.dtype, torch.float32)
    qp = q[:, iq].to(acc)                                            # [B, S, mq, H, Dh]
    kp = k[:, ik].to(acc)                                            # [B, S, mk, H, Dh]
    s_pre = torch.einsum("bsqhd,bphd->bhsqp", qp, pk.to(acc))
    s_suf = torch.einsum("bsqhd,bskhd->bhsqk", qp, kp)
    i = torch.arange(max_q, device=q.device)[None, :, None]
    j = torch.arange(max_k, device=q.device)[None, None, :]
    allowed = vk[:, None, :] & (j <= i + (lk - lq)[:, None, None])   # [S, mq, mk]
    s_suf = s_suf.masked_fill(~allowed, float("-inf"))
    return iq, vq, ik, vk, torch.cat([s_pre, s_suf], -1) * scale


class TorchPrefixAttention:
    """The PyTorch backend: segments padded to the longest one, dense einsums. Any device and dtype.

    Attention is a small part of the encoder's cost (the GEMMs dominate), so the padding waste is cheap; the
    packed layout is kept for everything else.
    """

    name = "torch"

    @staticmethod
    def fwd(q, k, v, pk, pv, cu_q, cu_k, max_q: int, max_k: int, scale: float):
        P = pk.shape[1]
        iq, vq, ik, _, s = _padded_probs(q, k, pk, cu_q, cu_k, max_q, max_k, scale)
        lse = torch.logsumexp(s, -1)                                 # [B, H, S, mq]
        p = torch.exp(s - lse[..., None])
        vp = v[:, ik].to(p.dtype)                                    # [B, S, mk, H, Dh]
        o = torch.einsum("bhsqp,bphd->bsqhd", p[..., :P], pv.to(p.dtype))
        o = o + torch.einsum("bhsqk,bskhd->bsqhd", p[..., P:], vp)
        out = o[:, vq].to(q.dtype)                                   # [B, Tq, H, Dh]
        return out, lse.permute(0, 2, 3, 1)[:, vq].permute(0, 2, 1).to(lse_dtype(q.dtype)).contiguous()

    @staticmethod
    def bwd(dout, q, k, v, pk, pv, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float):
        B, P, Tk = q.shape[0], pk.shape[1], k.shape[1]
        iq, vq, ik, vk, s = _padded_probs(q, k, pk, cu_q, cu_k, max_q, max_k, scale)
        acc = s.dtype
        # lse [B, H, Tq] -> padded [B, H, S, mq]; padded query rows get +inf so their probabilities are 0.
        lse_p = torch.full(s.shape[:-1], float("inf"), dtype=acc, device=q.device)
        lse_p.permute(0, 2, 3, 1)[:, vq] = lse.to(acc).permute(0, 2, 1)
        p = torch.exp(s - lse_p[..., None])                          # [B, H, S, mq, P + mk]
        zero_q = torch.zeros(1, dtype=acc, device=q.device)

        def pad_q(t):                                                # [B, Tq, H, Dh] -> [B, S, mq, H, Dh]
            return torch.where(vq[None, :, :, None, None], t.to(acc)[:, iq], zero_q)

        do_p, o_p, q_p = pad_q(dout), pad_q(out), pad_q(q)
        kp, vp = k[:, ik].to(acc), v[:, ik].to(acc)
        pk_, pv_ = pk.to(acc), pv.to(acc)
        dp_pre = torch.einsum("bsqhd,bphd->bhsqp", do_p, pv_)
        dp_suf = torch.einsum("bsqhd,bskhd->bhsqk", do_p, vp)
        delta = torch.einsum("bsqhd,bsqhd->bhsq", do_p, o_p)[..., None]
        ds = p * (torch.cat([dp_pre, dp_suf], -1) - delta) * scale   # [B, H, S, mq, P + mk]
        dq_p = torch.einsum("bhsqp,bphd->bsqhd", ds[..., :P], pk_) + torch.einsum("bhsqk,bskhd->bsqhd", ds[..., P:], kp)
        dpk = torch.einsum("bhsqp,bsqhd->bphd", ds[..., :P], q_p)
        dpv = torch.einsum("bhsqp,bsqhd->bphd", p[..., :P], do_p)
        dk_p = torch.einsum("bhsqk,bsqhd->bskhd", ds[..., P:], q_p)
        dv_p = torch.einsum("bhsqk,bsqhd->bskhd", p[..., P:], do_p)
        dq = dq_p[:, vq]
        dk = torch.zeros((B, Tk) + k.shape[2:], dtype=acc, device=q.device)
        dv = torch.zeros_like(dk)
        dk[:, ik[vk]] = dk_p[:, vk]
        dv[:, ik[vk]] = dv_p[:, vk]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpk.to(pk.dtype), dpv.to(pv.dtype)


dispatch.register_op("prefix_attention", TorchPrefixAttention, inputs=("q", "k", "v", "pk", "pv"))


@torch.library.custom_op("intcoop::prefix_attention_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
         cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int, scale: float, validate: bool = True
         ) -> tuple[torch.Tensor, torch.Tensor]:
    # validate: read cu_q / cu_k from the device and check them. The wrapper passes False once it has checked
    # them (host copies, or eagerly); a compiled graph without host copies, or a direct call, checks here.
    if validate:
        check_values_on_device(q, k, cu_q, cu_k, max_q, max_k)
    impl = dispatch.choose("prefix_attention", q, k, v, pk, pv, head_dim=q.shape[-1])
    return impl.fwd(q, k, v, pk, pv, cu_q, cu_k, max_q, max_k, scale)


@_fwd.register_fake
def _fwd_fake(q, k, v, pk, pv, cu_q, cu_k, max_q, max_k, scale, validate=True):
    B, Tq, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Tq), dtype=lse_dtype(q.dtype))


@torch.library.custom_op("intcoop::prefix_attention_bwd", mutates_args=())
def _bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor,
         pv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
         max_q: int, max_k: int, scale: float
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = dispatch.choose("prefix_attention", q, k, v, pk, pv, head_dim=q.shape[-1])
    return impl.bwd(dout, q, k, v, pk, pv, out, lse, cu_q, cu_k, max_q, max_k, scale)


@_bwd.register_fake
def _bwd_fake(dout, q, k, v, pk, pv, out, lse, cu_q, cu_k, max_q, max_k, scale):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, pk, pv))   # contiguous, as every backend returns


def _setup_context(ctx, inputs, output):
    q, k, v, pk, pv, cu_q, cu_k, max_q, max_k, scale, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, pk, pv, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale)


def _backward(ctx, dout, dlse):
    q, k, v, pk, pv, out, lse, cu_q, cu_k = ctx.saved_tensors
    grads = _bwd(dout.contiguous(), q, k, v, pk, pv, out, lse, cu_q, cu_k, *ctx.args)
    return (*grads, None, None, None, None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_shapes(q, k, v, pk, pv) -> None:
    if q.dim() != 4 or k.dim() != 4 or pk.dim() != 4 or v.shape != k.shape or pv.shape != pk.shape:
        raise ValueError(f"prefix_attention wants q [B, Tq, H, Dh], k and v [B, Tk, H, Dh], pk and pv [B, P, H, Dh]; "
                         f"got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}, pk {list(pk.shape)}, "
                         f"pv {list(pv.shape)}")
    if k.shape[0] != q.shape[0] or pk.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:] \
            or pk.shape[2:] != q.shape[2:]:
        raise ValueError(f"prefix_attention: q {list(q.shape)}, k {list(k.shape)} and pk {list(pk.shape)} must agree "
                         f"in B (dim 0), H and Dh (dims 2, 3)")
    if pk.shape[1] < 1:
        raise ValueError("prefix_attention needs at least one prefix token (SOS), got P = 0")


def prefix_attention(q, k, v, pk, pv, cu_q, cu_k, max_q: int, max_k: int, scale: float, *,
                     host_q=None, host_k=None) -> torch.Tensor:
    """Prefix-shared causal attention over packed suffixes (see the module docstring). Returns out [B, Tq, H, Dh].

    host_q, host_k: what the host knows of cu_q / cu_k (`HostSegments`, or sequences of segment lengths); with
    both, the offsets are checked without reading them from the device. Without, they are copied to the host
    and checked (a sync). A malformed offset, shape or max_q / max_k raises ValueError before any work.
    Differentiable in q, k, v, pk and pv; torch.compile sees one opaque op (no graph break).
    """
    _check_shapes(q, k, v, pk, pv)
    max_q, max_k = _size(max_q), _size(max_k)
    checked = check_offsets(q, k, cu_q, cu_k, max_q, max_k, host_q, host_k)
    return _fwd(q, k, v, pk, pv, cu_q, cu_k, max_q, max_k, float(scale), not checked)[0]


def _size(n):
    """int(n), except a symbolic size under torch.compile stays symbolic (int() would specialise the graph to
    one class list's longest suffix: a recompile for every new list)."""
    return n if isinstance(n, torch.SymInt) else int(n)
