"""prefix_attention's segment offsets: every malformed cu_q / cu_k / max_q / max_k is a ValueError naming it, on
every backend, before any work; host copies (`HostSegments`) check them without a device read; the Triton kernels
clamp their row ranges when handed malformed offsets directly.

Backends: torch and cpp on the CPU, triton through the interpreter on the CPU (on the GPU when there is one),
cuda on a GPU only.
"""
import pytest
import torch

from intcoop.ops import dispatch, segments
from intcoop.ops import prefix_attention as pa
from intcoop.ops.segments import HostSegments
from intcoop.testing import assert_close, prefix_attention_inputs

CUDA = torch.cuda.is_available()
LENS_K, LENS_Q = [3, 1, 5, 2], [2, 1, 5, 1]          # Tk = 11, Tq = 9; segment 2 is the longest (5)
BACKENDS = [("torch", "cpu"), ("cpp", "cpu"), ("triton", "cuda" if CUDA else "cpu"), ("cuda", "cuda")]


def _inputs(device):
    return prefix_attention_inputs(2, 3, LENS_K, 2, 16, lens_q=LENS_Q, device=device, seed=3)


def _force(monkeypatch, backend, device):
    if device == "cuda" and not CUDA:
        pytest.skip("no CUDA device")
    err = dispatch._BY_NAME[backend].load_error()
    if err:
        pytest.skip(f"the {backend} backend is not available here: {err}")
    monkeypatch.setenv(dispatch.ENV, backend)


def _at(i, f):
    return lambda a: a[:i] + (f(a[i]),) + a[i + 1:]


def _swap12(c):
    c = c.clone()
    c[1], c[2] = c[2].clone(), c[1].clone()
    return c


# (id, change to the 10 arguments, the ValueError's text)
MALFORMED = [
    ("cu_q_int64", _at(5, lambda c: c.long()), r"cu_q must be int32, got torch\.int64"),
    ("cu_k_float", _at(6, lambda c: c.float()), r"cu_k must be int32, got torch\.float32"),
    ("cu_q_2d", _at(5, lambda c: c[None]), r"cu_q must be 1-D \[S\+1\]"),
    ("cu_k_other_device", _at(6, lambda c: c.to("meta")), r"cu_k must be on q's device"),
    ("cu_q_not_at_0", _at(5, lambda c: c + 1), r"cu_q must start at 0, got cu_q\[0\] = 1"),
    ("cu_k_decreasing", _at(6, _swap12), r"cu_k must be non-decreasing, got cu_k\[1\] = 4 > cu_k\[2\] = 3"),
    ("cu_q_short_end", _at(5, lambda c: torch.cat([c[:-1], c[-1:] - 1])), r"cu_q must end at q\.shape\[1\] = 9"),
    ("cu_k_past_end", _at(6, lambda c: torch.cat([c[:-1], c[-1:] + 40])), r"cu_k must end at k\.shape\[1\] = 11"),
    ("cu_k_shorter", _at(6, lambda c: c[:-1]), r"cu_q and cu_k must have the same length S\+1.*got 5 and 4"),
    ("cu_q_empty", _at(5, lambda c: c[:0]), r"cu_q must be 1-D \[S\+1\]"),
    ("more_queries_than_keys", _at(6, lambda c: torch.tensor([0, 1, 3, 9, 11], dtype=c.dtype, device=c.device)),
     r"cu_k must give every segment at least as many keys as cu_q gives queries: segment 0 has 2 queries"),
    ("max_q_too_small", _at(7, lambda m: m - 1), r"max_q must be at least the longest query segment \(5\), got 4"),
    ("max_k_too_small", _at(8, lambda m: 2), r"max_k must be at least the longest key segment \(5\), got 2"),
]


@pytest.mark.parametrize("backend,device", BACKENDS, ids=[b for b, _ in BACKENDS])
def test_malformed_offsets_raise_on_every_backend(backend, device, monkeypatch):
    _force(monkeypatch, backend, device)
    args = _inputs(device)
    ref = pa.reference(*[t.double() for t in args[:5]], *args[5:7], args[9])
    assert_close(pa.prefix_attention(*args), ref, torch.float32, f"valid offsets on {backend}")
    chosen = []
    real = dispatch.choose
    monkeypatch.setattr(dispatch, "choose", lambda *a, **kw: chosen.append(a[0]) or real(*a, **kw))
    for name, change, needle in MALFORMED:
        with pytest.raises(ValueError, match=needle):
            pa.prefix_attention(*change(args))
    assert chosen == [], "a malformed offset reached a backend"


def test_direct_custom_op_call_checks_values():
    """torch.ops.intcoop.prefix_attention_fwd (validate defaults to True) reads the offsets and checks them."""
    args = _at(5, lambda c: torch.cat([c[:-1], c[-1:] + 3]))(_inputs("cpu"))
    with pytest.raises(ValueError, match=r"cu_q must end at q\.shape\[1\] = 9, got cu_q\[-1\] = 12"):
        torch.ops.intcoop.prefix_attention_fwd(*args)


def _no_device_reads(monkeypatch):
    def fail(*a):
        raise AssertionError("the offsets were read from the device although a host copy was given")
    monkeypatch.setattr(segments, "check_values_on_device", fail)
    monkeypatch.setattr(pa, "check_values_on_device", fail)


def test_host_copies_check_without_a_device_read(monkeypatch):
    args = _inputs("cpu")
    expected = pa.prefix_attention(*args)
    _no_device_reads(monkeypatch)
    hk = HostSegments.of(LENS_K)
    assert hk == HostSegments(count=4, total=11, longest=5, shortest=1)
    # lengths (checked one by one; summaries alone could not show len_q(s) <= len_k(s) here, see below)
    torch.testing.assert_close(pa.prefix_attention(*args, host_q=LENS_Q, host_k=LENS_K), expected, rtol=0, atol=0)
    eot = prefix_attention_inputs(2, 3, LENS_K, 2, 16, lens_q=[1] * 4, seed=3)
    pa.prefix_attention(*eot, host_q=HostSegments.uniform(4), host_k=hk)     # longest query <= shortest key
    same = prefix_attention_inputs(1, 2, LENS_K, 1, 8, seed=1)
    pa.prefix_attention(*same, host_q=hk, host_k=hk)                          # the same segments


@pytest.mark.parametrize("host_q,host_k,needle", [
    (HostSegments.of([2, 1, 5]), HostSegments.of(LENS_K), r"host_q describes 3 segments but cu_q has 5 entries"),
    (HostSegments.of([2, 1, 5, 2]), HostSegments.of(LENS_K), r"cu_q must end at q\.shape\[1\] = 9, got 10 "
                                                             r"\(from host_q\)"),
    (HostSegments.of(LENS_Q), HostSegments.of([3, 1, 6, 1]), r"max_k must be at least the longest key segment "
                                                             r"\(6\), got 5"),
    (LENS_Q, [3, 1, 4, 3], r"segment 2 has 5 queries and 4 keys"),
    ([2, 1, -5, 11], LENS_K, r"segment lengths must be >= 0, got -5"),
    ((2, 1, 5, 1), "2, 1, 5, 2", r"host_k must be a HostSegments or a list / tuple of segment lengths, got str"),
    ([2, 1, 5, 1], [3, 1, None, 2], r"segment lengths must be integers"),
])
def test_inconsistent_host_copies_raise(host_q, host_k, needle, monkeypatch):
    _no_device_reads(monkeypatch)
    with pytest.raises(ValueError, match=needle):
        pa.prefix_attention(*_inputs("cpu"), host_q=host_q, host_k=host_k)


def test_undecided_host_summaries_fall_back_to_the_device(monkeypatch):
    """Two different summaries whose ranges overlap cannot show len_q(s) <= len_k(s): the values are read."""
    reads = []
    real = segments.check_values_on_device
    monkeypatch.setattr(segments, "check_values_on_device", lambda *a: reads.append(1) or real(*a))
    pa.prefix_attention(*_inputs("cpu"), host_q=HostSegments.of(LENS_Q), host_k=HostSegments.of(LENS_K))
    assert reads == [1]
    pa.prefix_attention(*_inputs("cpu"))                      # no host copy: read as well
    assert reads == [1, 1]


def test_compiled_graph_without_host_copies_checks_in_the_op():
    """Under torch.compile the wrapper reads nothing from the device; the custom op's body checks the values."""
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: pa.prefix_attention(*a) * 2, backend="aot_eager", fullgraph=True)
    args = _inputs("cpu")
    assert_close(fn(*args), pa.prefix_attention(*args) * 2, torch.float32)
    bad = _at(6, lambda c: torch.tensor([0, 3, 4, 9, 12], dtype=torch.int32))(args)
    with pytest.raises(ValueError, match=r"cu_k must end at k\.shape\[1\] = 11, got cu_k\[-1\] = 12"):
        fn(*bad)


def test_text_encoder_passes_host_copies(clip_tiny, monkeypatch):
    """encode_prompts (whole and chunked over classes) checks every offset from ClassSuffixes' host copy."""
    from intcoop.text import class_suffixes, encode_prompts

    names = ["tree frog", "crane", "x", "t-shirt/top"]
    suf = class_suffixes(clip_tiny.tokenizer, names, "{}.", 4)
    assert suf.host == HostSegments.of(suf.lengths) and suf.chunk(1, 3).host == HostSegments.of(suf.lengths[1:3])
    prefix = torch.randn(2, 4, clip_tiny.model.token_embedding.weight.shape[1],
                         generator=torch.Generator().manual_seed(0)) * 0.02
    _no_device_reads(monkeypatch)
    whole = encode_prompts(clip_tiny, prefix, names)
    assert_close(encode_prompts(clip_tiny, prefix, names, max_rows=7), whole, torch.float32)


# ------------------------------------------------------------------------- the kernels' second line of defence

def test_triton_kernels_clamp_malformed_offsets():
    """Handed malformed offsets directly (no wrapper), the Triton launchers read only rows of q / k / v: the
    results are finite, and the rows whose segments are well formed equal the reference."""
    if not CUDA and not dispatch._interpreting():
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
    pytest.importorskip("triton")
    from intcoop.kernels import prefix_attention as kpa

    device = "cuda" if CUDA else "cpu"
    q, k, v, pk, pv, cu_q, cu_k, max_q, max_k, scale = _inputs(device)
    bad_k = cu_k.clone()
    bad_k[-1] += 4096                                 # the last segment claims 4096 keys past the end of k
    bad_q = cu_q.clone()
    bad_q[-1] += 4096
    out, lse = kpa.fwd(q, k, v, pk, pv, cu_q, bad_k, max_q, max_k + 4096, scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref = pa.reference(*[t.double() for t in (q, k, v, pk, pv)], cu_q, cu_k, scale)
    first = int(cu_q[-2])                             # rows of the well-formed segments
    assert_close(out[:, :first], ref[:, :first], torch.float32)
    dout = torch.randn_like(out)
    grads = kpa.bwd(dout, q, k, v, pk, pv, out, lse, bad_q, bad_k, max_q + 4096, max_k + 4096, scale)
    assert all(torch.isfinite(g).all() for g in grads)
