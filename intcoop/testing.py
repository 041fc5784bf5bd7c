"""What tests and benches share: the per-dtype tolerance tables (ops; whole models against float32) and random
inputs for each op.

The references themselves live beside each op (`intcoop.ops.<op>.reference`); this module only builds inputs
and compares. Everything random here is seeded and never zeros.
"""
from __future__ import annotations

import os

import torch

# Op-level table: output and gradient tolerances per compute dtype, against a float64 reference.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

# A whole model stored in bf16 / fp16 (model.precision) against the same model in float32, same inputs:
#   cos_atol   per entry of the cosines, logits / exp(logit_scale) (the scale-free form of the logits);
#   grad_rtol  the prompt learner's gradient in norm, ||g - g32|| / ||g32||.
# Set at about 2x the worst seen (tests/test_precision.py): tiny CLIP on real photos, N = 1000, bf16 4.7e-3 and
# 2.2e-2, fp16 6.8e-4 and 3.3e-3. Top-1 is kept for every image whose float32 margin (top-1 minus top-2 cosine)
# exceeds 2 x cos_atol.
PRECISION_TOLERANCES = {
    torch.bfloat16: dict(cos_atol=1e-2, grad_rtol=5e-2),
    torch.float16: dict(cos_atol=2e-3, grad_rtol=1e-2),
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


# -------------------------------------------------------------------------------- Triton interpreter

def patch_triton_interpreter() -> bool:
    """Make an old Triton CPU interpreter usable with numpy >= 2.4; test and bench setup call it, never the package.

    triton < 3.8's interpreter turns a scalar (a shape-(1,) array) into an index with int(array), an error since
    numpy 2.4 (e.g. `range(n_lo, n_hi, BLOCK_N)` in the kernels); triton 3.8 squeezes first. This does the same
    for older versions. Only the interpreter (TRITON_INTERPRET=1) is touched, compiled kernels never; a no-op on
    triton >= 3.8, without triton, or when already applied. Returns True when it patched something.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return False
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 8):
        return False
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_intcoop_fixed", False):
        return False

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    patched._intcoop_fixed = True
    interpreter._patch_lang_tensor = patched
    return True


# ------------------------------------------------------------------------------------------------ benches
