"""Triton kernels of prefix-shared varlen causal attention: the `triton` backend of intcoop.ops.prefix_attention.

Owns the forward kernel, the two backward kernels and their launchers (validate, allocate, launch); autograd
lives in intcoop/ops/prefix_attention.py, whose docstring gives the semantics and the shapes.

Tiling. The suffix rows of one image are packed, so a tile of BLOCK_M consecutive query rows spans several
prompts. A program takes (head h, row tile, image b), loads the image's P prefix keys/values once for all the
prompts in its tile and runs one online softmax over [prefix keys | the packed suffix keys its rows can see].
The block-diagonal causal mask comes from each row's segment s (SEG_Q, from torch.searchsorted): packed row i
sees suffix keys j with cu_k[s] <= j <= i + cu_k[s+1] - cu_q[s+1] (bottom-right aligned). Dense tensor-core
tiles over many short prompts instead of one tiny tile per prompt.

Backward. (1) `_bwd_dq_kernel`, row-tile-major like the forward: writes delta = rowsum(dout * out) and dq, and sums
the prefix gradients dpk, dpv over the tiles of its chunk in registers; one fp32 partial per chunk is summed in
torch (deterministic, no atomics; one chunk per (image, head) when there are enough programs).
(2) `_bwd_dkdv_kernel`, key-tile-major: key j of segment s is seen by rows max(cu_q[s], j - cu_k[s+1] + cu_q[s+1])
<= i < cu_q[s+1].
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._common import LOG2E, f32_dots, last_contiguous, mm, on_input_device

__all__ = ["TritonPrefixAttention", "fwd", "bwd"]

@triton.jit
def _row_ranges(SEG_Q, CU_Q, CU_K, rows, row_ok, Tk):
    """Suffix keys visible to each packed query row: lo <= j <= hi (absolute packed key indices), clamped to
    0 <= j < Tk so that even malformed offsets (the op wrapper rejects them) never index outside k / v."""
    seg = tl.load(SEG_Q + rows, mask=row_ok, other=0)
    cq1 = tl.load(CU_Q + seg + 1, mask=row_ok, other=0)
    ck0 = tl.load(CU_K + seg, mask=row_ok, other=0)
    ck1 = tl.load(CU_K + seg + 1, mask=row_ok, other=0)
    return tl.maximum(ck0, 0), tl.minimum(rows + ck1 - cq1, Tk - 1)


@triton.jit
def _fwd_kernel(
    Q,                      # [B, Tq, H, Dh] strides (sqb, sqt, sqh, 1)
    K, V,                   # [B, Tk, H, Dh] strides (skb, skt, skh, 1), (svb, svt, svh, 1)
    PK, PV,                 # [B, P, H, Dh] strides (spkb, spkp, spkh, 1), (spvb, spvp, spvh, 1)
    OUT,                    # [B, Tq, H, Dh] contiguous, q's dtype
    LSE,                    # [B, H, Tq] float32 contiguous (natural log)
    CU_Q, CU_K,             # [S + 1] int32
    SEG_Q,                  # [Tq] int32, segment of each packed query row
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, spkb, spkp, spkh, spvb, spvp, spvh,
    Tq, Tk, P, H, Dh,       # ints
    qk_scale,               # float: scale * log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    F32: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    d = tl.arange(0, BLOCK_D)
    d_ok = d < Dh
    pr = tl.arange(0, BLOCK_P)
    p_ok = pr < P
    lo, hi = _row_ranges(SEG_Q, CU_Q, CU_K, rows, row_ok, Tk)

    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    pmask = p_ok[:, None] & d_ok[None, :]
    pk = tl.load(PK + b * spkb + h * spkh + pr[:, None] * spkp + d[None, :], mask=pmask, other=0.0)
    pv = tl.load(PV + b * spvb + h * spvh + pr[:, None] * spvp + d[None, :], mask=pmask, other=0.0)

    # Prefix keys first: P >= 1, so every row's running max is finite from here on.
    s = mm(q, tl.trans(pk), tl.zeros([BLOCK_M, BLOCK_P], tl.float32), F32) * qk_scale
    s = tl.where(p_ok[None, :], s, float("-inf"))
    m = tl.max(s, 1)
    p = tl.exp2(s - m[:, None])
    l = tl.sum(p, 1)
    acc = mm(p.to(pv.dtype), pv, tl.zeros([BLOCK_M, BLOCK_D], tl.float32), F32)

    n_lo = tl.min(tl.where(row_ok, lo, Tk))
    n_hi = tl.max(tl.where(row_ok, hi, -1)) + 1
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kmask = (cols < n_hi)[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + h * skh + cols[:, None] * skt + d[None, :], mask=kmask, other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svt + d[None, :], mask=kmask, other=0.0)
        sn = mm(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), F32) * qk_scale
        ok = (cols[None, :] >= lo[:, None]) & (cols[None, :] <= hi[:, None])
        sn = tl.where(ok, sn, float("-inf"))
        m_new = tl.maximum(m, tl.max(sn, 1))
        alpha = tl.exp2(m - m_new)
        pn = tl.exp2(sn - m_new[:, None])
        l = l * alpha + tl.sum(pn, 1)
        acc = mm(pn.to(v.dtype), v, acc * alpha[:, None], F32)
        m = m_new

    out = acc / l[:, None]
    tl.store(OUT + ((b * Tq + rows[:, None]) * H + h) * Dh + d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (b * H + h) * Tq + rows, (m + tl.log2(l)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, DOUT,                # [B, Tq, H, Dh] strides (sqb, sqt, sqh, 1), (sdb, sdt, sdh, 1)
    K, V,                   # [B, Tk, H, Dh] strides (skb, skt, skh, 1), (svb, svt, svh, 1)
    PK, PV,                 # [B, P, H, Dh] strides (spkb, spkp, spkh, 1), (spvb, spvp, spvh, 1)
    OUT,                    # [B, Tq, H, Dh] strides (sob, sot, soh, 1)
    LSE,                    # [B, H, Tq] float32 contiguous
    DELTA,                  # [B, H, Tq] float32 contiguous, written here: rowsum(dout * out)
    DQ,                     # [B, Tq, H, Dh] contiguous, q's dtype
    DPK_WS, DPV_WS,         # [n_chunks, B, P, H, Dh] float32 contiguous: this chunk's prefix gradients
    CU_Q, CU_K,             # [S + 1] int32
    SEG_Q,                  # [Tq] int32
    sqb, sqt, sqh, sdb, sdt, sdh, skb, skt, skh, svb, svt, svh, spkb, spkp, spkh, spvb, spvp, spvh,
    sob, sot, soh,
    B, Tq, Tk, P, H, Dh,    # ints
    n_tiles, tiles_per_chunk,  # ints: row tiles per image; tiles handled by one program
    scale, qk_scale,        # floats: softmax scale; scale * log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    F32: tl.constexpr,
):
    h = tl.program_id(0)
    chunk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < Dh
    pr = tl.arange(0, BLOCK_P)
    p_ok = pr < P
    pmask = p_ok[:, None] & d_ok[None, :]
    pk = tl.load(PK + b * spkb + h * spkh + pr[:, None] * spkp + d[None, :], mask=pmask, other=0.0)
    pv = tl.load(PV + b * spvb + h * spvh + pr[:, None] * spvp + d[None, :], mask=pmask, other=0.0)
    dpk = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    dpv = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)

    t_end = tl.minimum((chunk + 1) * tiles_per_chunk, n_tiles)
    for t in range(chunk * tiles_per_chunk, t_end):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Tq
        lo, hi = _row_ranges(SEG_Q, CU_Q, CU_K, rows, row_ok, Tk)
        qmask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + d[None, :], mask=qmask, other=0.0)
        do = tl.load(DOUT + b * sdb + h * sdh + rows[:, None] * sdt + d[None, :], mask=qmask, other=0.0)
        o = tl.load(OUT + b * sob + h * soh + rows[:, None] * sot + d[None, :], mask=qmask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + (b * H + h) * Tq + rows, delta, mask=row_ok)
        lse2 = tl.load(LSE + (b * H + h) * Tq + rows, mask=row_ok, other=0.0) * 1.4426950408889634

        s = mm(q, tl.trans(pk), tl.zeros([BLOCK_M, BLOCK_P], tl.float32), F32) * qk_scale
        p = tl.where(row_ok[:, None] & p_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = mm(do, tl.trans(pv), tl.zeros([BLOCK_M, BLOCK_P], tl.float32), F32)
        ds = p * (dp - delta[:, None])
        dq = mm(ds.to(pk.dtype), pk, tl.zeros([BLOCK_M, BLOCK_D], tl.float32), F32)
        dpv = mm(tl.trans(p).to(do.dtype), do, dpv, F32)
        dpk = mm(tl.trans(ds).to(q.dtype), q, dpk, F32)

        n_lo = tl.min(tl.where(row_ok, lo, Tk))
        n_hi = tl.max(tl.where(row_ok, hi, -1)) + 1
        for n0 in range(n_lo, n_hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            kmask = (cols < n_hi)[:, None] & d_ok[None, :]
            k = tl.load(K + b * skb + h * skh + cols[:, None] * skt + d[None, :], mask=kmask, other=0.0)
            v = tl.load(V + b * svb + h * svh + cols[:, None] * svt + d[None, :], mask=kmask, other=0.0)
            sn = mm(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), F32) * qk_scale
            ok = row_ok[:, None] & (cols[None, :] >= lo[:, None]) & (cols[None, :] <= hi[:, None])
            pn = tl.where(ok, tl.exp2(sn - lse2[:, None]), 0.0)
            dpn = mm(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), F32)
            dsn = pn * (dpn - delta[:, None])
            dq = mm(dsn.to(k.dtype), k, dq, F32)
        tl.store(DQ + ((b * Tq + rows[:, None]) * H + h) * Dh + d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=qmask)

    ws = (((chunk * B + b) * P + pr[:, None]) * H + h) * Dh + d[None, :]
    tl.store(DPK_WS + ws, dpk * scale, mask=pmask)
    tl.store(DPV_WS + ws, dpv, mask=pmask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, DOUT,                # [B, Tq, H, Dh] strides (sqb, sqt, sqh, 1), (sdb, sdt, sdh, 1)
    K, V,                   # [B, Tk, H, Dh] strides (skb, skt, skh, 1), (svb, svt, svh, 1)
    LSE, DELTA,             # [B, H, Tq] float32 contiguous
    DK, DV,                 # [B, Tk, H, Dh] contiguous, k's / v's dtype
    CU_Q, CU_K,             # [S + 1] int32
    SEG_K,                  # [Tk] int32, segment of each packed key row
    sqb, sqt, sqh, sdb, sdt, sdh, skb, skt, skh, svb, svt, svh,
    Tq, Tk, H, Dh,          # ints
    scale, qk_scale,        # floats
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    F32: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Tk
    d = tl.arange(0, BLOCK_D)
    d_ok = d < Dh
    seg = tl.load(SEG_K + cols, mask=col_ok, other=0)
    cq0 = tl.load(CU_Q + seg, mask=col_ok, other=0)
    cq1 = tl.load(CU_Q + seg + 1, mask=col_ok, other=0)
    ck1 = tl.load(CU_K + seg + 1, mask=col_ok, other=0)
    q_lo = tl.maximum(tl.maximum(cq0, cols - ck1 + cq1), 0)   # rows q_lo <= i < q_hi see key j,
    q_hi = tl.where(col_ok, tl.minimum(cq1, Tq), 0)           # clamped to 0 <= i < Tq (see _row_ranges)

    kmask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + cols[:, None] * skt + d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svt + d[None, :], mask=kmask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    m_lo = tl.min(tl.where(col_ok, q_lo, Tq))
    m_hi = tl.max(q_hi)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m_hi
        qmask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + d[None, :], mask=qmask, other=0.0)
        do = tl.load(DOUT + b * sdb + h * sdh + rows[:, None] * sdt + d[None, :], mask=qmask, other=0.0)
        lse2 = tl.load(LSE + (b * H + h) * Tq + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + (b * H + h) * Tq + rows, mask=row_ok, other=0.0)
        st = mm(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), F32) * qk_scale
        ok = (rows[None, :] >= q_lo[:, None]) & (rows[None, :] < q_hi[:, None])
        pt = tl.where(ok, tl.exp2(st - lse2[None, :]), 0.0)
        dv = mm(pt.to(do.dtype), do, dv, F32)
        dpt = mm(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), F32)
        dst = pt * (dpt - delta[None, :])
        dk = mm(dst.to(q.dtype), q, dk, F32)

    out = ((b * Tk + cols[:, None]) * H + h) * Dh + d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kmask)


# ----------------------------------------------------------------------------------------------- launchers

def _segments(cu: torch.Tensor, n: int) -> torch.Tensor:
    """[n] int32: the segment of each packed row (empty segments are skipped); no host sync. Clamped to
    0..S-1, so that the kernels' reads of cu[seg], cu[seg + 1] stay inside cu even for malformed offsets."""
    rows = torch.arange(n, device=cu.device, dtype=torch.int32)
    return (torch.searchsorted(cu, rows, right=True, out_int32=True) - 1).clamp_(0, cu.shape[0] - 2)


def _check(q, k, v, pk, pv, cu_q, cu_k):
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or pk.shape != pv.shape or pk.dim() != 4:
        raise ValueError(f"prefix_attention wants q [B,Tq,H,Dh], k/v [B,Tk,H,Dh], pk/pv [B,P,H,Dh]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(pk.shape)}, {tuple(pv.shape)}")
    B, _, H, Dh = q.shape
    if k.shape[0] != B or pk.shape[0] != B or k.shape[2:] != (H, Dh) or pk.shape[2:] != (H, Dh):
        raise ValueError(f"prefix_attention: B, H, Dh differ between q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"pk {tuple(pk.shape)}")
    if pk.shape[1] < 1:
        raise ValueError("prefix_attention needs P >= 1 prefix tokens")
    if len({t.dtype for t in (q, k, v, pk, pv)}) != 1 or q.dtype not in (torch.float16, torch.bfloat16,
                                                                         torch.float32):
        raise TypeError(f"prefix_attention (triton) wants one dtype among fp16/bf16/fp32, got "
                        f"{[str(t.dtype) for t in (q, k, v, pk, pv)]}")
    if cu_q.shape != cu_k.shape or cu_q.dim() != 1:
        raise ValueError(f"cu_q {tuple(cu_q.shape)} and cu_k {tuple(cu_k.shape)} must both be [S + 1]")
    if cu_q.shape[0] < 2 and (q.shape[1] or k.shape[1]):
        raise ValueError(f"cu_q and cu_k [S + 1] have no segment (shape {tuple(cu_q.shape)}) for "
                         f"{q.shape[1]} query and {k.shape[1]} key rows")


def blocks(P: int, Dh: int, max_q: int, block_m=None, block_n=None) -> dict:
    """Tile sizes, the kernels' constexprs: powers of 2, every tl.dot side >= 16 (a GPU requirement)."""
    return dict(BLOCK_M=block_m or (16 if max_q <= 2 else 64),  # EOT-only layers: one row per prompt, so a
                BLOCK_N=block_n or 32,                          # short tile keeps the key span short
                BLOCK_P=max(16, triton.next_power_of_2(P)), BLOCK_D=max(16, triton.next_power_of_2(Dh)))


def launch_configs(P: int, Dh: int, max_q: int, block_m=None, block_n=None, fp32: bool = False) -> dict:
    """{kernel name: its constexpr tiles plus num_warps / num_stages}: what the launchers pass, per kernel.

    Sized for sm_90 with scripts/kernel_resources.py (ptxas registers / spills at the realistic shapes); the
    reasons sit next to each choice. block_m / block_n, when given, apply to every kernel as before.
    """
    c = blocks(P, Dh, max_q, block_m, block_n)
    # num_stages 2: suffixes are 2..14 tokens, so a row tile's key span is ~BLOCK_M + 14 keys, 2-3 BLOCK_N
    # steps; one tile prefetched while the other is used is all the pipelining there is to have. A third
    # buffer (triton's default) only adds shared memory (fwd at Dh 128: 72 -> 56 KiB per CTA).
    # fp32 operands: tl.dot becomes an FMA loop holding both operands and the accumulator in registers, twice
    # the bytes of bf16; at 4 warps every kernel spilled (0.7-1.6 KB), 8 warps halve each thread's share.
    w = dict(num_warps=8 if fp32 else 4, num_stages=2)
    # Backward row tile at Dh > 64 (BLOCK_D 128): the dq kernel keeps dq [BLOCK_M, 128] fp32, q / do and the
    # prefix gradients live across its key loop; at BLOCK_M 64 ptxas hits the 255-register cap and spills
    # (and dkdv, whose row loop holds q, do [BLOCK_M, 128], does too). BLOCK_M 32 fits both in ~185
    # registers, 2 CTAs (8 warps) per SM, no spills, no extra traffic beyond re-reading a few k / v rows.
    # (8 warps at BLOCK_M 64 did not help: 255 registers and spills again.) Dh <= 64 keeps 64: 183 / 136
    # registers, no spills. fp32 needs BLOCK_M 32 too: dkdv at 64 rows wants more than 255 registers even at
    # 8 warps (ptxas then falls back to 32 registers and 6.8 KB of spills); at 32, 92 registers.
    m_bwd = 32 if block_m is None and (c["BLOCK_D"] > 64 or fp32) and c["BLOCK_M"] > 32 else c["BLOCK_M"]
    bwd = dict(c, BLOCK_M=m_bwd)
    return {"_fwd_kernel": dict(c, **w), "_bwd_dq_kernel": dict(bwd, **w),
            "_bwd_dkdv_kernel": dict({k: bwd[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}, **w)}


def _strides(*ts):
    return [s for t in ts for s in t.stride()[:3]]


@on_input_device
def fwd(q, k, v, pk, pv, cu_q, cu_k, max_q: int, max_k: int, scale: float, *, block_m=None, block_n=None):
    """out [B, Tq, H, Dh] (q's dtype), lse [B, H, Tq] float32. block_m / block_n override the tile sizes."""
    _check(q, k, v, pk, pv, cu_q, cu_k)
    q, k, v, pk, pv = map(last_contiguous, (q, k, v, pk, pv))
    cu_q, cu_k = cu_q.to(torch.int32).contiguous(), cu_k.to(torch.int32).contiguous()
    B, Tq, H, Dh = q.shape
    Tk, P = k.shape[1], pk.shape[1]
    out = torch.empty((B, Tq, H, Dh), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if B == 0 or Tq == 0:
        return out, lse
    c = launch_configs(P, Dh, max_q, block_m, block_n, q.dtype == torch.float32)["_fwd_kernel"]
    _fwd_kernel[(H, triton.cdiv(Tq, c["BLOCK_M"]), B)](
        q, k, v, pk, pv, out, lse, cu_q, cu_k, _segments(cu_q, Tq), *_strides(q, k, v, pk, pv),
        Tq, Tk, P, H, Dh, float(scale) * LOG2E, **c, F32=f32_dots(q.dtype))
    return out, lse


def _num_chunks(n_tiles: int, programs: int, device: torch.device) -> int:
    """Row-tile chunks per (image, head) in the dq kernel: enough programs to fill the GPU, few partials."""
    if device.type != "cuda":
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, triton.cdiv(target, programs)))


@on_input_device
def bwd(dout, q, k, v, pk, pv, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float, *,
        block_m=None, block_n=None, n_chunks=None):
    """(dq, dk, dv, dpk, dpv) in the inputs' dtypes. block_m / block_n / n_chunks override the tiling."""
    _check(q, k, v, pk, pv, cu_q, cu_k)
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != (q.shape[0], q.shape[2], q.shape[1]):
        raise ValueError(f"prefix_attention bwd: dout {tuple(dout.shape)}, out {tuple(out.shape)} must be "
                         f"{tuple(q.shape)} and lse {tuple(lse.shape)} [B, H, Tq]")
    dout, q, k, v, pk, pv, out = map(last_contiguous, (dout, q, k, v, pk, pv, out))
    lse = lse.to(torch.float32).contiguous()
    cu_q, cu_k = cu_q.to(torch.int32).contiguous(), cu_k.to(torch.int32).contiguous()
    B, Tq, H, Dh = q.shape
    Tk, P = k.shape[1], pk.shape[1]
    dev = q.device
    dq = torch.empty((B, Tq, H, Dh), dtype=q.dtype, device=dev)
    dk = torch.empty((B, Tk, H, Dh), dtype=k.dtype, device=dev)   # every key row is written (0 if unseen)
    dv = torch.empty((B, Tk, H, Dh), dtype=v.dtype, device=dev)
    if B == 0 or Tq == 0:
        return dq, dk.zero_(), dv.zero_(), torch.zeros_like(pk), torch.zeros_like(pv)
    cfg = launch_configs(P, Dh, max_q, block_m, block_n, q.dtype == torch.float32)
    c = cfg["_bwd_dq_kernel"]
    f32 = f32_dots(q.dtype)
    n_tiles = triton.cdiv(Tq, c["BLOCK_M"])
    chunks = max(1, min(n_tiles, n_chunks or _num_chunks(n_tiles, B * H, dev)))
    per_chunk = triton.cdiv(n_tiles, chunks)
    chunks = triton.cdiv(n_tiles, per_chunk)
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=dev)
    dpk_ws = torch.empty((chunks, B, P, H, Dh), dtype=torch.float32, device=dev)
    dpv_ws = torch.empty_like(dpk_ws)
    _bwd_dq_kernel[(H, chunks, B)](
        q, dout, k, v, pk, pv, out, lse, delta, dq, dpk_ws, dpv_ws, cu_q, cu_k, _segments(cu_q, Tq),
        *_strides(q, dout, k, v, pk, pv, out), B, Tq, Tk, P, H, Dh, n_tiles, per_chunk,
        float(scale), float(scale) * LOG2E, **c, F32=f32)
    ckv = cfg["_bwd_dkdv_kernel"]
    _bwd_dkdv_kernel[(H, triton.cdiv(Tk, ckv["BLOCK_N"]), B)](
        q, dout, k, v, lse, delta, dk, dv, cu_q, cu_k, _segments(cu_k, Tk), *_strides(q, dout, k, v),
        Tq, Tk, H, Dh, float(scale), float(scale) * LOG2E, **ckv, F32=f32)
    return dq, dk, dv, dpk_ws.sum(0).to(pk.dtype), dpv_ws.sum(0).to(pv.dtype)


class TritonPrefixAttention:
    """The triton backend: `fwd` / `bwd` with the torch backend's positional signatures."""

    name = "triton"
    fwd = staticmethod(fwd)
    bwd = staticmethod(bwd)
