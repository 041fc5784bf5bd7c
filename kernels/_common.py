"""What the Triton kernels share: the fp32-accumulating dot, the interpreter's bf16 workaround, launcher helpers."""
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


def _fix_old_interpreter() -> None:
    """triton < 3.8's interpreter turns a scalar (a shape-(1,) array) into an index with int(array), an error
    since numpy 2.4 (e.g. `range(n_lo, n_hi, BLOCK_N)` in the kernels); triton 3.8 squeezes first. Do the same
    there. Only the CPU interpreter is touched; compiled kernels are not."""
    if not interpreting() or tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 8):
        return
    try:
        from triton.runtime import interpreter
        patch = interpreter._patch_lang_tensor
    except (ImportError, AttributeError):
        return
    if getattr(patch, "_intcoop_fixed", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    patched._intcoop_fixed = True
    interpreter._patch_lang_tensor = patched


_fix_old_interpreter()


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
