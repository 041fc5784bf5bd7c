"""torch SDPA as the baseline of prefix attention, at the realistic bf16 sizes of bench_kernels.py (same cases,
same roofline figures), benched in a file of its own.

SDPA needs a padded layout: each of the B x N = 256,000 prompts padded to max_q queries and P + max_k keys with a
boolean mask (padding done outside the timing). A batch of 256,000 is past the 65,535 of a CUDA grid's y/z
dimension, which some SDPA kernels put it in: a kernel may refuse it (the bench then runs SDPA in chunks of
65,535 prompts and says so in the row) or fault the process. So scripts/gpu_check.sh runs this file last, in its
own processes (forward, then backward), after everything else has been measured.
Run: pytest benches/bench_sdpa_baseline.py (needs a CUDA device; INTCOOP_BENCH_REHEARSE=1: toy sizes on a CPU).
"""
from __future__ import annotations

import pytest
import torch

from intcoop.benchmarking import gpu_bench_device
from intcoop.ops.prefix_attention import padded_index

if gpu_bench_device() is None:
    pytest.skip("needs a CUDA device", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402
from bench_kernels import CHECK, DEV, DH, H, P, SHAPE, _check_prefix, _prefix_case, _report  # noqa: E402

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


def padded(case, q, k, v, pk, pv):
    """Differentiable gather of a PrefixCase's packed rows into SDPA's layout: q [nb*S, H, mq, Dh],
    k/v [nb*S, H, P+mk, Dh], mask [nb*S, 1, mq, P+mk], and the valid query slots [S, mq]."""
    _, _, _, _, _, cu_q, cu_k, mq, mk, _ = case.args
    iq, vq, _ = padded_index(cu_q, mq)
    ik, vk, _ = padded_index(cu_k, mk)
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


def sdpa_packed(case, q, k, v, pk, pv):
    """SDPA on the padded layout, gathered back to packed rows: out [nb, Tq, H, Dh] (differentiable)."""
    qp, kp, vp, mask, vq = padded(case, q, k, v, pk, pv)
    o = _sdpa(qp, kp, vp, mask, case.args[-1])
    return o.transpose(1, 2).reshape(q.shape[0], vq.shape[0], vq.shape[1], H, DH)[:, vq]


def _provider():
    return "sdpa" + (" (in chunks of 65,535 prompts)" if _SDPA_CHUNKED else "")


@pytest.mark.parametrize("layer", ["causal", "eot"])
def test_prefix_attention_sdpa_fwd(benchmark, record, layer):
    case = _prefix_case(layer)
    a = case.args
    _check_prefix(case, "sdpa", sdpa_packed(case, *[t[CHECK] for t in a[:5]]), picked=True)
    qp, kp, vp, mask, _ = padded(case, *a[:5])
    fn = lambda: _sdpa(qp, kp, vp, mask, a[-1])  # noqa: E731
    fn()                                              # the whole batch once: learns whether it must be chunked
    _report(benchmark, record, fn, case.fwd_flops, case.fwd_bytes, op="prefix_attention", direction="fwd",
            layer=layer, provider=_provider(), shape=SHAPE)


@pytest.mark.parametrize("layer", ["causal", "eot"])
def test_prefix_attention_sdpa_bwd(benchmark, record, layer):
    case = _prefix_case(layer)
    a, dout = case.args, case.dout
    small = [t[CHECK].detach().requires_grad_(True) for t in a[:5]]
    out = sdpa_packed(case, *small)
    grads = torch.autograd.grad(out, small, dout[CHECK])
    _check_prefix(case, "sdpa", out.detach(), grads, picked=True)
    qp, kp, vp, mask, _ = padded(case, *a[:5])
    qp, kp, vp = (t.detach().requires_grad_(True) for t in (qp, kp, vp))
    o = _sdpa(qp, kp, vp, mask, a[-1])
    dop = torch.randn_like(o)
    _report(benchmark, record, lambda: torch.autograd.grad(o, (qp, kp, vp), dop, retain_graph=True),
            2.5 * case.fwd_flops, case.bwd_bytes, op="prefix_attention", direction="bwd", layer=layer,
            provider=_provider(), shape=SHAPE)

