"""The compiled core `intcoop._C` (csrc/): C++ CPU prefix_attention and, on a GPU, the CUDA prefix_attention and
patch_pool, against the float64 references; called directly (torch.ops.intcoop_C.*) and through the dispatcher
(INTCOOP_BACKEND forced) with autograd; awkward shapes and non-contiguous views; argument checks. Without a GPU
the CUDA kernels' logic is still checked, on a few cases, through the CPU emulation in csrc/emu (C++20 build,
cached in ~/.cache/intcoop; 20 to 45 s the first time on 2 cores).

Run: pytest -q tests/test_compiled_ops.py   (build first: pip install --no-build-isolation -e .)
"""
import importlib.util
import os
import pathlib
import shutil

import pytest
import torch

if importlib.util.find_spec("intcoop._C") is None and os.environ.get("INTCOOP_SKIP_EXT") == "1":
    pytest.skip("INTCOOP_SKIP_EXT=1: intcoop._C was not built", allow_module_level=True)
# otherwise a missing build fails the import below: the README's install builds it

import intcoop._C  # noqa: E402,F401  (a build that is present but broken fails here, it is not skipped)
from intcoop.ops import _ext, dispatch  # noqa: E402
from intcoop.ops import patch_pool as pp  # noqa: E402
from intcoop.ops import prefix_attention as pa  # noqa: E402
from intcoop.testing import assert_close, patch_pool_inputs, prefix_attention_inputs  # noqa: E402

OPS = torch.ops.intcoop_C
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")

# name -> prefix_attention_inputs arguments; layout: how q/k/v/pk/pv are laid out in memory.
CASES = {
    "tiny": dict(B=1, P=1, lens_k=[1], H=1, Dh=1),
    "mixed": dict(B=2, P=6, lens_k=[2, 5, 3, 14, 7], H=3, Dh=64),
    "eot_rows": dict(B=3, P=6, lens_k=[3, 1, 13, 4], lens_q=[1, 1, 1, 1], H=2, Dh=59),
    "bottom_right": dict(B=2, P=2, lens_k=[5, 4, 7, 2], lens_q=[2, 4, 0, 1], H=2, Dh=37),
    "many_short": dict(B=1, P=2, lens_k=[1, 3, 2, 1, 4, 2, 1, 1, 2, 3, 1, 2, 1, 1, 2, 5, 1], H=1, Dh=40),
    "many_segments": dict(B=2, P=6, lens_k=[2, 9, 1, 4, 3, 13, 5, 2, 2, 7, 4, 11, 3, 1, 6, 2, 4, 3, 5], H=2, Dh=97),
    "fused_qkv": dict(B=2, P=3, lens_k=[4, 1, 6], H=4, Dh=16, layout="fused"),
    "strided": dict(B=2, P=5, lens_k=[3, 2, 6], lens_q=[3, 1, 2], H=2, Dh=200, layout="strided"),
}


def make_inputs(name, dtype, device, requires_grad=False):
    """(q, k, v, pk, pv, cu_q, cu_k, max_q, max_k, scale) for CASES[name], in its memory layout."""
    c = dict(CASES[name])
    layout = c.pop("layout", "contiguous")
    q, k, v, pk, pv, *rest = prefix_attention_inputs(**c, dtype=dtype, device=device, seed=len(name))
    if layout == "fused":            # views of one [B, T, 3, H, Dh] QKV output, as the text encoder makes them
        base = torch.stack([q, k, v], 2).requires_grad_(requires_grad)
        q, k, v = base.unbind(2)
        pk, pv = pk.requires_grad_(requires_grad), pv.requires_grad_(requires_grad)
        assert not q.is_contiguous()
    elif layout == "strided":        # head dim with stride 2, prefix stored [B, H, P, Dh] and transposed
        def spread(x):
            return torch.stack([x, torch.zeros_like(x)], -1).flatten(-2).requires_grad_(requires_grad)[..., ::2]

        def transposed(x):
            return x.transpose(1, 2).contiguous().requires_grad_(requires_grad).transpose(1, 2)
        q, k, v = spread(q), spread(k), spread(v)
        pk, pv = transposed(pk), transposed(pv)
        assert q.stride(-1) == 2 and not pk.is_contiguous()
    else:
        q, k, v, pk, pv = (t.requires_grad_(requires_grad) for t in (q, k, v, pk, pv))
    return (q, k, v, pk, pv, *rest)


def expected(args, dout):
    """The float64 reference: out, lse and the gradients (dq, dk, dv, dpk, dpv) for the cotangent dout."""
    q, k, v, pk, pv, cu_q, cu_k, max_q, max_k, scale = args
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    out = pa.reference(*leaves, cu_q, cu_k, scale)
    grads = torch.autograd.grad(out, leaves, dout.double())
    _, lse = pa.TorchPrefixAttention.fwd(*[t.detach() for t in leaves], cu_q, cu_k, max_q, max_k, scale)
    return out.detach(), lse, grads


def random_like(x, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g, dtype=torch.float64).to(device=x.device, dtype=x.dtype)


def check_prefix_direct(name, dtype, device, ops=OPS):
    args = make_inputs(name, dtype, device)
    out, lse = ops.prefix_attention_fwd(*args)
    dout = random_like(out)
    ref_out, ref_lse, ref_grads = expected(args, dout)
    assert out.shape == ref_out.shape and out.dtype == dtype
    assert lse.dtype == dispatch.lse_dtype(dtype) and lse.shape == ref_lse.shape
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, lse.dtype, "lse")
    q, k, v, pk, pv, cu_q, cu_k, max_q, max_k, scale = args
    grads = ops.prefix_attention_bwd(dout, q, k, v, pk, pv, out, lse, cu_q, cu_k, max_q, max_k, scale)
    for label, g, r, x in zip(("dq", "dk", "dv", "dpk", "dpv"), grads, ref_grads, (q, k, v, pk, pv)):
        assert g.shape == x.shape and g.dtype == dtype, label
        assert_close(g, r, dtype, label)


def check_prefix_dispatched(name, dtype, device, backend, monkeypatch):
    monkeypatch.setenv(dispatch.ENV, backend)
    args = make_inputs(name, dtype, device, requires_grad=True)
    impl = dispatch.choose("prefix_attention", *args[:5], head_dim=args[0].shape[-1])
    assert isinstance(impl, _ext._Compiled), f"{backend} did not pick the compiled op: {impl}"
    out = pa.prefix_attention(*args)
    dout = random_like(out)
    grads = torch.autograd.grad(out, args[:5], dout)
    ref_out, _, ref_grads = expected(args, dout)
    assert_close(out, ref_out, dtype, "out")
    for label, g, r in zip(("dq", "dk", "dv", "dpk", "dpv"), grads, ref_grads):
        assert_close(g, r, dtype, label)


# ---------------------------------------------------------------- CPU (C++ / OpenMP)
CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]   # half types: float32 accumulation

@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_prefix_attention_direct(name, dtype):
    check_prefix_direct(name, dtype, "cpu")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_prefix_attention_dispatched(name, dtype, monkeypatch):
    check_prefix_dispatched(name, dtype, "cpu", "cpp", monkeypatch)


def test_cpu_prefix_attention_schema():
    """The ops neither mutate nor alias their inputs, as their schemas say."""
    args = make_inputs("mixed", torch.float32, "cpu")
    torch.library.opcheck(OPS.prefix_attention_fwd.default, args, test_utils=("test_schema",))
    out, lse = OPS.prefix_attention_fwd(*args)
    bwd_args = (random_like(out), *args[:5], out, lse, *args[5:])
    torch.library.opcheck(OPS.prefix_attention_bwd.default, bwd_args, test_utils=("test_schema",))


def test_cpu_patch_pool_falls_back_to_torch(monkeypatch):
    """patch_pool has no C++ CPU kernel (two GEMMs: torch's are faster); the dispatcher runs the torch backend."""
    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert not _ext.has_kernel("patch_pool_fwd", "cpu")
    qt, z, scale = patch_pool_inputs(3, 2, 5, 8)
    assert dispatch.choose("patch_pool", qt, z) is pp.TorchPatchPool


def _at(i, f):
    return lambda a: a[:i] + (f(a[i]),) + a[i + 1:]


# (id, change to the fwd arguments, the error's text naming the argument, whether it also shows a shape)
MUTATIONS = [
    ("q_dtype", lambda a: tuple(t.int() for t in a[:5]) + a[5:], "q must be float32, float64, bfloat16 or float16",
     True),
    ("k_dtype", _at(1, lambda k: k.double()), "k must have the dtype of q", True),
    ("q_rank", _at(0, lambda q: q[0]), "q must have 4 dimensions", True),
    ("k_batch", _at(1, lambda k: torch.cat([k, k[:1]])), r"k\.shape\[0\] \(B", True),
    ("pv_heads", _at(4, lambda pv: pv[:, :, :1]), "pv must have the shape of pk", True),
    ("pk_heads", _at(3, lambda pk: pk[:, :, :1]), r"pk\.shape\[2\] \(H", True),
    ("pk_empty", lambda a: a[:3] + (a[3][:, :0], a[4][:, :0]) + a[5:], "pk must hold at least one prefix", True),
    ("cu_q_int64", _at(5, lambda c: c.long()), "cu_q must have dtype", True),
    ("cu_k_length", _at(6, lambda c: c[:-1]), r"cu_k\.shape\[0\]", True),
    ("cu_q_end", _at(5, lambda c: torch.cat([c[:-1], c[-1:] - 1])), "cu_q must end at", False),
    ("more_queries", _at(5, lambda c: c * 2), "cu_k must give every segment", False),
    ("max_q", _at(7, lambda m: m - 1), "max_q must be at least", False),
]


@pytest.mark.parametrize("change,needle,shows_shape", [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_cpu_argument_checks(change, needle, shows_shape):
    args = change(make_inputs("mixed", torch.float32, "cpu"))
    with pytest.raises(RuntimeError, match=needle) as info:
        OPS.prefix_attention_fwd(*args)
    assert ("shape [" in str(info.value)) == shows_shape, str(info.value)


def test_cpu_backward_argument_checks():
    args = make_inputs("mixed", torch.float32, "cpu")
    out, lse = OPS.prefix_attention_fwd(*args)
    q, k, v, pk, pv, cu_q, cu_k, max_q, max_k, scale = args
    with pytest.raises(RuntimeError, match="lse must have dtype"):
        OPS.prefix_attention_bwd(out, q, k, v, pk, pv, out, lse.double(), cu_q, cu_k, max_q, max_k, scale)
    with pytest.raises(RuntimeError, match="dout must have the shape of q"):
        OPS.prefix_attention_bwd(out[:, 1:], q, k, v, pk, pv, out, lse, cu_q, cu_k, max_q, max_k, scale)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[B, H, Tq\]"):
        OPS.prefix_attention_bwd(out, q, k, v, pk, pv, out, lse.transpose(1, 2), cu_q, cu_k, max_q, max_k, scale)


# ---------------------------------------------------------------- CUDA

def _nvcc_found() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or os.path.isfile(os.path.join(home, "bin", "nvcc"))


@pytest.mark.skipif(os.environ.get("INTCOOP_SKIP_CUDA") == "1", reason="INTCOOP_SKIP_CUDA=1: CUDA part not built")
@pytest.mark.skipif(not _nvcc_found() or torch.version.cuda is None, reason="no nvcc or a CPU-only torch")
def test_cuda_part_compiled():
    for op in ("prefix_attention_fwd", "prefix_attention_bwd", "patch_pool_fwd", "patch_pool_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"intcoop_C::{op}", "CUDA"), op


CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_prefix_attention_direct(name, dtype):
    check_prefix_direct(name, dtype, "cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_prefix_attention_dispatched(name, dtype, monkeypatch):
    check_prefix_dispatched(name, dtype, "cuda", "cuda", monkeypatch)


POOL_CASES = {  # name -> (R, B, L, W)
    "one": (1, 1, 1, 1),
    "primes": (3, 2, 7, 33),
    "vit_b16": (32, 2, 197, 768),
    "vit_l14_336": (32, 3, 577, 1024),
    "odd_rows": (37, 2, 61, 130),
    "many_rows": (37, 1, 9, 40),
}


def pool_expected(qt, z, scale, dpooled):
    leaves = [qt.detach().double().requires_grad_(), z.detach().double().requires_grad_()]
    pooled = pp.reference(*leaves, scale)
    return (pooled.detach(), *torch.autograd.grad(pooled, leaves, dpooled.double()))


def check_pool_direct(ops, name, dtype, device):
    qt, z, scale = patch_pool_inputs(*POOL_CASES[name], dtype=dtype, device=device)
    pooled, lse = ops.patch_pool_fwd(qt, z, scale)
    dpooled = random_like(pooled)
    ref_pooled, ref_dqt, ref_dz = pool_expected(qt, z, scale, dpooled)
    _, ref_lse = pp.TorchPatchPool.fwd(qt.double(), z.double(), scale)
    assert lse.dtype == torch.float32
    assert_close(pooled, ref_pooled, dtype, "pooled")
    assert_close(lse, ref_lse, torch.float32, "lse")
    dqt, dz = ops.patch_pool_bwd(dpooled, qt, z, pooled, lse, scale, True)
    assert_close(dqt, ref_dqt, dtype, "dqt")
    assert_close(dz, ref_dz, dtype, "dz")
    dqt2, dz2 = ops.patch_pool_bwd(dpooled, qt, z, pooled, lse, scale, False)
    assert dz2.numel() == 0
    assert_close(dqt2, ref_dqt, dtype, "dqt without dz")


@needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("name", list(POOL_CASES))
def test_cuda_patch_pool_direct(name, dtype):
    check_pool_direct(OPS, name, dtype, "cuda")


@needs_cuda
@pytest.mark.parametrize("need_dz", [True, False])
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("name", ["primes", "vit_b16", "odd_rows"])
def test_cuda_patch_pool_dispatched(name, dtype, need_dz, monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "cuda")
    qt, z, scale = patch_pool_inputs(*POOL_CASES[name], dtype=dtype, device="cuda")
    qt.requires_grad_()
    z = z.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(need_dz)  # same values, non-contiguous
    assert isinstance(dispatch.choose("patch_pool", qt, z), _ext._Compiled)
    pooled = pp.patch_pool(qt, z, scale)
    dpooled = random_like(pooled)
    ref_pooled, ref_dqt, ref_dz = pool_expected(qt, z, scale, dpooled)
    grads = torch.autograd.grad(pooled, (qt, z) if need_dz else (qt,), dpooled)
    assert_close(pooled, ref_pooled, dtype, "pooled")
    assert_close(grads[0], ref_dqt, dtype, "dqt")
    if need_dz:
        assert_close(grads[1], ref_dz, dtype, "dz")


@needs_cuda
def test_cuda_argument_checks():
    args = make_inputs("mixed", torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="cu_q must be on the device of q"):
        OPS.prefix_attention_fwd(*args[:5], args[5].cpu(), *args[6:])
    with pytest.raises(RuntimeError, match="q must be float32, float16 or bfloat16"):
        OPS.prefix_attention_fwd(*[a.double() for a in args[:5]], *args[5:])
    with pytest.raises(RuntimeError, match=r"k\.shape\[2\] \(H"):
        OPS.prefix_attention_fwd(args[0], args[1][:, :, :1], *args[2:])
    qt, z, scale = patch_pool_inputs(3, 2, 5, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"qt\.shape\[1\] \(W"):
        OPS.patch_pool_fwd(qt[:, 1:], z, scale)
    with pytest.raises(RuntimeError, match="qt must be on the device of z"):
        OPS.patch_pool_fwd(qt.cpu(), z, scale)
    with pytest.raises(RuntimeError, match="z must be float32, float16 or bfloat16"):
        OPS.patch_pool_fwd(qt.double(), z.double(), scale)


# ---------------------------------------------------------------- CUDA kernels under CPU emulation (csrc/emu)

@pytest.fixture(scope="module")
def emulated():
    """torch.ops.intcoop_emu: the CUDA kernels and launchers of csrc/cuda compiled for the CPU emulation."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler for the CUDA emulation")
    path = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "emu" / "emulate.py"
    spec = importlib.util.spec_from_file_location("intcoop_cuda_emulation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load()


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("name", ["tiny", "eot_rows", "bottom_right", "many_short", "strided"])
def test_emulated_cuda_prefix_attention(emulated, name, dtype):
    check_prefix_direct(name, dtype, "cpu", ops=emulated)


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("name", ["one", "primes", "many_rows"])
def test_emulated_cuda_patch_pool(emulated, name, dtype):
    check_pool_direct(emulated, name, dtype, "cpu")
