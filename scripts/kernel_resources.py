"""Registers, spills and shared memory of every intcoop Triton kernel compiled for sm_90 (H100/H200), no GPU needed.

Owns only this report. Each kernel of `intcoop.kernels` is compiled for GPUTarget("cuda", 90, 32) with its
launcher's own constexprs and num_warps / num_stages (`launch_configs` of each kernel module), at the realistic
shapes, with the 16-divisibility / alignment hints the JIT gives a real launch (see `divisibility`: without
them loads are not vectorized and every kernel looks 50-100 registers worse than it is). Its PTX then goes
through the ptxas triton uses, with triton's own flags plus -v, whose "Used N registers ... spill stores ...
spill loads" lines are parsed. Shared memory is the compiled metadata's.
Occupancy (CTAs and warps per SM) is estimated from registers and shared memory with the H100/H200 limits:
64K 32-bit registers (allocated per warp in units of 256), 64 warps, 32 CTAs and 227 KiB shared memory per SM.

    python scripts/kernel_resources.py [--jobs 2] [--only prefix|pool]

Runs without TRITON_INTERPRET (popped before triton is imported); about 15 s on 2 cores with a cold triton
cache. Exit status 1 when a kernel spills, 2 when ptxas is missing.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import importlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _ptxas() -> str:
    """The ptxas triton itself runs for sm_90 (its bundled one unless TRITON_PTXAS_PATH says otherwise)."""
    try:
        from triton import knobs

        return knobs.nvidia.ptxas.path
    except Exception:  # noqa: BLE001 - any failure means: not found where triton looks
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


PTXAS = _ptxas()
OPTIONS = ("num_warps", "num_stages", "maxnreg")
SM_REGS, SM_WARPS, SM_CTAS, SM_SMEM = 65536, 64, 32, 227 * 1024


def cases():
    """(label, module name, launch_configs kwargs, dtype): the realistic shapes in bf16 and fp16; fp32 (slow to
    compile: its dots are FMA loops) at one shape per op."""
    out = []
    for dt in ("bf16", "fp16"):
        for P, Dh, max_q in ((6, 64, 14), (6, 64, 1), (6, 80, 14), (6, 128, 14)):
            out.append((f"P{P} Dh{Dh} mq{max_q}", "prefix_attention", dict(P=P, Dh=Dh, max_q=max_q), dt))
        for R, W in ((32, 768), (64, 1024)):
            out.append((f"R{R} W{W}", "patch_pool", dict(R=R, W=W), dt))
    out.append(("P6 Dh64 mq14", "prefix_attention", dict(P=6, Dh=64, max_q=14), "fp32"))
    out.append(("R32 W768", "patch_pool", dict(R=32, W=768), "fp32"))
    return out


def signature(fn, consts: dict, dt: str) -> dict:
    """Triton signature from the kernels' naming convention: UPPER = pointer (fp32 for LSE / DELTA / *_WS
    scratch, i32 for CU_* / SEG_*, else the data dtype), P H B R L W and lower-case = i32, scales fp32."""
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n.isupper() and n not in ("P", "H", "B", "R", "L", "W"):
            sig[n] = ("*fp32" if n in ("LSE", "DELTA") or n.endswith("_WS")
                      else "*i32" if n.startswith(("CU_", "SEG_")) else "*" + dt)
        else:
            sig[n] = "fp32" if n in ("scale", "qk_scale") else "i32"
    return sig


def divisibility(fn, sig: dict, known: dict) -> dict:
    """The JIT's specialization at a real launch: it marks a pointer 16-byte aligned and an int divisible by 16
    when they are, and that decides vectorized loads (without it every element is its own 2-byte load and
    the address registers explode). Pointers: torch allocations and the launchers' views are 16-byte aligned.
    Strides (lower-case s..., 3-4 letters): multiples of Dh or W, so of 16 at the realistic shapes. Other
    ints: divisible when `known` (the case's sizes) says so; unknown ones (Tq, Tk, L, chunk counts) are not."""
    attrs = {}
    for i, n in enumerate(fn.arg_names):
        t = sig[n]
        if t == "constexpr":
            continue
        if t.startswith("*") or (n[0] == "s" and n.islower() and len(n) <= 4) or known.get(n, 1) % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def ptxas_usage(ptx: str) -> dict:
    """regs, spill_st, spill_ld (bytes), stack (bytes) from `ptxas -v` on the PTX, with triton's flags."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([PTXAS, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src,
                              "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    log = run.stdout + run.stderr
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{log[-2000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(regs=int(regs.group(1)) if regs else -1,
                stack=int(spill.group(1)) if spill else 0,
                spill_st=int(spill.group(2)) if spill else 0,
                spill_ld=int(spill.group(3)) if spill else 0)


def occupancy(regs: int, warps: int, smem: int) -> int:
    """CTAs per SM allowed by registers (per-warp allocation in units of 256), warps, CTAs and shared memory."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (SM_REGS // per_warp) // warps
    by_smem = SM_SMEM // smem if smem else SM_CTAS
    return min(by_regs, SM_WARPS // warps, SM_CTAS, by_smem)


def compile_one(job) -> dict:
    """Compile one (case, kernel) for sm_90 and measure it: one table row."""
    label, module, kwargs, dt, name, cfg = job
    mod = importlib.import_module(f"intcoop.kernels.{module}")
    fn = getattr(mod, name)
    consts = {k: v for k, v in cfg.items() if k not in OPTIONS and k in fn.arg_names}
    consts["F32"] = False
    opts = {k: cfg[k] for k in OPTIONS if k in cfg}
    sig = signature(fn, consts, dt)
    known = dict(kwargs, H=8, L=197)
    compiled = triton.compile(ASTSource(fn, sig, consts, divisibility(fn, sig, known)), target=TARGET, options=opts)
    use = ptxas_usage(compiled.asm["ptx"])
    warps, stages = compiled.metadata.num_warps, compiled.metadata.num_stages
    smem = compiled.metadata.shared
    tiles = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in consts.items() if k.startswith("BLOCK_"))
    return dict(kernel=name, case=label, dt=dt, tiles=tiles, warps=warps, stages=stages, smem=smem,
                ctas=occupancy(use["regs"], warps, smem) if use["regs"] > 0 else -1, **use)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", choices=("prefix", "pool"), help="one op's kernels only")
    args = ap.parse_args(argv)
    if not os.path.exists(PTXAS):
        print(f"NOTE: ptxas is missing ({PTXAS}): this triton is not a CUDA build, or TRITON_PTXAS_PATH points "
              f"nowhere. Nothing can be compiled for sm_90 nor registers / spills counted without it.")
        return 2
    jobs = []
    for label, module, kwargs, dt in cases():
        if args.only and (module == "patch_pool") != (args.only == "pool"):
            continue
        mod = importlib.import_module(f"intcoop.kernels.{module}")
        for name, cfg in mod.launch_configs(**kwargs, fp32=dt == "fp32").items():
            jobs.append((label, module, kwargs, dt, name, cfg))
    with ProcessPoolExecutor(max(1, args.jobs)) as ex:
        rows = list(ex.map(compile_one, jobs))

    head = (f"{'kernel':<20} {'case':<15} {'dtype':<5} {'tiles':<30} {'warps':>5} {'stg':>3} {'regs':>4} "
            f"{'spillST':>7} {'spillLD':>7} {'smem':>6} {'CTA/SM':>6} {'warps/SM':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['kernel']:<20} {r['case']:<15} {r['dt']:<5} {r['tiles']:<30} {r['warps']:>5} {r['stages']:>3} "
              f"{r['regs']:>4} {r['spill_st']:>7} {r['spill_ld']:>7} {r['smem']:>6} {r['ctas']:>6} "
              f"{r['ctas'] * r['warps'] if r['ctas'] > 0 else -1:>8}")
    spilling = [r for r in rows if r["spill_st"] or r["spill_ld"]]
    print(f"\n{len(rows)} kernels compiled for sm_90; {len(spilling)} spill registers.")
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
