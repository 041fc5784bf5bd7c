"""fp32 and bf16 side by side, in one run: encode_prompts, fast_logits and a training step, each against the
CoCoOp-style 77-token loop in the same dtype (`intcoop.reference`), and each row's fraction of its matmul floor.

The floor: the matmul FLOPs of the work (`image_tower_flops`: the ViT's patch embedding, QKV / out-projection / MLP
GEMMs and attention products; `text_flops`: the suffix-only text side as `text.TextTower` runs it: prefix pass,
layer-0 QKV once per class, last layer at EOT only) divided by this machine's GEMM rate for that dtype, measured
in the same run (`gemm_rate`: torch.mm at the text and image towers' MLP shapes, measured again right after each
row's timing, since a shared CPU's load drifts). `floor_x` = time / floor; the
targets (printed, not asserted: this is a bench) are fast_logits within 1.25x of the floor in bf16 and 1.15x in
fp32 at 8 x 100 and 2 x 1000. A training step starts from the frozen tower's cached outputs (as
`train.cache_features` does); its floor is 2 x the text FLOPs (forward, and the backward's input gradients: the
frozen weights get none). bf16 is the model stored in bf16 (`precision="bf16"`); the prompt learner stays fp32.

The default run is short (B = 2, N = 100; the loop on one image, compared per image). INTCOOP_BENCH_PRECISION_FULL=1
adds the target shapes (8 x 100, 2 x 1000, a 4 x 100 step) and compiled fast_logits, whose compile time (first
call minus an eager call) is reported on its own row. INTCOOP_BENCH_LOOP_MAX_N=100 skips the loop above N = 100.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

import intcoop
from intcoop.config import TrainConfig
from intcoop.inference import slow_matmul_note
from intcoop.model import PRECISIONS
from intcoop.reference import encode_prompts_reference, reference_logits
from intcoop.testing import PRECISION_TOLERANCES
from intcoop.benchmarking import skip_slow_precision, wall_median, wall_time
from intcoop.train.step import StepModule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FULL = os.environ.get("INTCOOP_BENCH_PRECISION_FULL") == "1"
NEEDS_FULL = pytest.mark.skipif(not FULL, reason="a target shape (minutes on 2 cores): "
                                "set INTCOOP_BENCH_PRECISION_FULL=1")
TARGET = {"fp32": 1.15, "bf16": 1.25}
PRECS = ["fp32", "bf16"]


# ------------------------------------------------------------------------------------------------ counting
def image_tower_flops(visual) -> float:
    """Matmul FLOPs of one image through an open_clip VisionTransformer (2 per multiply-add)."""
    W = visual.conv1.out_channels
    L = visual.positional_embedding.shape[0]                     # tokens, class token included
    f = 2.0 * (L - 1) * visual.conv1.weight[0].numel() * W       # the patch embedding
    for blk in visual.transformer.resblocks:
        mlp = blk.mlp.c_fc.out_features
        f += 2.0 * L * (4 * W * W + 2 * W * mlp) + 4.0 * L * L * W
    return f + (2.0 * W * visual.proj.shape[1] if visual.proj is not None else 0.0)


def text_flops(tower, B: int, P: int, lengths) -> float:
    """Matmul FLOPs of the fast text side for B images with P prefix tokens and suffixes of `lengths`."""
    W, layers = tower.width, len(tower.blocks)
    mlp = tower.blocks[0].mlp.c_fc.out_features
    E = tower.model.text_projection.shape[-1]
    T, N = sum(lengths), len(lengths)
    row = 2.0 * (4 * W * W + 2 * W * mlp)                        # QKV, out-projection, MLP of one row
    f = B * P * ((layers - 1) * row + 4.0 * W * W)               # prefix pass: the last layer's K, V only
    f += B * (layers - 1) * 4.0 * W * sum(i + 1 for i in range(P))
    f += T * 6.0 * W * W + B * T * 2.0 * (W * W + 2 * W * mlp)   # layer 0: QKV once per class row
    f += B * T * (layers - 2) * row + B * T * 4.0 * W * W        # middle layers; the last layer's K, V
    f += B * N * (2.0 * (2 * W * W + 2 * W * mlp) + 2.0 * W * E)  # last layer's Q, out, MLP at EOT; projection
    keys = sum(P + i + 1 for n in lengths for i in range(n))      # keys seen by every suffix row
    return f + B * (layers - 1) * 4.0 * W * keys + B * 4.0 * W * sum(P + n for n in lengths)


def gemm_rate(prec: str) -> float:
    """FLOP/s of torch.mm on this machine in `prec`, at the text MLP (1024 x 512 x 2048) and the image MLP
    (788 x 768 x 3072) shapes: total FLOPs over total median time (about a second)."""
    dt = PRECISIONS[prec]
    flops = secs = 0.0
    for m, k, n in ((1024, 512, 2048), (788, 768, 3072)):
        a, b = torch.randn(m, k, device=DEVICE).to(dt), torch.randn(k, n, device=DEVICE).to(dt)
        for _ in range(2):
            torch.mm(a, b)
        t, _ = wall_median(lambda: torch.mm(a, b), 7)
        flops, secs = flops + 2.0 * m * k * n, secs + t
    return flops / secs


class Rates(dict):
    """{precision: FLOP/s}, measured at the start of the module; `fresh(prec)` measures again next to a row (a
    shared CPU's load drifts: each row's floor uses the rate measured right after its own timing)."""

    def fresh(self, prec: str) -> float:
        self[prec] = gemm_rate(prec)
        return self[prec]


@pytest.fixture(scope="module")
def gemm_rates():
    return Rates({prec: gemm_rate(prec) for prec in PRECS if not slow_matmul_note(prec, DEVICE)})


def test_gemm_rate(record, gemm_rates):
    """The rates every floor below is computed from (measured once, in this run)."""
    for prec in gemm_rates:
        record(bench="GEMM rate (torch.mm)", precision=prec, GFLOP_per_s=round(gemm_rates[prec] / 1e9, 1))
    assert all(r > 0 for r in gemm_rates.values())


@pytest.fixture(scope="module")
def models(vit_b16_model):
    """The bench model in fp32 and a copy stored in bf16 (the fp32 one is shared with the other benches)."""
    return {"fp32": vit_b16_model, "bf16": copy.deepcopy(vit_b16_model).set_precision("bf16")}


def _images(B, prec, seed=0):
    x = torch.randn(B, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    return x.to(DEVICE, PRECISIONS[prec])


def _cos_diff(a, b, model):
    return float((a.float() - b.float()).abs().max() / model.clip.logit_scale.float().exp())


def _row(record, bench, prec, B, N, B_ref, t_fast, t_ref, flops, rates, **extra):
    rate = rates.fresh(prec)
    floor = flops / rate
    fx = t_fast / floor
    target = TARGET[prec] if bench == "fast_logits" else None
    record(bench=bench, precision=prec, B=B, N=N, fast_s=round(t_fast, 3),
           loop77_s_per_image=round(t_ref / B_ref, 3) if t_ref else None,
           speedup=round((t_ref / B_ref) / (t_fast / B), 1) if t_ref else None,
           GFLOP_per_s=round(rate / 1e9, 1), floor_s=round(floor, 3), floor_x=round(fx, 2),
           target=(f"<= {target}x: {'met' if fx <= target else 'missed'}" if target else None), **extra)


# ------------------------------------------------------------------------------------------------ benches
ENC = [(2, 100, 1)] + ([(8, 100, 1)] if FULL else [])


@pytest.mark.parametrize("B,N,B_ref", ENC, ids=[f"B{b}-N{n}" for b, n, _ in ENC])
@pytest.mark.parametrize("prec", PRECS)
def test_encode_prompts(timed, record, models, gemm_rates, prec, B, N, B_ref):
    skip_slow_precision(prec, DEVICE)
    m = models[prec]
    names = list(IMAGENET_CLASSNAMES[:N])
    suf = m.suffixes(names)
    with torch.inference_mode():
        prefix = m.prompt_prefix(_images(B, prec)).to(m.dtype)

    def fast():
        with torch.inference_mode():
            return m.text_features(prefix, suf)
    t_fast, out = timed(fast, rounds=3)
    with torch.inference_mode():
        t_ref, ref = wall_median(lambda: encode_prompts_reference(m.clip, prefix[:B_ref], names, m.tokenizer), 1)
    diff = float((F.normalize(out[:B_ref].float(), dim=-1) - F.normalize(ref.float(), dim=-1)).abs().max())
    assert diff <= PRECISION_TOLERANCES.get(m.dtype, {"cos_atol": 1e-4})["cos_atol"], diff
    _row(record, "encode_prompts", prec, B, N, B_ref, t_fast, t_ref,
         text_flops(m.tower, B, prefix.shape[1], suf.lengths), gemm_rates, max_feature_diff=round(diff, 5))


FL = [(2, 100, 1)] + ([(8, 100, 1), (2, 1000, 1)] if FULL else [])


@pytest.mark.parametrize("B,N,B_ref", FL, ids=[f"B{b}-N{n}" for b, n, _ in FL])
@pytest.mark.parametrize("prec", PRECS)
def test_fast_logits(timed, record, models, gemm_rates, prec, B, N, B_ref):
    skip_slow_precision(prec, DEVICE)
    m = models[prec]
    names = list(IMAGENET_CLASSNAMES[:N])
    x = _images(B, prec)
    t_fast, out = timed(lambda: intcoop.fast_logits(x, names, m, batch_size=B), rounds=3)
    with torch.inference_mode():
        t_ref, ref = _loop(lambda: reference_logits(m, x[:B_ref], names), N)
    diff = _cos_diff(out[:B_ref], ref.cpu(), m) if ref is not None else None
    assert diff is None or diff <= PRECISION_TOLERANCES.get(m.dtype, {"cos_atol": 1e-4})["cos_atol"], diff
    P = m.prompt.prefix_len
    flops = B * image_tower_flops(m.clip.visual) + text_flops(m.tower, B, P, m.suffixes(names).lengths)
    _row(record, "fast_logits", prec, B, N, B_ref, t_fast, t_ref, flops, gemm_rates,
         max_cos_diff=round(diff, 5) if diff is not None else "loop skipped")


def _loop(fn, N):
    """(seconds, result) of the 77-token loop, or (None, None) when N > INTCOOP_BENCH_LOOP_MAX_N (on a busy
    2-core machine the loop alone at N = 1000 takes minutes per image)."""
    limit = int(os.environ.get("INTCOOP_BENCH_LOOP_MAX_N", "1000000"))
    return wall_median(fn, 1) if N <= limit else (None, None)


STEP = [(2, 20, 1)] + ([(4, 100, 1)] if FULL else [])


def _step_inputs(m, B, N, prec):
    feats, tokens = m.image_features(_images(B, prec))
    labels = torch.arange(B, device=DEVICE) % N
    return feats, tokens, labels


def _loop_step(m, names, opt, feats, tokens, labels):
    """Cross-entropy step with CoCoOp's text side (per image, N padded 77-token prompts)."""
    opt.zero_grad(set_to_none=True)
    prefix = m.prompt_prefix(feats=feats, tokens=tokens).to(m.dtype)
    text = encode_prompts_reference(m.clip, prefix, names, m.tokenizer, m.config.suffix)
    loss = F.cross_entropy(m.scores(feats, text), labels)
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("B,N,B_ref", STEP, ids=[f"B{b}-N{n}" for b, n, _ in STEP])
@pytest.mark.parametrize("prec", PRECS)
def test_train_step(timed, record, models, gemm_rates, prec, B, N, B_ref):
    """prompt learner -> fast text side -> logits -> cross-entropy -> backward -> SGD, from cached features; the
    same objective through the 77-token loop. Parameters are restored afterwards (the model is shared)."""
    skip_slow_precision(prec, DEVICE)
    m = models[prec]
    names = list(IMAGENET_CLASSNAMES[:N])
    saved = {k: v.clone() for k, v in m.prompt.state_dict().items()}
    tc = TrainConfig(lambda_attr=0.0, lambda_reg=0.0)
    module = StepModule(m, m.suffixes(names), tc, use_attr=False)
    opt = torch.optim.SGD(m.prompt.parameters(), lr=1e-6)
    feats, tokens, labels = _step_inputs(m, B, N, prec)

    def fast():
        opt.zero_grad(set_to_none=True)
        parts = module(feats, tokens, labels, None, None, None, None)
        parts["loss"].backward()
        opt.step()
        return parts["loss"].detach()
    try:
        m.prompt.train()
        t_fast, _ = timed(fast, rounds=3)
        t_ref, _ = wall_median(lambda: _loop_step(m, names, opt, feats[:B_ref], tokens[:B_ref], labels[:B_ref]), 1)
        grads = [p.grad for p in m.prompt.parameters() if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 for g in grads)       # the learned side stays fp32
    finally:
        m.prompt.load_state_dict(saved)
        m.eval()
    P = m.prompt.prefix_len
    _row(record, "train_step", prec, B, N, B_ref, t_fast, t_ref,
         2 * text_flops(m.tower, B, P, m.suffixes(names).lengths), gemm_rates)


@NEEDS_FULL
@pytest.mark.parametrize("prec", PRECS)
def test_fast_logits_compiled(timed, record, models, gemm_rates, prec):
    """compile=True (inductor) at 8 x 100: compile time (first call minus an eager call) on its own, then the
    compiled steady state against eager, and a second class list and batch size (recompiles counted)."""
    from torch._dynamo.utils import counters

    skip_slow_precision(prec, DEVICE)
    m, B, N = models[prec], 8, 100
    names, other = list(IMAGENET_CLASSNAMES[:N]), list(IMAGENET_CLASSNAMES[N:2 * N - 7])
    x = _images(B, prec)
    t_eager, _ = wall_median(lambda: intcoop.fast_logits(x, names, m, batch_size=B, compile=False), 2)
    torch._dynamo.reset()
    counters.clear()
    t_first, _ = wall_time(lambda: intcoop.fast_logits(x, names, m, batch_size=B, compile=True))
    t_comp, _ = timed(lambda: intcoop.fast_logits(x, names, m, batch_size=B, compile=True), rounds=2)
    graphs = counters["stats"]["unique_graphs"]
    t_other, _ = wall_time(lambda: intcoop.fast_logits(x[:B - 3], other, m, batch_size=B, compile=True))
    P = m.prompt.prefix_len
    flops = B * image_tower_flops(m.clip.visual) + text_flops(m.tower, B, P, m.suffixes(names).lengths)
    record(bench="fast_logits compiled", precision=prec, B=B, N=N, compile_s=round(t_first - t_comp, 1),
           compiled_s=round(t_comp, 3), eager_s=round(t_eager, 3),
           floor_x=round(t_comp / (flops / gemm_rates.fresh(prec)), 2), other_list_and_batch_s=round(t_other, 3),
           graphs_first=graphs, graphs_after_other=counters["stats"]["unique_graphs"])
    assert graphs >= 1


REUSE = [(2, 100)] + ([(2, 1000), (8, 100)] if FULL else [])


@pytest.mark.parametrize("B,N", REUSE, ids=[f"B{b}-N{n}" for b, n in REUSE])
def test_suffix_pass_buffers(record, models, B, N):
    """fp32 fast_logits with the suffix pass's reused buffers and in-place residual adds (`text.Scratch`, the
    inference default) against the allocating path (`TextTower._reuse` off), runs interleaved, median of 3 each;
    logits equal to fp32 rounding."""
    m = models["fp32"]
    names = list(IMAGENET_CLASSNAMES[:N])
    x = _images(B, "fp32")
    times, outs = {True: [], False: []}, {}
    try:
        for _ in range(3):
            for reuse in (True, False):
                m.tower._reuse = reuse
                t, outs[reuse] = wall_time(lambda: intcoop.fast_logits(x, names, m, batch_size=B))
                times[reuse].append(t)
    finally:
        m.tower._reuse = True
    diff = _cos_diff(outs[True], outs[False], m)
    assert diff <= 1e-5, diff
    reuse_s, alloc_s = (sorted(times[k])[1] for k in (True, False))
    record(bench="fast_logits buffers reused / allocating", precision="fp32", B=B, N=N, fast_s=round(reuse_s, 3),
           allocating_s=round(alloc_s, 3), speedup=round(alloc_s / reuse_s, 2), max_cos_diff=round(diff, 7))
