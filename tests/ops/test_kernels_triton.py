"""Tests of the Triton backend (`intcoop.kernels`): both ops, forward and every gradient, against float64.

Without a CUDA device the kernels run on the CPU through the Triton interpreter (TRITON_INTERPRET=1, set here
before any kernel module is imported); with one they run on the GPU. One process is one or the other: Triton
decides at kernel definition time. Under the interpreter bf16 tl.dot operands are upcast to fp32 (triton 3.8's
interpreter computes bf16 dots wrongly, see `_mm` in the kernels), so bf16 tensor-core dots run only on CUDA.
References: `intcoop.ops.<op>.reference` in float64 with autograd; lse from the torch backend in float64.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from intcoop.kernels import OPS  # noqa: E402
from intcoop.kernels import patch_pool as kpp  # noqa: E402
from intcoop.kernels import prefix_attention as kpa  # noqa: E402
from intcoop.ops import dispatch  # noqa: E402
from intcoop.ops import patch_pool as opp  # noqa: E402
from intcoop.ops import prefix_attention as opa  # noqa: E402
from intcoop.testing import assert_close, cu_seqlens, patch_pool_inputs, prefix_attention_inputs  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu"] if INTERPRET else (["cuda"] if torch.cuda.is_available() else [])
if not DEVICES:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _f64(t):
    return t.detach().double().requires_grad_(True)


# ------------------------------------------------------------------------------------------ prefix attention

# (id, B, P, lens_k, lens_q, H, Dh, launcher overrides)
PA_CASES = [
    ("B1-one-segment", 1, 1, [5], None, 1, 64, {}),
    ("primes-tiles-chunks", 3, 6, [3, 1, 7, 2, 5, 11, 13], None, 2, 64, dict(block_m=16, block_n=16, n_chunks=2)),
    ("eot-last-row-Dh80", 2, 6, [3, 1, 7, 2], [1, 1, 1, 1], 2, 80, {}),
    ("lq<lk-empty-Dh32", 2, 2, [5, 3, 7, 1, 4], [2, 3, 1, 1, 0], 3, 32, dict(block_m=16, block_n=16)),
    ("many-segments-Dh128", 2, 6, [2, 9, 4, 14, 3, 5, 2, 6, 4, 3, 12, 2, 7, 4, 2, 3, 5], None, 1, 128, {}),
]


def _pa_check(args, dout, dtype, fwd_kw=None, bwd_kw=None):
    """Run the triton launchers on `args` and compare out, lse, dq, dk, dv, dpk, dpv with float64."""
    q, k, v, pk, pv, cu_q, cu_k, max_q, max_k, scale = args
    fwd_kw = fwd_kw or {}
    out, lse = kpa.fwd(*args, **fwd_kw)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    grads = kpa.bwd(dout, q, k, v, pk, pv, out, lse, cu_q, cu_k, max_q, max_k, scale, **fwd_kw, **(bwd_kw or {}))

    ins = [_f64(t) for t in (q, k, v, pk, pv)]
    ref = opa.reference(*ins, cu_q, cu_k, scale)
    ref_grads = torch.autograd.grad(ref, ins, dout.double())
    _, ref_lse = opa.TorchPrefixAttention.fwd(*[t.detach() for t in ins], cu_q, cu_k, max_q, max_k, scale)
    assert_close(out, ref, dtype, "out")
    assert_close(lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype, "lse")
    for name, g, r, t in zip(("dq", "dk", "dv", "dpk", "dpv"), grads, ref_grads, (q, k, v, pk, pv)):
        assert g.shape == t.shape and g.dtype == dtype, name
        assert_close(g, r, dtype, name)
    return grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PA_CASES, ids=[c[0] for c in PA_CASES])
def test_prefix_attention(case, dtype, device):
    _, B, P, lens_k, lens_q, H, Dh, kw = case
    args = prefix_attention_inputs(B, P, lens_k, H, Dh, lens_q=lens_q, dtype=dtype, device=device, seed=len(lens_k))
    dout = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    fwd_kw = {k: kw[k] for k in ("block_m", "block_n") if k in kw}
    _pa_check(args, dout, dtype, fwd_kw, {k: kw[k] for k in ("n_chunks",) if k in kw})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefix_attention_noncontiguous_qkv(dtype, device):
    """q, k, v are slices of a fused [B, T, 3, H, Dh] QKV output; pk, pv slices of [B, P, 2, H, Dh]."""
    B, H, Dh, P, lens = 2, 2, 64, 6, [4, 1, 6, 2, 3]
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, sum(lens), 3, H, Dh, generator=g).to(device, dtype)
    pkv = torch.randn(B, P, 2, H, Dh, generator=g).to(device, dtype)
    cu = cu_seqlens(lens, device)
    args = (qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], pkv[:, :, 0], pkv[:, :, 1], cu, cu, max(lens), max(lens),
            Dh ** -0.5)
    assert not args[0].is_contiguous()
    dout = torch.randn(B, sum(lens), H, Dh, generator=g).to(device, dtype).transpose(0, 1).contiguous().transpose(0, 1)
    assert not dout.is_contiguous()
    _pa_check(args, dout, dtype, dict(block_m=16, block_n=16))


@pytest.mark.parametrize("device", DEVICES)
def test_prefix_attention_bwd_deterministic(device):
    args = prefix_attention_inputs(2, 6, [3, 5, 2, 7, 1], 2, 64, device=device, seed=5)
    out, lse = kpa.fwd(*args, block_m=16)
    dout = torch.randn_like(out)
    first = kpa.bwd(dout, *args[:5], out, lse, *args[5:], block_m=16, n_chunks=2)
    second = kpa.bwd(dout, *args[:5], out, lse, *args[5:], block_m=16, n_chunks=2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_prefix_attention_through_dispatcher(dtype, device, monkeypatch):
    monkeypatch.setenv("INTCOOP_BACKEND", "triton")
    args = prefix_attention_inputs(2, 6, [4, 2, 7], 2, 80, lens_q=[4, 1, 3], dtype=dtype, device=device, seed=7,
                                   requires_grad=True)
    q, k, v, pk, pv, cu_q, cu_k, max_q, max_k, scale = args
    assert dispatch.choose("prefix_attention", q, k, v, pk, pv, head_dim=80) is OPS["prefix_attention"]
    out = opa.prefix_attention(*args)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, pk, pv), dout)
    ins = [_f64(t) for t in (q, k, v, pk, pv)]
    ref = opa.reference(*ins, cu_q, cu_k, scale)
    assert_close(out, ref, dtype, "out")
    for name, g, r in zip(("dq", "dk", "dv", "dpk", "dpv"), grads, torch.autograd.grad(ref, ins, dout.double())):
        assert_close(g, r, dtype, name)


# ------------------------------------------------------------------------------------------------ patch pool

# (id, R, B, L, W, launcher overrides)
PP_CASES = [
    ("L577-B1", 32, 1, 577, 48, {}),
    ("primes-Wblocks-chunks", 5, 3, 13, 80, dict(block_wo=16, block_w=16, n_chunks=2)),
    ("R1-L1", 1, 2, 1, 16, {}),
    ("R70-two-Rblocks-W300", 70, 2, 19, 300, dict(block_l=16)),
]


def _pp_check(qt, z, scale, dpooled, dtype, need_dz=True, kw=None):
    kw = kw or {}
    pooled, lse = kpp.fwd(qt, z, scale, **{k: kw[k] for k in ("block_l", "block_wo") if k in kw})
    assert pooled.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (z.shape[0], qt.shape[0])
    dqt, dz = kpp.bwd(dpooled, qt, z, pooled, lse, scale, need_dz,
                      **{k: kw[k] for k in ("block_l", "block_w", "n_chunks") if k in kw})
    qt64, z64 = _f64(qt), _f64(z)
    ref = opp.reference(qt64, z64, scale)
    rdqt, rdz = torch.autograd.grad(ref, (qt64, z64), dpooled.double())
    _, ref_lse = opp.TorchPatchPool.fwd(qt64.detach(), z64.detach(), scale)
    assert_close(pooled, ref, dtype, "pooled")
    assert_close(lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype, "lse")
    assert dqt.shape == qt.shape and dqt.dtype == dtype
    assert_close(dqt, rdqt, dtype, "dqt")
    if need_dz:
        assert dz.shape == z.shape and dz.dtype == dtype
        assert_close(dz, rdz, dtype, "dz")
    else:
        assert dz.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PP_CASES, ids=[c[0] for c in PP_CASES])
def test_patch_pool(case, dtype, device):
    _, R, B, L, W, kw = case
    qt, z, scale = patch_pool_inputs(R, B, L, W, dtype=dtype, device=device, seed=R + L)
    dpooled = torch.randn(B, R, W, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    _pp_check(qt, z, scale, dpooled, dtype, kw=kw)


@pytest.mark.parametrize("device", DEVICES)
def test_patch_pool_noncontiguous_no_dz(device):
    """z is a width slice of a wider token tensor, qt a transposed view; need_dz=False returns empty(0)."""
    R, B, L, W = 6, 2, 11, 40
    g = torch.Generator().manual_seed(4)
    z = torch.randn(B, L, 2 * W, generator=g).to(device)[:, :, W:]
    qt = (torch.randn(W, R, generator=g) * 0.5).to(device).t()
    assert not z.is_contiguous() and qt.stride(-1) != 1
    dpooled = torch.randn(B, R, W, generator=g).to(device)
    _pp_check(qt, z, 0.125, dpooled, torch.float32, need_dz=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patch_pool_through_dispatcher(dtype, device, monkeypatch):
    monkeypatch.setenv("INTCOOP_BACKEND", "triton")
    qt, z, scale = patch_pool_inputs(8, 2, 23, 72, dtype=dtype, device=device, seed=9, requires_grad=True)
    assert dispatch.choose("patch_pool", qt, z) is OPS["patch_pool"]
    pooled = opp.patch_pool(qt, z, scale)
    dpooled = torch.randn_like(pooled)
    dqt, dz = torch.autograd.grad(pooled, (qt, z), dpooled)
    qt64, z64 = _f64(qt), _f64(z)
    ref = opp.reference(qt64, z64, scale)
    assert_close(pooled, ref, dtype, "pooled")
    for name, g, r in zip(("dqt", "dz"), (dqt, dz), torch.autograd.grad(ref, (qt64, z64), dpooled.double())):
        assert_close(g, r, dtype, name)


# --------------------------------------------------------------------------------- compiled for a real GPU

# The interpreter accepts code that the compiler rejects (e.g. a loop-carried tensor whose shape changes), so
# scripts/kernel_resources.py compiles every kernel for sm_90 with the launchers' own configs (tiles, warps, stages)
# in a fresh process without TRITON_INTERPRET, and runs ptxas -v on each: none may fail to compile or spill.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_kernels_compile_for_sm90_without_spills():
    """Every kernel compiles for an H100/H200 (sm_90) with triton's bundled ptxas, spill-free; no GPU needed."""
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing (not a CUDA build of triton)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "kernel_resources.py"), "--jobs", "2"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-4000:]
    assert "kernels compiled for sm_90; 0 spill registers" in run.stdout, run.stdout[-3000:]


# --------------------------------------------------------------------------------------------------- the API

@pytest.mark.parametrize("op, torch_impl", [("prefix_attention", opa.TorchPrefixAttention),
                                            ("patch_pool", opp.TorchPatchPool)])
def test_ops_match_torch_backend_signatures(op, torch_impl):
    impl = OPS[op]._get()
    for fn in ("fwd", "bwd"):
        ours = [p.name for p in inspect.signature(getattr(impl, fn)).parameters.values()
                if p.kind == p.POSITIONAL_OR_KEYWORD]
        assert ours == list(inspect.signature(getattr(torch_impl, fn)).parameters), (op, fn)
