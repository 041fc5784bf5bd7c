"""The custom ops through the dispatcher (torch backend on this machine): values, gradients, opcheck, dispatch errors.

The Triton and compiled backends have their own files (test_kernels_triton.py, test_compiled_ops.py).
"""
import pytest
import torch

from intcoop.ops import dispatch, patch_pool, prefix_attention
from intcoop.testing import TOLERANCES, assert_close, patch_pool_inputs, prefix_attention_inputs

CASES = [  # (B, P, lens_k, lens_q, H, Dh)
    (1, 1, [1], None, 1, 8),
    (3, 6, [2, 5, 1, 7], None, 2, 16),
    (2, 5, [3, 13, 2], [1, 1, 1], 3, 7),          # last-row queries, odd head dim
    (4, 2, [11, 1, 4, 4, 9, 2, 3], [5, 1, 4, 1, 9, 2, 1], 2, 5),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_prefix_attention_torch_backend(monkeypatch, case, dtype):
    monkeypatch.setenv("INTCOOP_BACKEND", "torch")
    B, P, lens_k, lens_q, H, Dh = case
    args = prefix_attention_inputs(B, P, lens_k, H, Dh, lens_q, torch.float64, seed=B, requires_grad=True)
    ref = prefix_attention.reference(*args[:7], args[9])
    low = [a.detach().to(dtype).requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
           for a in args]
    out = prefix_attention.prefix_attention(*low)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
    dout = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    g_ref = torch.autograd.grad(ref, args[:5], dout)
    g_out = torch.autograd.grad(out, low[:5], dout.to(dtype))
    for name, a, b in zip("q k v pk pv".split(), g_out, g_ref):
        assert_close(a, b, dtype, msg=f"d{name}")


def test_prefix_attention_noncontiguous_views():
    B, T, H, Dh, P = 2, 9, 2, 6, 3
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, 3, H, Dh, generator=g, dtype=torch.float64)
    pkv = torch.randn(B, P, 2, H, Dh, generator=g, dtype=torch.float64)
    q, k, v = qkv.unbind(2)
    cu = torch.tensor([0, 4, 5, 9], dtype=torch.int32)
    out = prefix_attention.prefix_attention(q, k, v, pkv[:, :, 0], pkv[:, :, 1], cu, cu, 4, 4, 0.4)
    ref = prefix_attention.reference(q, k, v, pkv[:, :, 0], pkv[:, :, 1], cu, cu, 0.4)
    assert_close(out, ref)


@pytest.mark.parametrize("R,B,L,W", [(1, 1, 1, 3), (6, 3, 17, 24), (32, 2, 197, 40)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_patch_pool_torch_backend(R, B, L, W, dtype):
    qt, z, scale = patch_pool_inputs(R, B, L, W, torch.float64, seed=R + L, requires_grad=True)
    ref = patch_pool.reference(qt, z, scale)
    qt_l, z_l = (t.detach().to(dtype).requires_grad_() for t in (qt, z))
    out = patch_pool.patch_pool(qt_l, z_l, scale)
    assert_close(out, ref, dtype)
    dout = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for a, b, name in zip(torch.autograd.grad(out, (qt_l, z_l), dout.to(dtype)),
                          torch.autograd.grad(ref, (qt, z), dout), ("dqt", "dz")):
        assert_close(a, b, dtype, msg=name)


def test_patch_pool_without_patch_gradient():
    qt, z, scale = patch_pool_inputs(4, 2, 5, 6, torch.float64, seed=1)
    qt.requires_grad_()
    patch_pool.patch_pool(qt, z, scale).sum().backward()
    assert qt.grad is not None and z.grad is None


def test_gradcheck_reference_and_op():
    args = prefix_attention_inputs(2, 2, [2, 3], 1, 3, [1, 3], torch.float64, seed=5, requires_grad=True)
    fn = lambda *t: prefix_attention.prefix_attention(*t, *args[5:])  # noqa: E731
    assert torch.autograd.gradcheck(fn, args[:5])
    qt, z, scale = patch_pool_inputs(3, 2, 4, 5, torch.float64, seed=2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: patch_pool.patch_pool(a, b, scale), (qt, z))


def test_opcheck():
    args = prefix_attention_inputs(2, 3, [2, 4, 1], 2, 8, dtype=torch.float32, seed=1, requires_grad=True)
    torch.library.opcheck(torch.ops.intcoop.prefix_attention_fwd.default, args)
    qt, z, scale = patch_pool_inputs(4, 2, 7, 8, torch.float32, seed=1, requires_grad=True)
    torch.library.opcheck(torch.ops.intcoop.patch_pool_fwd.default, (qt, z, scale))


def test_tolerance_table_covers_every_backend_dtype():
    for backend in dispatch.BACKENDS:
        assert set(backend.dtypes) <= set(TOLERANCES), backend.name


def test_forced_backend_errors(monkeypatch):
    args = prefix_attention_inputs(1, 1, [2], 1, 4)
    monkeypatch.setenv("INTCOOP_BACKEND", "warp-drive")
    with pytest.raises(ValueError, match="not a backend"):
        prefix_attention.prefix_attention(*args)
    monkeypatch.setenv("INTCOOP_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="INTCOOP_BACKEND=cuda cannot run prefix_attention"):
        prefix_attention.prefix_attention(*args)


def test_no_backend_message_names_every_backend(monkeypatch):
    monkeypatch.delenv("INTCOOP_BACKEND", raising=False)
    args = prefix_attention_inputs(1, 1, [2], 1, 4)
    ints = [a.long() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    with pytest.raises(RuntimeError) as err:
        dispatch.choose("prefix_attention", *ints[:5], head_dim=4)
    for name in ("triton", "cuda", "cpp", "torch"):
        assert f"  {name}:" in str(err.value)
    assert "dtype torch.int64 not supported" in str(err.value)


def test_report_lists_every_backend():
    rows = dispatch.report("cpu")
    assert [r[0] for r in rows] == ["triton", "cuda", "cpp", "torch"]
    assert dict((r[0], r[1]) for r in rows)["torch"] == "usable"
