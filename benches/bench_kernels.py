"""The Triton kernels (intcoop.kernels) against the torch backend (and torch SDPA for patch_pool), forward and
backward, on a GPU.

Realistic bf16 sizes: prefix attention at B = 256 images x N = 1000 prompts (suffix lengths 2..14, mean ~4.2),
H = 8, Dh = 64, P = 6, both for an ordinary layer (every suffix row) and the last layer (EOT rows only);
patch_pool at B = 256, R = 32, L = 197, W = 768. torch SDPA on prefix attention needs a padded batch of
B x N = 256,000 prompts, past a CUDA grid limit, which can fault the process: it is benched apart, in
benches/bench_sdpa_baseline.py (its own process, last, in scripts/gpu_check.sh), with the cases defined here.
Device time: `triton.testing.do_bench` median (L2 flushed between runs) in benchmark.extra_info, with GB/s,
TFLOP/s and the fraction of the H200 roofline (useful bytes and FLOPs of the op, the same for every provider;
the bound is max(bytes / 4.8 TB/s, FLOPs / 989 TFLOP/s)). pytest-benchmark's own number is the host clock
around one synchronised call. Each case first checks its outputs against the torch backend in fp32, on images
0, 1, B-2 and B-1 (the first and last programs of the batch dimension).
Run: pytest benches/bench_kernels.py (needs a CUDA device). INTCOOP_BENCH_REHEARSE=1 runs the same code on a CPU
at toy sizes, Triton through its interpreter and the host clock for timing: a check of this file before a GPU
run (tests/test_bench_rehearsal.py does it in CI), whose figures mean nothing.
"""
from __future__ import annotations

import pytest
import torch

from intcoop.benchmarking import gpu_bench_device, suffix_lengths, wall_median, wall_time

DEV = gpu_bench_device()
if DEV is None:
    pytest.skip("needs a CUDA device", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from intcoop.kernels import patch_pool as kpp  # noqa: E402
from intcoop.kernels import prefix_attention as kpa  # noqa: E402
from intcoop.ops.patch_pool import TorchPatchPool  # noqa: E402
from intcoop.ops.prefix_attention import TorchPrefixAttention  # noqa: E402
from intcoop.testing import assert_close, cu_seqlens  # noqa: E402

HBM_BYTES_S = 4.8e12          # H200 HBM3e
PEAK_FLOP_S = 989e12          # H100/H200 dense bf16
DT = torch.bfloat16
B, N, H, DH, P = (256, 1000, 8, 64, 6) if DEV == "cuda" else (2, 9, 2, 64, 6)
PP_R, PP_L, PP_W = 32, 197, 768
CHECK = sorted({0, 1, B - 2, B - 1})   # images compared with the fp32 torch backend: both ends of the batch


def _report(benchmark, record, fn, flops: float, nbytes: float, op: str, **row):
    """Time fn on the device (median) and the host (pedantic), store both and the roofline fraction."""
    ms = do_bench(fn, warmup=25, rep=100, return_mode="median") if DEV == "cuda" else 1e3 * wall_median(fn, 2)[0]
    floor_s = max(nbytes / HBM_BYTES_S, flops / PEAK_FLOP_S)
    info = dict(row, median_ms=ms, GB_s=nbytes / ms / 1e6, TFLOP_s=flops / ms / 1e9,
                roofline_fraction=floor_s / (ms * 1e-3),
                bound="memory" if nbytes / HBM_BYTES_S >= flops / PEAK_FLOP_S else "compute",
                device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (rehearsal)",
                torch=torch.__version__, triton=triton.__version__)
    benchmark.extra_info.update(info)
    record(bench=f"kernel {op}", **{k: v for k, v in info.items() if k not in ("device", "torch", "triton")})

    benchmark.pedantic(lambda: wall_time(fn), rounds=5 if DEV == "cuda" else 1, iterations=1, warmup_rounds=1)


# ------------------------------------------------------------------------------------------ prefix attention


class PrefixCase:
    """Packed inputs and the op's useful FLOPs and bytes (bench_sdpa_baseline.py pads them for SDPA)."""

    def __init__(self, layer: str):
        lens_k = suffix_lengths(N, 0)
        lens_q = lens_k if layer == "causal" else [1] * N
        g = torch.Generator(device=DEV).manual_seed(1)
        Tq, Tk = sum(lens_q), sum(lens_k)

        def rnd(*shape):
            return torch.randn(*shape, generator=g, device=DEV, dtype=DT)
        qkv = rnd(B, Tk, 3, H, DH)                      # the fused QKV output: q, k, v are strided views
        q = qkv[:, Tk - Tq:, 0] if layer == "causal" else qkv[:, torch.tensor(lens_k, device=DEV).cumsum(0) - 1, 0]
        self.args = (q, qkv[:, :, 1], qkv[:, :, 2], rnd(B, P, H, DH), rnd(B, P, H, DH),
                     cu_seqlens(lens_q, DEV), cu_seqlens(lens_k, DEV), max(lens_q), max(lens_k), DH ** -0.5)
        self.dout = rnd(B, Tq, H, DH)
        visible = sum(lq * P + sum(i + 1 + lk - lq for i in range(lq)) for lq, lk in zip(lens_q, lens_k))
        self.fwd_flops = 4.0 * B * H * DH * visible
        elem, row = 2, H * DH
        io = elem * row * (2 * Tq + 2 * Tk + 2 * P) * B          # q, out, k, v, pk, pv
        self.fwd_bytes = io + 4 * B * H * Tq
        self.bwd_bytes = 2 * io + 4 * B * H * Tq       # reads q k v pk pv out dout lse, writes the 5 grads


_PREFIX_CASES: dict[str, PrefixCase] = {}


def _prefix_case(layer):
    if layer not in _PREFIX_CASES:
        _PREFIX_CASES.clear()                          # one realistic case in memory at a time
        if DEV == "cuda":
            torch.cuda.empty_cache()
        _PREFIX_CASES[layer] = PrefixCase(layer)
    return _PREFIX_CASES[layer]


def _check_prefix(case, provider, out, grads=None, picked=False):
    """The CHECK images of a provider's results against the torch backend in fp32. out (and grads) are full
    [B, ...] results, or those of the CHECK images alone when picked=True."""
    q, k, v, pk, pv, cu_q, cu_k, mq, mk, scale = case.args
    small = [t[CHECK].float() for t in (q, k, v, pk, pv)]
    ref_out, ref_lse = TorchPrefixAttention.fwd(*small, cu_q, cu_k, mq, mk, scale)

    def pick(t):
        return t if picked else t[CHECK]
    assert_close(pick(out), ref_out, DT, f"{provider} out")
    if grads is not None:
        ref = TorchPrefixAttention.bwd(case.dout[CHECK].float(), *small, ref_out, ref_lse, cu_q, cu_k, mq, mk,
                                       scale)
        for name, g, r in zip(("dq", "dk", "dv", "dpk", "dpv"), grads, ref):
            assert_close(pick(g), r, DT, f"{provider} {name}")


PREFIX_PROVIDERS = ["triton", "torch"]     # torch SDPA: benches/bench_sdpa_baseline.py
POOL_PROVIDERS = ["triton", "torch", "sdpa"]
SHAPE = f"B{B} N{N} H{H} Dh{DH} P{P}"


@pytest.mark.parametrize("provider", PREFIX_PROVIDERS)
@pytest.mark.parametrize("layer", ["causal", "eot"])
def test_prefix_attention_fwd(benchmark, record, layer, provider):
    case = _prefix_case(layer)
    a = case.args
    impl = kpa.TritonPrefixAttention if provider == "triton" else TorchPrefixAttention
    try:
        _check_prefix(case, provider, impl.fwd(*a)[0])
    except torch.OutOfMemoryError:
        if provider == "triton":                     # our kernel must fit: an OOM there is a failure
            raise
        pytest.skip(f"the padded torch baseline runs out of GPU memory at B={B}, N={N}")
    _report(benchmark, record, lambda: impl.fwd(*a), case.fwd_flops, case.fwd_bytes, op="prefix_attention",
            direction="fwd", layer=layer, provider=provider, shape=SHAPE)


@pytest.mark.parametrize("provider", PREFIX_PROVIDERS)
@pytest.mark.parametrize("layer", ["causal", "eot"])
def test_prefix_attention_bwd(benchmark, record, layer, provider):
    case = _prefix_case(layer)
    a, dout = case.args, case.dout
    impl = kpa.TritonPrefixAttention if provider == "triton" else TorchPrefixAttention
    try:
        out, lse = impl.fwd(*a)
        grads = impl.bwd(dout, *a[:5], out, lse, *a[5:])
        _check_prefix(case, provider, out, grads)
    except torch.OutOfMemoryError:
        if provider == "triton":                     # our kernel must fit: an OOM there is a failure
            raise
        pytest.skip(f"the padded torch baseline runs out of GPU memory at B={B}, N={N}")
    del grads
    _report(benchmark, record, lambda: impl.bwd(dout, *a[:5], out, lse, *a[5:]), 2.5 * case.fwd_flops,
            case.bwd_bytes, op="prefix_attention", direction="bwd", layer=layer, provider=provider, shape=SHAPE)


# ------------------------------------------------------------------------------------------------ patch pool

@pytest.fixture(scope="module")
def pool_case():
    g = torch.Generator(device=DEV).manual_seed(2)
    qt = (torch.randn(PP_R, PP_W, generator=g, device=DEV) * 0.5).to(DT)
    z = torch.randn(B, PP_L, PP_W, generator=g, device=DEV).to(DT)
    dpooled = torch.randn(B, PP_R, PP_W, generator=g, device=DEV).to(DT)
    brlw, elem = B * PP_R * PP_L * PP_W, 2
    z_bytes, q_bytes, o_bytes = elem * B * PP_L * PP_W, elem * PP_R * PP_W, elem * B * PP_R * PP_W
    return dict(qt=qt, z=z, dpooled=dpooled, scale=64 ** -0.5,
                fwd=(4.0 * brlw, z_bytes + q_bytes + o_bytes + 4 * B * PP_R),
                # useful backward FLOPs: dprob, dqt, dz (score recompute not counted); reads z, dpooled, pooled,
                # qt, lse; writes dz, dqt
                bwd=(8.0 * brlw, 2 * z_bytes + 2 * q_bytes + 2 * o_bytes + 4 * B * PP_R))


def _sdpa_pool(qt, z, scale):
    q = qt[None, None].expand(z.shape[0], 1, *qt.shape)             # [B, 1, R, W]: one head of width W
    return F.scaled_dot_product_attention(q, z[:, None], z[:, None], scale=scale)[:, 0]


def _check_pool(c, provider, pooled, grads=None):
    qt, z = c["qt"].float(), c["z"].float()
    ref, lse = TorchPatchPool.fwd(qt, z, c["scale"])
    assert_close(pooled, ref, DT, f"{provider} pooled")
    if grads is not None:
        rdqt, rdz = TorchPatchPool.bwd(c["dpooled"].float(), qt, z, ref, lse, c["scale"], True)
        assert_close(grads[0], rdqt, DT, f"{provider} dqt")
        assert_close(grads[1], rdz, DT, f"{provider} dz")


@pytest.mark.parametrize("provider", POOL_PROVIDERS)
def test_patch_pool_fwd(benchmark, record, pool_case, provider):
    c = pool_case
    if provider == "sdpa":
        fn = lambda: _sdpa_pool(c["qt"], c["z"], c["scale"])  # noqa: E731
    else:
        impl = kpp.TritonPatchPool if provider == "triton" else TorchPatchPool
        fn = lambda: impl.fwd(c["qt"], c["z"], c["scale"])[0]  # noqa: E731
    _check_pool(c, provider, fn())
    _report(benchmark, record, fn, *c["fwd"], op="patch_pool", direction="fwd", provider=provider,
            shape=f"B{B} R{PP_R} L{PP_L} W{PP_W}")


@pytest.mark.parametrize("provider", POOL_PROVIDERS)
def test_patch_pool_bwd(benchmark, record, pool_case, provider):
    c = pool_case
    if provider == "sdpa":
        qt, z = (c[n].detach().requires_grad_(True) for n in ("qt", "z"))
        out = _sdpa_pool(qt, z, c["scale"])
        fn = lambda: torch.autograd.grad(out, (qt, z), c["dpooled"], retain_graph=True)  # noqa: E731
        _check_pool(c, provider, out.detach(), fn())
    else:
        impl = kpp.TritonPatchPool if provider == "triton" else TorchPatchPool
        pooled, lse = impl.fwd(c["qt"], c["z"], c["scale"])
        fn = lambda: impl.bwd(c["dpooled"], c["qt"], c["z"], pooled, lse, c["scale"], True)  # noqa: E731
        _check_pool(c, provider, pooled, fn())
    _report(benchmark, record, fn, *c["bwd"], op="patch_pool", direction="bwd", provider=provider,
            shape=f"B{B} R{PP_R} L{PP_L} W{PP_W}")
