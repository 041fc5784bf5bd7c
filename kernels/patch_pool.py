"""Triton kernels of attention pooling over raw patch tokens: the `triton` backend of intcoop.ops.patch_pool.

Owns the forward kernel, the three backward kernels and their launchers; autograd lives in
intcoop/ops/patch_pool.py, whose docstring gives the semantics and the shapes.

Forward tiling. A program takes (output W block, block of R rows, image b) and streams the image's L patch
tokens with an online softmax: scores of an L chunk are reduced over the whole width in BLOCK_K chunks, then
the chunk's z[:, W block] (just read, so an L1/L2 hit) updates an accumulator [BLOCK_R, BLOCK_WO]. Why not one
[BLOCK_R, W] accumulator: at W = 768 / 1024 in fp32 it is 96-128 KB of registers per program for R = 32, and
W = 768 is no power of 2 (a padded 1024 tile wastes a quarter). Splitting the output width keeps registers
small; the W blocks of one image are neighbours on grid axis 0, so HBM sees z about once and the price is the
score GEMM recomputed per W block: 2R = 64 FLOP per byte of z becomes (W / BLOCK_WO + 1) R = 128 at W = 768,
still under an H200's ~206 FLOP/byte ridge, so the kernel stays memory-bound.
Backward: (1) `_bwd_scores_kernel`: p and ds = p * (dpooled . z - rowsum(dpooled * pooled)) * scale per
(L block, R block, image) into scratch [B, R, L] in z's dtype (computed in fp32; both consumers round them to
z's dtype for their dots anyway, so storing them rounded is exact and halves the scratch traffic and the
registers that hold the loaded tiles); (2) `_bwd_dz_kernel`: dz = p^T dpooled + ds^T qt per
(W block, L block, image); (3) `_bwd_dqt_kernel`: dqt = sum_b ds_b z_b, one fp32 partial per image chunk, summed in
torch (deterministic, no atomics).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._common import LOG2E, f32_dots, last_contiguous, mm, on_input_device

__all__ = ["TritonPatchPool", "fwd", "bwd"]

@triton.jit
def _fwd_kernel(
    QT,                     # [R, W] strides (sqr, 1)
    Z,                      # [B, L, W] strides (szb, szl, 1)
    POOLED,                 # [B, R, W] contiguous, z's dtype
    LSE,                    # [B, R] float32 contiguous (natural log)
    sqr, szb, szl,
    R, L, W,                # ints
    qk_scale,               # float: scale * log2(e)
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_WO: tl.constexpr,
    F32: tl.constexpr,
):
    wb = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    kk = tl.arange(0, BLOCK_K)
    wo = wb * BLOCK_WO + tl.arange(0, BLOCK_WO)
    wo_ok = wo < W
    zb = Z + b * szb

    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_WO], tl.float32)
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        l_ok = ls < L
        s = tl.zeros([BLOCK_R, BLOCK_L], tl.float32)
        for k0 in range(0, W, BLOCK_K):
            k_ok = (k0 + kk) < W
            qt = tl.load(QT + r[:, None] * sqr + (k0 + kk)[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            z = tl.load(zb + ls[:, None] * szl + (k0 + kk)[None, :], mask=l_ok[:, None] & k_ok[None, :], other=0.0)
            s = mm(qt, tl.trans(z), s, F32)
        s = tl.where(l_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        zw = tl.load(zb + ls[:, None] * szl + wo[None, :], mask=l_ok[:, None] & wo_ok[None, :], other=0.0)
        acc = mm(p.to(zw.dtype), zw, acc * alpha[:, None], F32)
        m = m_new

    out = acc / l[:, None]
    tl.store(POOLED + (b * R + r[:, None]) * W + wo[None, :], out.to(POOLED.dtype.element_ty),
             mask=r_ok[:, None] & wo_ok[None, :])
    tl.store(LSE + b * R + r, (m + tl.log2(l)) * 0.6931471805599453, mask=r_ok & (wb == 0))


@triton.jit
def _bwd_scores_kernel(
    QT,                     # [R, W] strides (sqr, 1)
    Z,                      # [B, L, W] strides (szb, szl, 1)
    DPO, PO,                # [B, R, W] strides (sdb, sdr, 1), (spb, spr, 1): dpooled, pooled
    LSE,                    # [B, R] float32 contiguous
    PROB, DSCORE,           # [B, R, L] z's dtype contiguous, written: probabilities and dscores (with scale)
    sqr, szb, szl, sdb, sdr, spb, spr,
    R, L, W,                # ints
    scale, qk_scale,        # floats: softmax scale; scale * log2(e)
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
    F32: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    ls = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = ls < L
    kk = tl.arange(0, BLOCK_K)
    s = tl.zeros([BLOCK_R, BLOCK_L], tl.float32)
    dp = tl.zeros([BLOCK_R, BLOCK_L], tl.float32)
    delta = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, W, BLOCK_K):
        k_ok = (k0 + kk) < W
        rmask = r_ok[:, None] & k_ok[None, :]
        qt = tl.load(QT + r[:, None] * sqr + (k0 + kk)[None, :], mask=rmask, other=0.0)
        z = tl.load(Z + b * szb + ls[:, None] * szl + (k0 + kk)[None, :], mask=l_ok[:, None] & k_ok[None, :],
                    other=0.0)
        do = tl.load(DPO + b * sdb + r[:, None] * sdr + (k0 + kk)[None, :], mask=rmask, other=0.0)
        po = tl.load(PO + b * spb + r[:, None] * spr + (k0 + kk)[None, :], mask=rmask, other=0.0)
        s = mm(qt, tl.trans(z), s, F32)
        dp = mm(do, tl.trans(z), dp, F32)
        delta += tl.sum(do.to(tl.float32) * po.to(tl.float32), 1)
    lse2 = tl.load(LSE + b * R + r, mask=r_ok, other=0.0) * 1.4426950408889634
    ok = r_ok[:, None] & l_ok[None, :]
    p = tl.where(ok, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
    ds = p * (dp - delta[:, None]) * scale
    ws = (b * R + r[:, None]) * L + ls[None, :]
    tl.store(PROB + ws, p.to(PROB.dtype.element_ty), mask=ok)
    tl.store(DSCORE + ws, ds.to(DSCORE.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_dz_kernel(
    QT,                     # [R, W] strides (sqr, 1)
    DPO,                    # [B, R, W] strides (sdb, sdr, 1)
    PROB, DSCORE,           # [B, R, L] z's dtype contiguous
    DZ,                     # [B, L, W] contiguous, z's dtype
    sqr, sdb, sdr,
    R, L, W,                # ints
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr,
    F32: tl.constexpr,
):
    w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    w_ok = w < W
    ls = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = ls < L
    b = tl.program_id(2).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_L, BLOCK_W], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + rr
        r_ok = r < R
        tmask = l_ok[:, None] & r_ok[None, :]
        pt = tl.load(PROB + (b * R + r[None, :]) * L + ls[:, None], mask=tmask, other=0.0)     # [BLOCK_L, BLOCK_R]
        dst = tl.load(DSCORE + (b * R + r[None, :]) * L + ls[:, None], mask=tmask, other=0.0)
        wmask = r_ok[:, None] & w_ok[None, :]
        do = tl.load(DPO + b * sdb + r[:, None] * sdr + w[None, :], mask=wmask, other=0.0)       # [BLOCK_R, BLOCK_W]
        qt = tl.load(QT + r[:, None] * sqr + w[None, :], mask=wmask, other=0.0)
        acc = mm(pt.to(do.dtype), do, acc, F32)
        acc = mm(dst.to(qt.dtype), qt, acc, F32)
    tl.store(DZ + (b * L + ls[:, None]) * W + w[None, :], acc.to(DZ.dtype.element_ty),
             mask=l_ok[:, None] & w_ok[None, :])


@triton.jit
def _bwd_dqt_kernel(
    Z,                      # [B, L, W] strides (szb, szl, 1)
    DSCORE,                 # [B, R, L] z's dtype contiguous
    DQT_WS,                 # [n_chunks, R, W] float32 contiguous, written: this chunk's sum over its images
    szb, szl,
    B, R, L, W,             # ints
    images_per_chunk,       # int
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr,
    F32: tl.constexpr,
):
    w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    w_ok = w < W
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    chunk = tl.program_id(2)
    acc = tl.zeros([BLOCK_R, BLOCK_W], tl.float32)
    b_begin = chunk.to(tl.int64) * images_per_chunk          # int64 bounds: int64 offsets below
    for b64 in range(b_begin, tl.minimum(b_begin + images_per_chunk, B)):
        for l0 in range(0, L, BLOCK_L):
            ls = l0 + tl.arange(0, BLOCK_L)
            l_ok = ls < L
            ds = tl.load(DSCORE + (b64 * R + r[:, None]) * L + ls[None, :], mask=r_ok[:, None] & l_ok[None, :],
                         other=0.0)
            z = tl.load(Z + b64 * szb + ls[:, None] * szl + w[None, :], mask=l_ok[:, None] & w_ok[None, :],
                        other=0.0)
            acc = mm(ds.to(z.dtype), z, acc, F32)
    tl.store(DQT_WS + (chunk * R + r[:, None]) * W + w[None, :], acc, mask=r_ok[:, None] & w_ok[None, :])


# ----------------------------------------------------------------------------------------------- launchers

def _check(qt, z):
    if qt.dim() != 2 or z.dim() != 3 or qt.shape[1] != z.shape[2]:
        raise ValueError(f"patch_pool wants qt [R, W] and z [B, L, W]; got {tuple(qt.shape)} and {tuple(z.shape)}")
    if qt.dtype != z.dtype or z.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"patch_pool (triton) wants one dtype among fp16/bf16/fp32, got {qt.dtype} and {z.dtype}")


def fwd_blocks(R: int, W: int, block_l=None, block_wo=None) -> dict:
    """Forward tile sizes (every tl.dot side >= 16 for GPUs, powers of 2): the kernel's constexprs."""
    return dict(BLOCK_R=min(64, max(16, triton.next_power_of_2(R))), BLOCK_L=block_l or 32, BLOCK_K=64,
                BLOCK_WO=block_wo or min(256, max(16, triton.next_power_of_2(W))))


def bwd_blocks(R: int, W: int, block_l=None, block_w=None) -> dict:
    """Backward tile sizes of the three backward kernels (`_bwd_scores` ignores BLOCK_W; `launch_configs`
    narrows `_bwd_dz`'s BLOCK_R to 32)."""
    return dict(BLOCK_R=min(64, max(16, triton.next_power_of_2(R))), BLOCK_L=block_l or 64, BLOCK_K=64,
                BLOCK_W=block_w or min(128, max(16, triton.next_power_of_2(W))))


def launch_configs(R: int, W: int, block_l=None, block_wo=None, block_w=None, fp32: bool = False) -> dict:
    """{kernel name: its constexpr tiles plus num_warps / num_stages}: what the launchers pass, per kernel.

    Sized for sm_90 with scripts/kernel_resources.py (ptxas registers / spills at R 32 / W 768 and R 64 /
    W 1024); the reasons sit next to each choice. Overrides (block_l / block_wo / block_w) apply as before.
    """
    f, b = fwd_blocks(R, W, block_l, block_wo), bwd_blocks(R, W, block_l, block_w)
    # fp32 operands: tl.dot is an FMA loop holding both operands and the accumulator in registers (twice the
    # bytes of bf16): 8 warps everywhere halve each thread's share.
    big = 8 if fp32 else None
    # Forward: acc [BLOCK_R, BLOCK_WO] fp32 is BLOCK_R * BLOCK_WO / 128 registers a thread at 4 warps: 128 at
    # R 64 x 256, where ptxas needed 236-245 (2 CTAs, at the cap). 8 warps: 141, no spills. BLOCK_WO stays 256:
    # halving it would double the recomputed score GEMM (see the module docstring). num_stages 3 (default):
    # the W loop of the score GEMM is 12-16 steps long, worth prefetching.
    fwd_w = big or (8 if f["BLOCK_R"] * f["BLOCK_WO"] >= 64 * 256 else 4)
    # Scores: accumulators [BLOCK_R, BLOCK_L] only; 103-168 registers at 4 warps, 3-4 CTAs. Its W loop is
    # 12-16 steps: keep 3 stages.
    # dz: one R chunk per step of its loop, acc [BLOCK_L, BLOCK_W]. At R 64 with BLOCK_R 64, fp32 scratch and
    # 3 stages it staged 160 KiB and took 254 registers: 1 CTA, 4 warps per SM. BLOCK_R 32, 2 stages: 128
    # registers, 40 KiB, 4 CTAs; R 64 takes two steps of the loop, the second prefetched.
    dz_r = min(32, b["BLOCK_R"])
    # dqt: acc [BLOCK_R, BLOCK_W] = 64 x 128 at R 64 is 64 registers a thread at 4 warps, and ptxas needed
    # 255 (spills with fp32 scratch). 8 warps: 80 (R 32) / 128 (R 64) registers, 2-3 CTAs of 8 warps.
    # BLOCK_R stays the whole R (<= 64) so z, the big operand, is read once. num_stages 2: one prefetched
    # tile is enough for an L loop of 4-10 steps per image, and staged smem stays 40 KiB (56 at 3).
    # fp32 forward: 2 stages; at 3, triton 3.6 (the GPU image's) spills 40 B at R 32 x W 768 (3.8 does not).
    return {"_fwd_kernel": dict(f, num_warps=fwd_w, num_stages=2 if fp32 else 3),
            "_bwd_scores_kernel": dict({k: b[k] for k in ("BLOCK_R", "BLOCK_L", "BLOCK_K")},
                                       num_warps=big or 4, num_stages=3),
            "_bwd_dz_kernel": dict({k: b[k] for k in ("BLOCK_L", "BLOCK_W")}, BLOCK_R=dz_r,
                                   num_warps=big or 4, num_stages=2),
            "_bwd_dqt_kernel": dict({k: b[k] for k in ("BLOCK_R", "BLOCK_L", "BLOCK_W")}, num_warps=8,
                                    num_stages=2)}


@on_input_device
def fwd(qt, z, scale: float, *, block_l=None, block_wo=None):
    """pooled [B, R, W] (z's dtype), lse [B, R] float32. block_l / block_wo override the tile sizes."""
    _check(qt, z)
    qt, z = last_contiguous(qt), last_contiguous(z)
    (R, W), (B, L) = qt.shape, z.shape[:2]
    pooled = torch.empty((B, R, W), dtype=z.dtype, device=z.device)
    lse = torch.empty((B, R), dtype=torch.float32, device=z.device)
    if B == 0 or R == 0:
        return pooled, lse
    if L == 0:
        raise ValueError("patch_pool needs at least one patch token (L >= 1)")
    c = launch_configs(R, W, block_l, block_wo, fp32=z.dtype == torch.float32)["_fwd_kernel"]
    _fwd_kernel[(triton.cdiv(W, c["BLOCK_WO"]), triton.cdiv(R, c["BLOCK_R"]), B)](
        qt, z, pooled, lse, qt.stride(0), z.stride(0), z.stride(1), R, L, W, float(scale) * LOG2E,
        **c, F32=f32_dots(z.dtype))
    return pooled, lse


def _num_chunks(B: int, programs: int, device: torch.device) -> int:
    """Image chunks in the dqt kernel: enough programs to fill the GPU, few partials to sum."""
    if device.type != "cuda":
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(B, triton.cdiv(target, programs)))


@on_input_device
def bwd(dpooled, qt, z, pooled, lse, scale: float, need_dz: bool, *, block_l=None, block_w=None, n_chunks=None):
    """(dqt [R, W], dz [B, L, W] or empty(0)) in the inputs' dtypes. Keywords override the tiling."""
    _check(qt, z)
    (R, W), (B, L) = qt.shape, z.shape[:2]
    if dpooled.shape != (B, R, W) or pooled.shape != (B, R, W) or lse.shape != (B, R):
        raise ValueError(f"patch_pool bwd: dpooled {tuple(dpooled.shape)} and pooled {tuple(pooled.shape)} must be "
                         f"{(B, R, W)}, lse {tuple(lse.shape)} {(B, R)}")
    dpooled, qt, z, pooled = map(last_contiguous, (dpooled, qt, z, pooled))
    lse = lse.to(torch.float32).contiguous()
    dev, f32 = z.device, f32_dots(z.dtype)
    dz = torch.empty((B, L, W), dtype=z.dtype, device=dev) if need_dz else z.new_empty(0)
    if B == 0 or R == 0 or L == 0:
        return torch.zeros_like(qt), (dz.zero_() if need_dz else dz)
    cfg = launch_configs(R, W, block_l, block_w=block_w, fp32=z.dtype == torch.float32)
    cs, cz, cq = cfg["_bwd_scores_kernel"], cfg["_bwd_dz_kernel"], cfg["_bwd_dqt_kernel"]
    prob = torch.empty((B, R, L), dtype=z.dtype, device=dev)   # rounded to z's dtype: exact, see the docstring
    dscore = torch.empty_like(prob)
    _bwd_scores_kernel[(triton.cdiv(L, cs["BLOCK_L"]), triton.cdiv(R, cs["BLOCK_R"]), B)](
        qt, z, dpooled, pooled, lse, prob, dscore, qt.stride(0), z.stride(0), z.stride(1), dpooled.stride(0),
        dpooled.stride(1), pooled.stride(0), pooled.stride(1), R, L, W, float(scale), float(scale) * LOG2E,
        **cs, F32=f32)
    if need_dz:
        _bwd_dz_kernel[(triton.cdiv(W, cz["BLOCK_W"]), triton.cdiv(L, cz["BLOCK_L"]), B)](
            qt, dpooled, prob, dscore, dz, qt.stride(0), dpooled.stride(0), dpooled.stride(1), R, L, W,
            **cz, F32=f32)
    programs = triton.cdiv(W, cq["BLOCK_W"]) * triton.cdiv(R, cq["BLOCK_R"])
    chunks = max(1, min(B, n_chunks or _num_chunks(B, programs, dev)))
    per_chunk = triton.cdiv(B, chunks)
    chunks = triton.cdiv(B, per_chunk)
    dqt_ws = torch.empty((chunks, R, W), dtype=torch.float32, device=dev)
    _bwd_dqt_kernel[(triton.cdiv(W, cq["BLOCK_W"]), triton.cdiv(R, cq["BLOCK_R"]), chunks)](
        z, dscore, dqt_ws, z.stride(0), z.stride(1), B, R, L, W, per_chunk, **cq, F32=f32)
    return dqt_ws.sum(0).to(qt.dtype), dz


class TritonPatchPool:
    """The triton backend: `fwd` / `bwd` with the torch backend's positional signatures."""

    name = "triton"
    fwd = staticmethod(fwd)
    bwd = staticmethod(bwd)
