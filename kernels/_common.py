"""What the Triton kernels share: the fp32-accumulating dot, the interpreter's bf16 workaround, launcher helpers.

Importing this patches nothing: the fix that old triton interpreters need under numpy >= 2.4 is applied by test
and bench setup (`intcoop.testing.patch_triton_interpreter`), never by the product."""
from __future__ import annotations

import functools
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


def on_input_device(launcher):
    """Run a launcher with its first tensor's CUDA device current: triton launches on the current device, which
    need not be the inputs' (e.g. tensors on cuda:1 while cuda:0 is current). CPU tensors (interpreter): as is."""
    @functools.wraps(launcher)
    def run(first, *args, **kwargs):
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)
    return run
