"""What the Triton kernels share: the fp32-accumulating dot, the interpreter's bf16 workaround, launcher helpers."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host side; the kernels take scale * log2(e) and use exp2


@triton.jit
def mm(a, b, acc, F32: tl.constexpr):
    """acc + a @ b in fp32. F32 upcasts the operands: triton 3.8's CPU interpreter gets bf16 tl.dot wrong."""
    if F32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def f32_dots(dtype: torch.dtype) -> bool:
    """Upcast tl.dot operands only where the interpreter would get them wrong (bf16 on the CPU interpreter)."""
    return interpreting() and dtype == torch.bfloat16


def last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
