"""The Triton kernels (intcoop.kernels) against the torch backend and torch SDPA, forward and backward, on a GPU.

Realistic bf16 sizes: prefix attention at B = 256 images x N = 1000 prompts (suffix lengths 2..14, mean ~4.2),
H = 8, Dh = 64, P = 6, both for an ordinary layer (every suffix row) and the last layer (EOT rows only);
patch_pool at B = 256, R = 32, L = 197, W = 768. SDPA runs the same attention on the padded layout it needs
(each prompt padded to max_q queries and P + max_k keys, boolean mask), padding done outside the timing.
Device time: `triton.testing.do_bench` median (L2 flushed between runs) in benchmark.extra_info, with GB/s,
TFLOP/s and the fraction of the H200 roofline (useful bytes and FLOPs of the op, the same for every provider;
the bound is max(bytes / 4.8 TB/s, FLOPs / 989 TFLOP/s)). pytest-benchmark's own number is the host clock
around one synchronised call. Each case first checks its outputs against the torch backend in fp32.
Run: pytest benches/bench_kernels.py (needs a CUDA device). INTCOOP_BENCH_REHEARSE=1 runs the same code on a CPU
at toy sizes, Triton through its interpreter and the host clock for timing: a check of this file before a GPU
run (tests/test_bench_rehearsal.py does it in CI), whose figures mean nothing.
"""
from __future__ import annotations

import pytest
import torch

from intcoop.testing import gpu_bench_device, wall_median, wall_time

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
N_CHECK = 4                   # images compared with the fp32 torch backend


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

def _lengths(n: int, seed: int) -> list[int]:
    """Suffix lengths ("name . EOT" tokens) of n prompts: 2..14, mean about 4.2."""
    g = torch.Generator().manual_seed(seed)
    return (2 + torch.poisson(torch.full((n,), 2.2), generator=g)).clamp(max=14).long().tolist()


class PrefixCase:
    """Packed inputs, their padded SDPA layout, and the op's useful FLOPs and bytes."""

    def __init__(self, layer: str):
        lens_k = _lengths(N, 0)
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

    def padded(self, q, k, v, pk, pv):
        """Differentiable gather into SDPA's layout: q [B*S, H, mq, Dh], k/v [B*S, H, P+mk, Dh], mask."""
        _, _, _, _, _, cu_q, cu_k, mq, mk, _ = self.args
        iq, vq = _pad_index(cu_q, mq)
        ik, vk = _pad_index(cu_k, mk)
        nb, S = q.shape[0], iq.shape[0]

        def heads_first(t):                              # [nb, S, len, H, Dh] -> [nb*S, H, len, Dh]
            return t.reshape(nb * S, *t.shape[2:]).transpose(1, 2)
        qp = heads_first(q[:, iq])
        kp = heads_first(torch.cat([pk[:, None].expand(nb, S, P, H, DH), k[:, ik]], 2))
        vp = heads_first(torch.cat([pv[:, None].expand(nb, S, P, H, DH), v[:, ik]], 2))
        i = torch.arange(mq, device=DEV)[None, :, None]
        j = torch.arange(mk, device=DEV)[None, None, :]
        lq, lk = (cu_q[1:] - cu_q[:-1])[:, None, None], (cu_k[1:] - cu_k[:-1])[:, None, None]
        suffix_ok = vk[:, None, :] & (j <= i + lk - lq)
        mask = torch.cat([torch.ones(S, mq, P, dtype=torch.bool, device=DEV), suffix_ok], 2)
        return qp, kp, vp, mask[None, :, None].expand(nb, S, 1, mq, P + mk).reshape(nb * S, 1, mq, P + mk), vq

    def sdpa_packed(self, q, k, v, pk, pv):
        """SDPA on the padded layout, gathered back to packed rows: out [B, Tq, H, Dh] (differentiable)."""
        qp, kp, vp, mask, vq = self.padded(q, k, v, pk, pv)
        o = _sdpa(qp, kp, vp, mask, self.args[-1])
        return o.transpose(1, 2).reshape(q.shape[0], vq.shape[0], vq.shape[1], H, DH)[:, vq]


SDPA_MAX_BATCH = 65535        # a CUDA grid dimension; some SDPA kernels put the batch there
_SDPA_CHUNKED: set = set()    # shapes whose SDPA call had to be split (named in the results)


def _sdpa(q, k, v, mask, scale):
    """SDPA over [B*S, H, len, Dh]; if a kernel refuses the batch of B*S = 256,000 prompts, in chunks of 65,535."""
    if q.shape[0] <= SDPA_MAX_BATCH or q.shape not in _SDPA_CHUNKED:
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        except RuntimeError:
            if q.shape[0] <= SDPA_MAX_BATCH:
                raise
            _SDPA_CHUNKED.add(q.shape)
    return torch.cat([F.scaled_dot_product_attention(q[i:i + SDPA_MAX_BATCH], k[i:i + SDPA_MAX_BATCH],
                                                     v[i:i + SDPA_MAX_BATCH], attn_mask=mask[i:i + SDPA_MAX_BATCH],
                                                     scale=scale) for i in range(0, q.shape[0], SDPA_MAX_BATCH)])


def _pad_index(cu, width):
    lens = cu[1:] - cu[:-1]
    pos = torch.arange(width, device=cu.device)
    valid = pos[None, :] < lens[:, None]
    return torch.where(valid, cu[:-1, None].long() + pos[None, :], 0), valid


_PREFIX_CASES: dict[str, PrefixCase] = {}


def _prefix_case(layer):
    if layer not in _PREFIX_CASES:
        _PREFIX_CASES.clear()                          # one realistic case in memory at a time
        if DEV == "cuda":
            torch.cuda.empty_cache()
        _PREFIX_CASES[layer] = PrefixCase(layer)
    return _PREFIX_CASES[layer]


def _check_prefix(case, provider, out, grads=None):
    """The first N_CHECK images of a provider's results against the torch backend in fp32."""
    q, k, v, pk, pv, cu_q, cu_k, mq, mk, scale = case.args
    small = [t[:N_CHECK].float() for t in (q, k, v, pk, pv)]
    ref_out, ref_lse = TorchPrefixAttention.fwd(*small, cu_q, cu_k, mq, mk, scale)
    assert_close(out[:N_CHECK], ref_out, DT, f"{provider} out")
    if grads is not None:
        ref = TorchPrefixAttention.bwd(case.dout[:N_CHECK].float(), *small, ref_out, ref_lse, cu_q, cu_k, mq, mk,
                                       scale)
        for name, g, r in zip(("dq", "dk", "dv", "dpk", "dpv"), grads, ref):
            assert_close(g[:N_CHECK], r, DT, f"{provider} {name}")


PROVIDERS = ["triton", "torch", "sdpa"]


def _name(provider):
    return provider + (" (in chunks of 65,535 prompts)" if provider == "sdpa" and _SDPA_CHUNKED else "")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layer", ["causal", "eot"])
def test_prefix_attention_fwd(benchmark, record, layer, provider):
    case = _prefix_case(layer)
    a = case.args
    if provider == "sdpa":
        _check_prefix(case, provider, case.sdpa_packed(*a[:5]))
        qp, kp, vp, mask, _ = case.padded(*a[:5])
        fn = lambda: _sdpa(qp, kp, vp, mask, a[-1])  # noqa: E731
    else:
        impl = kpa.TritonPrefixAttention if provider == "triton" else TorchPrefixAttention
        try:
            _check_prefix(case, provider, impl.fwd(*a)[0])
        except torch.OutOfMemoryError:
            pytest.skip(f"the {provider} backend runs out of GPU memory at B={B}, N={N}")
        fn = lambda: impl.fwd(*a)  # noqa: E731
    _report(benchmark, record, fn, case.fwd_flops, case.fwd_bytes, op="prefix_attention", direction="fwd",
            layer=layer, provider=_name(provider), shape=f"B{B} N{N} H{H} Dh{DH} P{P}")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layer", ["causal", "eot"])
def test_prefix_attention_bwd(benchmark, record, layer, provider):
    case = _prefix_case(layer)
    a, dout = case.args, case.dout
    if provider == "sdpa":
        small = [t[:N_CHECK].detach().requires_grad_(True) for t in a[:5]]
        out = case.sdpa_packed(*small)
        grads = torch.autograd.grad(out, small, dout[:N_CHECK])
        _check_prefix(case, provider, out.detach(), grads)
        qp, kp, vp, mask, _ = case.padded(*a[:5])
        qp, kp, vp = (t.detach().requires_grad_(True) for t in (qp, kp, vp))
        o = _sdpa(qp, kp, vp, mask, a[-1])
        dop = torch.randn_like(o)
        fn = lambda: torch.autograd.grad(o, (qp, kp, vp), dop, retain_graph=True)  # noqa: E731
    else:
        impl = kpa.TritonPrefixAttention if provider == "triton" else TorchPrefixAttention
        try:
            out, lse = impl.fwd(*a)
            grads = impl.bwd(dout, *a[:5], out, lse, *a[5:])
            _check_prefix(case, provider, out, grads)
        except torch.OutOfMemoryError:
            pytest.skip(f"the {provider} backend runs out of GPU memory at B={B}, N={N}")
        del grads
        fn = lambda: impl.bwd(dout, *a[:5], out, lse, *a[5:])  # noqa: E731
    _report(benchmark, record, fn, 2.5 * case.fwd_flops, case.bwd_bytes, op="prefix_attention", direction="bwd",
            layer=layer, provider=_name(provider), shape=f"B{B} N{N} H{H} Dh{DH} P{P}")


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


@pytest.mark.parametrize("provider", PROVIDERS)
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


@pytest.mark.parametrize("provider", PROVIDERS)
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
