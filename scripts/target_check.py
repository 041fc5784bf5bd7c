#!/usr/bin/env python3
"""The target check of a GPU run (phase `target` of scripts/gpu_check.sh): the method at its target shape, on the
Triton backend, before any pytest and without the compiled extension intcoop._C.

    python scripts/target_check.py [--out DIR] [--rows FILE] [--batch B] [--classes N] [--rehearse]

Target: B = 256 images x N = 1000 ImageNet class names (open_clip's list, the one the benches use), bf16, a
ViT-B-16 with QuickGELU (OpenAI CLIP's activation) and random weights, IntCoOp with attention conditioning and
predicted attributes, every learned part perturbed; INTCOOP_BACKEND=triton for both ops. Each check writes one
JSON line to FILE (default $INTCOOP_BENCH_ROWS, else DIR/rows.jsonl) and one PASS/FAIL line to DIR/target.txt at
once, so a run cut by its time limit keeps what it measured:
  env       device, versions, activation; the backend chosen for both ops must be Triton
  forward   fast_logits (its own max_rows, sized from free memory): first call (Triton compiles), then the median
            of 3 calls, timed with CUDA events; images/s
  max_rows  the chunk fast_logits chose, and on a GPU the peak memory per packed row against its estimate
  finite    logits [B, N], no NaN / inf
  compare   images 0, 1, B-2, B-1 against the plain reference (the 77-token loop of intcoop.reference, torch backend)
            in fp32 with the same bf16-rounded weights and images, as cosines (logits / logit scale), within the
            bf16 tolerance of intcoop.testing.TOLERANCES
  train     a training-style step: StepModule (cross-entropy + attribute loss + KgCoOp regulariser) under bf16
            autocast over fp32 weights, as training runs on a GPU; forward + backward over the B images in
            micro-batches sized from free memory (gradients accumulated, each micro-batch's loss weighted by its
            share of B); timed per micro-batch
  grads     every prompt-learner gradient present, finite and not all zero
  repeat    the same forward + backward again: bitwise-equal gradients
--rehearse: the same code on this CPU at a toy size (B = 5, N = 11, the tiny CLIP intcoop-tiny with QuickGELU,
Triton interpreted, one timed call, micro-batches of 3) so that CI checks it (tests/test_gpu_check.py); its
figures mean nothing.
Exit status: 0 when every check passed, 1 when one failed, 2 for bad arguments (or no GPU without --rehearse).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

TARGET_B, TARGET_N, REHEARSE_B, REHEARSE_N = 256, 1000, 5, 11
TARGET_CLIP = "ViT-B-16-quickgelu"


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_out", help="folder of target.txt (and rows)")
    ap.add_argument("--rows", default=None, help="JSON-lines file (default $INTCOOP_BENCH_ROWS or OUT/rows.jsonl)")
    ap.add_argument("--batch", type=int, default=None, help=f"images B (default {TARGET_B}; {REHEARSE_B} rehearsed)")
    ap.add_argument("--classes", type=int, default=None, help=f"class names N (default {TARGET_N}; "
                                                               f"{REHEARSE_N} rehearsed)")
    ap.add_argument("--rehearse", action="store_true", help="toy size on this CPU, Triton interpreted")
    args = ap.parse_args(argv)
    args.batch = args.batch or (REHEARSE_B if args.rehearse else TARGET_B)
    args.classes = args.classes or (REHEARSE_N if args.rehearse else TARGET_N)
    if args.batch < 2:
        ap.error(f"--batch must be >= 2 (images 0, 1, B-2, B-1 are compared), got {args.batch}")
    if not 1 <= args.classes <= 1000:
        ap.error(f"--classes must be in 1..1000 (ImageNet's class names), got {args.classes}")
    return args


class Report:
    """PASS/FAIL lines into target.txt and JSON rows into the rows file, each written and flushed at once."""

    def __init__(self, out: Path, rows: Path, meta: dict):
        out.mkdir(parents=True, exist_ok=True)
        self.txt, self.rows, self.meta = open(out / "target.txt", "w"), rows, meta
        self.passed, self.failed = [], []

    def line(self, text: str):
        print(text, flush=True)
        self.txt.write(text + "\n")
        self.txt.flush()

    def row(self, check: str, ok: bool, note: str, **fields):
        (self.passed if ok else self.failed).append(check)
        with open(self.rows, "a") as fh:
            fh.write(json.dumps(dict(bench=f"target {check}", ok=ok, **self.meta, **fields), default=str) + "\n")
        self.line(f"{'PASS' if ok else 'FAIL'} {check}: {note}")

    def run(self, check: str, fn, *needs):
        """fn() -> (ok, note, fields); an exception or a missing prerequisite is a FAIL with the reason."""
        missing = [n for n in needs if n is None]
        if missing:
            return self.row(check, False, "not run: a check it needs failed")
        t0 = time.perf_counter()
        try:
            ok, note, fields = fn()
        except Exception as exc:  # every failure is reported, and the next checks still run
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.row(check, False, f"{type(exc).__name__}: {first} [{time.perf_counter() - t0:.1f} s]",
                     error=f"{type(exc).__name__}: {exc}", check_s=round(time.perf_counter() - t0, 2))
            for text in traceback.format_exc().rstrip().splitlines()[-25:]:
                self.line("    " + text)
            return
        took = time.perf_counter() - t0
        self.row(check, ok, f"{note} [{took:.1f} s]", check_s=round(took, 2), **fields)


def main(argv=None) -> int:
    args = parse(argv)
    if args.rehearse:                    # before torch and Triton are imported: CPU, kernels interpreted
        os.environ.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    os.environ["INTCOOP_BACKEND"] = "triton"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    t_start = time.perf_counter()
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not args.rehearse:
        print("target_check: no CUDA device; use --rehearse for the CPU rehearsal", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False    # the fp32 reference means fp32
    torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    rows = Path(args.rows or os.environ.get("INTCOOP_BENCH_ROWS") or out / "rows.jsonl")
    B, N = args.batch, args.classes
    rep = Report(out, rows, dict(B=B, N=N, device=dev.type, rehearsal=args.rehearse))
    rep.line(f"target check: B {B}, N {N}, bf16, {'rehearsal on the CPU' if args.rehearse else dev}")
    checks = TargetChecks(rep, dev, B, N, args.rehearse)
    checks.all()
    rep.line(f"target: {len(rep.passed)} passed, {len(rep.failed)} failed"
             + (f" ({', '.join(rep.failed)})" if rep.failed else "") + f", {time.perf_counter() - t_start:.0f} s")
    return 1 if rep.failed else 0


@contextlib.contextmanager
def backend(name: str):
    """INTCOOP_BACKEND=name inside the block (dispatch reads it at every call)."""
    old = os.environ.get("INTCOOP_BACKEND")
    os.environ["INTCOOP_BACKEND"] = name
    try:
        yield
    finally:
        os.environ["INTCOOP_BACKEND"] = old if old is not None else ""


def text_chunks(lengths, images: int, max_rows: int) -> list[int]:
    """Packed rows of each text-encoder chunk, by TextTower.encode's rule (whole classes, <= max_rows)."""
    chunks, rows = [], 0
    for n in lengths:
        if rows and rows + images * n > max_rows:
            chunks.append(rows)
            rows = 0
        rows += images * n
    return chunks + [rows]


class TargetChecks:
    """The checks, in order; each stores what later ones need (None when it failed)."""

    def __init__(self, rep: Report, dev, B: int, N: int, rehearse: bool):
        import torch

        self.torch, self.rep, self.dev, self.B, self.N, self.rehearse = torch, rep, dev, B, N, rehearse
        self.cuda = dev.type == "cuda"
        self.check_images = sorted({0, 1, B - 2, B - 1})
        self.m16 = self.m32 = self.x = self.logits = self.grads = None

    def all(self):
        r = self.rep
        r.run("env", self.env)
        r.run("forward", self.forward, self.m16)
        r.run("max_rows", self.max_rows, self.logits)
        r.run("finite", self.finite, self.logits)
        r.run("compare", self.compare, self.logits)
        r.run("train", self.train, self.m32)
        r.run("grads", self.check_grads, self.grads)
        r.run("repeat", self.repeat, self.grads)

    def timed(self, fn):
        """(seconds, fn()) on CUDA events (the GPU's own clock) or, on the CPU, the host clock."""
        torch = self.torch
        if not self.cuda:
            t = time.perf_counter()
            res = fn()
            return time.perf_counter() - t, res
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        res = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, res

    def free_bytes(self) -> int:
        torch = self.torch
        free, _ = torch.cuda.mem_get_info(self.dev)
        return free + torch.cuda.memory_reserved(self.dev) - torch.cuda.memory_allocated(self.dev)

    # --- checks ---------------------------------------------------------------------------------------------
    def env(self):
        import copy

        import open_clip
        import triton
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        import intcoop
        from intcoop.clip import register_tiny_clip
        from intcoop.ops import _ext, dispatch
        from intcoop.testing import perturb_prompt

        torch = self.torch
        name = register_tiny_clip() if self.rehearse else TARGET_CLIP
        t0 = time.perf_counter()
        torch.manual_seed(0)
        clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=True)
        act = type(clip.transformer.resblocks[0].mlp.gelu).__name__
        model = perturb_prompt(intcoop.IntCoOp.from_clip(clip, conditioning="attention", attributes="predicted"),
                               std=0.02)
        self.m16 = copy.deepcopy(model).to(self.dev, torch.bfloat16).eval()
        self.m32 = model.to(torch.bfloat16).float().to(self.dev).eval()   # the same bf16-rounded weights, fp32
        build_s = time.perf_counter() - t0
        self.names = list(IMAGENET_CLASSNAMES[:self.N])
        size = self.m16.clip.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        self.x = torch.randn(self.B, 3, *size, generator=torch.Generator().manual_seed(0))
        chosen = {op: repr(dispatch.choose(op, torch.ones(1, device=self.dev, dtype=torch.bfloat16)))
                  for op in ("prefix_attention", "patch_pool")}
        ok = all("intcoop.kernels" in c for c in chosen.values()) and act == "QuickGELU"
        gpu = torch.cuda.get_device_name(self.dev) if self.cuda else "cpu (rehearsal)"
        fields = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, open_clip=open_clip.__version__,
                      python=sys.version.split()[0], clip=name, activation=act, backends=chosen,
                      compiled_extension=_ext.load_error() or "loaded", model_build_s=round(build_s, 1),
                      prompt_params=sum(p.numel() for p in model.prompt.parameters()))
        note = (f"{gpu}, torch {torch.__version__}, triton {triton.__version__}; {name} ({act}); ops on "
                + ", ".join(f"{op}: {'Triton' if 'intcoop.kernels' in c else c}" for op, c in chosen.items()))
        return ok, note, fields

    def forward(self):
        import intcoop
        from intcoop.api import default_max_rows

        torch, B = self.torch, self.B
        x = self.x.to(self.dev, torch.bfloat16)
        self.suf = self.m16.suffixes(self.names)
        self.auto_rows = default_max_rows(self.m16, B * self.suf.max_len)   # what fast_logits picks (same state)

        def call():
            return intcoop.fast_logits(x, self.names, self.m16, batch_size=B)
        t_first, _ = self.timed(call)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.mem_base = torch.cuda.memory_allocated(self.dev)
        times = []
        for _ in range(1 if self.rehearse else 3):
            t, logits = self.timed(call)
            times.append(t)
        if self.cuda:
            self.mem_peak = torch.cuda.max_memory_allocated(self.dev) - self.mem_base
        self.t_fast = statistics.median(times)
        self.logits = logits
        ips = B / self.t_fast
        note = (f"{ips:,.1f} images/s (median of {len(times)}: {1e3 * self.t_fast:.1f} ms for {B} images); "
                f"first call {t_first:.1f} s (Triton compiles)")
        return True, note, dict(images_per_s=round(ips, 1), median_ms=round(1e3 * self.t_fast, 2),
                                times_ms=[round(1e3 * t, 2) for t in times], first_call_s=round(t_first, 2),
                                max_rows=self.auto_rows)

    def max_rows(self):
        from intcoop.api import CPU_MAX_ROWS, bytes_per_packed_row

        m = self.m16
        chunks = text_chunks(self.suf.lengths, self.B, self.auto_rows)
        fields = dict(max_rows=self.auto_rows, packed_rows=self.B * sum(self.suf.lengths), text_chunks=len(chunks),
                      largest_chunk_rows=max(chunks))
        note = f"max_rows {self.auto_rows:,}: {fields['packed_rows']:,} packed rows in {len(chunks)} chunk(s)"
        if not self.cuda:
            return self.auto_rows == CPU_MAX_ROWS, note + " (CPU: the fixed chunk)", fields
        fc = getattr(m.tower.blocks[0].mlp, "c_fc", None)
        est = bytes_per_packed_row(m.tower.width, fc.out_features if fc is not None else 4 * m.tower.width, m.dtype)
        per_row = self.mem_peak / max(chunks)
        fields.update(peak_GiB=round(self.mem_peak / 2**30, 2), peak_bytes_per_row=round(per_row),
                      estimated_bytes_per_row=est, free_GiB=round(self.free_bytes() / 2**30, 1))
        return per_row <= est, note + (f"; peak {self.mem_peak / 2**30:.1f} GiB = {per_row:,.0f} B/row "
                                       f"(estimate {est:,} B/row, must be an upper bound)"), fields

    def finite(self):
        lg = self.logits
        bad = int((~self.torch.isfinite(lg)).sum())
        ok = bad == 0 and tuple(lg.shape) == (self.B, self.N)
        return ok, f"logits {tuple(lg.shape)} {lg.dtype}, {bad} not finite", dict(not_finite=bad, shape=list(lg.shape))

    def compare(self):
        from intcoop.reference import reference_logits
        from intcoop.testing import TOLERANCES

        torch, idx = self.torch, self.check_images
        x = self.x[idx].to(self.dev, torch.bfloat16).float()       # the images the fast path saw
        with backend("torch"), torch.inference_mode():
            t_ref, ref = self.timed(lambda: reference_logits(self.m32, x, self.names))
        scale = float(self.m32.clip.logit_scale.exp())
        got, want = self.logits[idx].double() / scale, ref.double().cpu() / scale
        tol = TOLERANCES[torch.bfloat16]
        close = torch.isclose(got, want, **tol)
        diff = (got - want).abs()
        per_image = (t_ref / len(idx)) / (self.t_fast / self.B)
        fields = dict(images=idx, max_abs_cos_diff=float(diff.max()), mismatched=int((~close).sum()),
                      max_abs_logit_diff=float(diff.max() * scale), tolerance=tol, logit_scale=scale,
                      loop77_s_per_image=round(t_ref / len(idx), 4), speedup_per_image=round(per_image, 1))
        note = (f"images {idx}: max |cos diff| {float(diff.max()):.2e}, {int((~close).sum())} of {close.numel()} "
                f"outside atol {tol['atol']} rtol {tol['rtol']}; the fp32 loop takes {t_ref / len(idx):.2f} s/image "
                f"({per_image:,.1f}x the fast path's per image)")
        return bool(close.all()), note, fields

    def train(self):
        from intcoop.config import TrainConfig
        from intcoop.train.losses import HandFeatures
        from intcoop.train.step import StepModule

        torch, m, B, dev = self.torch, self.m32, self.B, self.dev
        g = torch.Generator().manual_seed(1)
        ac = torch.autocast(dev.type, dtype=torch.bfloat16)
        with torch.no_grad(), ac:
            parts = [m.image_features(self.x[s:s + 64].to(dev)) for s in range(0, B, 64)]
        feats, tokens = (torch.cat([p[i] for p in parts]) for i in (0, 1))
        labels = torch.randint(0, self.N, (B,), generator=g).to(dev)
        vocab = m.clip.token_embedding.weight.shape[0]
        target = m.clip.token_embedding.weight[torch.randint(0, vocab, (B,), generator=g).to(dev)].detach().float()
        valid = (torch.arange(B) % 3 != 2).to(dev)
        hand = HandFeatures(m.clip, m.tokenizer, self.names).classes()
        module = StepModule(m, m.suffixes(self.names), TrainConfig(), use_attr=True)
        self.params = [(n, p) for n, p in m.prompt.named_parameters() if p.requires_grad]

        def accumulate(mb, images=B):
            """Forward + backward over the first `images` images in micro-batches of mb, gradients accumulated:
            (grads, [(images, losses)] per micro-batch, seconds per micro-batch)."""
            for _, p in self.params:
                p.grad = None
            losses, times = [], []
            for s in range(0, images, mb):
                e = min(images, s + mb)

                def step():
                    with ac:
                        out = module(None, feats[s:e], tokens[s:e], labels[s:e], target[s:e], valid[s:e], None, hand)
                    (out["loss"] * ((e - s) / B)).backward()
                    return out
                t, out = self.timed(step)
                times.append(t)
                losses.append((e - s, {k: float(out[k].detach()) for k in ("loss", "ce", "attr", "reg")}))
            return [None if p.grad is None else p.grad.detach().clone() for _, p in self.params], losses, times

        mb, probe, t_probe = 3, None, None                 # the CPU rehearsal: micro-batches of 3 (and a rest)
        if self.cuda:                                      # probe the memory of a small micro-batch (compiles too)
            mb = min(B, 4)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            t_probe = self.timed(lambda: accumulate(mb, images=mb))[0]
            probe = max(torch.cuda.max_memory_allocated(dev) - base, 1) / mb
            mb = max(1, min(B, int(0.6 * self.free_bytes() / probe)))
        first = second = None
        for attempt in range(4):
            try:
                first = accumulate(mb)
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats(dev)
                second = accumulate(mb)
                break
            except torch.OutOfMemoryError:
                if attempt == 3 or mb == 1:
                    raise
                first = second = None
                torch.cuda.empty_cache()
                mb = max(1, mb // 2)
        self.grads, self.grads_again = first[0], second[0]
        step_s = sum(second[2])
        peak = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if self.cuda else None
        parts = {k: sum(n * item[k] for n, item in first[1]) / B for k in ("loss", "ce", "attr", "reg")}
        fields = dict(micro_batch=mb, micro_batches=len(second[2]), step_s=round(step_s, 3),
                      ms_per_image=round(1e3 * step_s / B, 3), first_pass_s=round(sum(first[2]), 2),
                      probe_s=round(t_probe, 2) if t_probe else None,
                      micro_batch_ms=[round(1e3 * t, 1) for t in second[2]], peak_GiB=peak,
                      probe_MiB_per_image=round(probe / 2**20, 1) if probe else None, **parts)
        ok = all(map(math.isfinite, parts.values())) and parts["attr"] > 0 and parts["reg"] > 0
        note = (f"B {B} in {len(second[2])} micro-batch(es) of {mb}: {step_s:.2f} s per step "
                f"({1e3 * step_s / B:.1f} ms/image), peak {peak} GiB; loss {parts['loss']:.4f} "
                f"(ce {parts['ce']:.4f}, attr {parts['attr']:.4f}, reg {parts['reg']:.4f})")
        return ok, note, fields

    def check_grads(self):
        torch = self.torch
        missing = [n for (n, _), gr in zip(self.params, self.grads) if gr is None]
        bad = [n for (n, _), gr in zip(self.params, self.grads) if gr is not None and not torch.isfinite(gr).all()]
        zero = [n for (n, _), gr in zip(self.params, self.grads) if gr is not None and not gr.abs().sum() > 0]
        ok = not (missing or bad or zero)
        return ok, (f"{len(self.params)} prompt-learner gradients: {len(missing)} missing, {len(bad)} not finite, "
                    f"{len(zero)} all zero" + (f" ({', '.join(missing + bad + zero)})" if not ok else "")), dict(
            params=len(self.params), missing=missing, not_finite=bad, all_zero=zero)

    def repeat(self):
        torch = self.torch
        differ = [n for (n, _), a, b in zip(self.params, self.grads, self.grads_again)
                  if (a is None) != (b is None) or (a is not None and not torch.equal(a, b))]
        return not differ, (f"second forward + backward: {len(self.params) - len(differ)} of {len(self.params)} "
                            "gradients bitwise equal" + (f" (differ: {', '.join(differ)})" if differ else "")), dict(
            differ=differ)


if __name__ == "__main__":
    sys.exit(main())
