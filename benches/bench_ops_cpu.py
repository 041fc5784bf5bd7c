"""The C++/OpenMP CPU prefix_attention (intcoop._C, backend "cpp") against the torch backend, on the CPU.

Realistic fp32 sizes from the text encoder: B = 8 images x N = 100 prompts and B = 2 x N = 1000, H = 8, Dh = 64,
P = 6, suffix lengths 2..14 (mean ~4.2); q, k, v are strided views of one fused QKV output. "causal" is an
ordinary layer (every suffix row queries), "eot" the last layer (one query per prompt, forward only). Both
backends get the same inputs and their outputs (and gradients) are checked equal inside each bench; the
closing table gives both medians and the ratio. 2 threads (benches/conftest.py pins them).
Run: pytest -q benches/bench_ops_cpu.py
"""
from __future__ import annotations

import os

import pytest
import torch

from intcoop.ops import _ext
from intcoop.ops.prefix_attention import TorchPrefixAttention
from intcoop.benchmarking import suffix_lengths
from intcoop.testing import assert_close, cu_seqlens

torch.set_num_threads(2)
H, DH, P = 8, 64, 6
SIZES = {"B8xN100": (8, 100), "B2xN1000": (2, 1000)}
ROUNDS = 7
_MEDIANS: dict[tuple, dict[str, float]] = {}



def _inputs(size: str, layer: str):
    B, N = SIZES[size]
    lens_k = suffix_lengths(N, 0)
    lens_q = lens_k if layer == "causal" else [1] * N
    Tq, Tk = sum(lens_q), sum(lens_k)
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, Tk, 3, H, DH, generator=g)                  # fused QKV output: q, k, v are views
    q = qkv[:, :, 0] if layer == "causal" else qkv[:, torch.tensor(lens_k).cumsum(0) - 1, 0]
    args = (q, qkv[:, :, 1], qkv[:, :, 2], torch.randn(B, P, H, DH, generator=g), torch.randn(B, P, H, DH, generator=g),
            cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k), DH ** -0.5)
    return args, torch.randn(B, Tq, H, DH, generator=g)


def _backend(name: str):
    if name == "torch":
        return TorchPrefixAttention
    if _ext.load_error() or not _ext.has_kernel("prefix_attention_fwd", "cpu"):
        if os.environ.get("INTCOOP_SKIP_EXT") == "1":
            pytest.skip("INTCOOP_SKIP_EXT=1: intcoop._C was not built")
        raise RuntimeError(f"the C++ op is missing: {_ext.load_error() or 'no CPU kernel in intcoop._C'}")
    return _ext.ops("cpu")["prefix_attention"]


def _fwd_bwd(impl, args, dout):
    q, k, v, pk, pv, cu_q, cu_k, mq, mk, scale = args
    out, lse = impl.fwd(*args)
    return (out, lse), impl.bwd(dout, q, k, v, pk, pv, out, lse, cu_q, cu_k, mq, mk, scale)


def _record(benchmark, record, key, backend, seconds):
    """Keep the median; once both backends of a case have run, add their side-by-side row."""
    ms = seconds * 1e3
    benchmark.extra_info.update(backend=backend, median_ms=ms, threads=torch.get_num_threads())
    _MEDIANS.setdefault(key, {})[backend] = ms
    both = _MEDIANS[key]
    if len(both) == 2:
        record(bench=f"cpu prefix_attention {key[0]}", case=f"{key[1]} {key[2]}", cpp_ms=both["cpp"],
               torch_ms=both["torch"], torch_over_cpp=both["torch"] / both["cpp"])


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("layer", ["causal", "eot"])
@pytest.mark.parametrize("size", list(SIZES))
def test_prefix_attention_fwd(benchmark, timed, record, size, layer, backend):
    impl, other = _backend(backend), TorchPrefixAttention if backend == "cpp" else _backend("cpp")
    args, _ = _inputs(size, layer)
    benchmark.group = f"prefix_attention fwd {size} {layer}"
    t, (out, lse) = timed(impl.fwd, ROUNDS, args=args)
    ref_out, ref_lse = other.fwd(*args)
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")
    _record(benchmark, record, ("fwd", size, layer), backend, t)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("size", list(SIZES))
def test_prefix_attention_fwd_bwd(benchmark, timed, record, size, backend):
    impl, other = _backend(backend), TorchPrefixAttention if backend == "cpp" else _backend("cpp")
    args, dout = _inputs(size, "causal")
    benchmark.group = f"prefix_attention fwd+bwd {size} causal"
    t, ((out, lse), grads) = timed(_fwd_bwd, ROUNDS, args=(impl, args, dout))
    (ref_out, _), ref_grads = _fwd_bwd(other, args, dout)
    assert_close(out, ref_out, torch.float32, "out")
    for name, g, r in zip(("dq", "dk", "dv", "dpk", "dpv"), grads, ref_grads):
        assert_close(g, r, torch.float32, name)
    _record(benchmark, record, ("fwd+bwd", size, "causal"), backend, t)
