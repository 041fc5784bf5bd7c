"""What tests and benches share: the per-dtype tolerance table and random inputs for each op.

The references themselves live beside each op (`intcoop.ops.<op>.reference`); this module only builds inputs
and compares. Everything random here is seeded and never zeros.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

# One table: output and gradient tolerances per compute dtype, against a float64 reference.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg: str = ""):
    """torch.testing.assert_close with the table's tolerances for `dtype` (default: actual's dtype)."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{msg}\n{m}" if msg else m)


def perturb_prompt(model, seed: int = 0, std: float = 0.05):
    """Add seeded noise to every learned parameter of an IntCoOp (W_o included), so that no identity holds by
    accident and every learned part is active. Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p) * std)
    return model


def cu_seqlens(lengths, device="cpu") -> torch.Tensor:
    """[S+1] int32 offsets of segments of the given lengths."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(list(lengths), dtype=torch.int32).cumsum(0)
    return out.to(device)


def prefix_attention_inputs(B: int, P: int, lens_k, H: int, Dh: int, lens_q=None, dtype=torch.float32,
                            device="cpu", seed: int = 0, requires_grad: bool = False):
    """Random (q, k, v, pk, pv, cu_q, cu_k, max_q, max_k, scale) for `ops.prefix_attention`.

    lens_k: suffix length of each segment; lens_q: queries per segment (default lens_k; 1 = last row only).
    """
    lens_q = list(lens_k) if lens_q is None else list(lens_q)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    q = rnd(B, sum(lens_q), H, Dh)
    k, v = rnd(B, sum(lens_k), H, Dh), rnd(B, sum(lens_k), H, Dh)
    pk, pv = rnd(B, P, H, Dh), rnd(B, P, H, Dh)
    return (q, k, v, pk, pv, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device), max(lens_q), max(lens_k),
            Dh ** -0.5)


def patch_pool_inputs(R: int, B: int, L: int, W: int, dtype=torch.float32, device="cpu", seed: int = 0,
                      requires_grad: bool = False):
    """Random (qt [R, W], z [B, L, W], scale) for `ops.patch_pool`, scaled like LayerNorm-ed CLIP tokens."""
    g = torch.Generator().manual_seed(seed)
    qt = (torch.randn(R, W, generator=g, dtype=torch.float64) * 0.5).to(device=device, dtype=dtype)
    z = torch.randn(B, L, W, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return qt.requires_grad_(requires_grad), z.requires_grad_(requires_grad), 64 ** -0.5


# ------------------------------------------------------------------------------------------------ benches

def wall_time(fn, *args) -> tuple[float, object]:
    """(seconds, result) of one call of fn(*args), synchronised with the GPU before and after when there is one."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def wall_median(fn, rounds: int) -> tuple[float, object]:
    """(median seconds over `rounds` calls, the last result)."""
    runs = [wall_time(fn) for _ in range(rounds)]
    return statistics.median(t for t, _ in runs), runs[-1][1]


REHEARSE_ENV = "INTCOOP_BENCH_REHEARSE"


def gpu_bench_device() -> str | None:
    """Where the GPU benches run: "cuda" on a GPU; "cpu" when INTCOOP_BENCH_REHEARSE=1 on a machine without one
    (tiny sizes, Triton through its interpreter: this checks the bench code before a GPU run, its figures mean
    nothing); None otherwise (the benches skip)."""
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get(REHEARSE_ENV) == "1" else None
