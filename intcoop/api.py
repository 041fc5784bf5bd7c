"""The front door for other code: `fast_logits(images, classnames, model=None)` and the default model.

Inputs are checked (class list, images) before any work; the work runs under `torch.inference_mode`, in chunks of
images and of classes, so memory stays bounded at N = 1000 classes on a CPU machine.
"""
from __future__ import annotations

import torch

from .clip import image_size
from .images import to_batch
from .inference import batched_logits, check_inputs, default_model
from .model import IntCoOp

__all__ = ["fast_logits", "default_max_rows", "max_rows_for_memory", "bytes_per_packed_row"]


def fast_logits(images, classnames, model: IntCoOp | None = None, *, batch_size: int = 64,
                max_rows: int | None = None, attr_targets: torch.Tensor | None = None,
                compile: bool | str | None = None) -> torch.Tensor:
    """Logits [B, N] of every image for every class name.

    images: a preprocessed [B, 3, H, W] float tensor, PIL image(s), or image file path(s) (the model's own
    preprocessing is applied to PIL images and files). classnames: N names (duplicates allowed).
    model: a trained or untrained IntCoOp; None uses `default_model()`. batch_size: images per chunk;
    max_rows: packed suffix rows (images x class tokens) per text-encoder chunk; None sizes it from the
    device's free memory (`default_max_rows`: 65,536 on a CPU). compile: run the text side
    under torch.compile (True: inductor; or a backend name); None (auto) = `inference.default_compile` for the
    model's device: eager today (faster on a CPU; not yet measured on a GPU). Returns float32
    on CPU.
    """
    if model is None:                                            # check the inputs before loading weights
        images, _ = check_inputs(images, classnames)
        model = default_model()
    suf = model.suffixes(classnames)                             # validates the class list before any work
    x = to_batch(images, model.preprocess, image_size(model.clip))
    if model.attributes_mode == "oracle" and (attr_targets is None or len(attr_targets) != len(x)):
        raise ValueError("attributes='oracle' needs attr_targets [B, D] for the B images")
    if max_rows is None:
        max_rows = default_max_rows(model, min(batch_size, len(x)) * suf.max_len)
    elif isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive number of packed rows or None, got {max_rows!r}")
    chunks = ((x[s:s + batch_size], attr_targets[s:s + batch_size] if attr_targets is not None else None)
              for s in range(0, x.shape[0], batch_size))
    return batched_logits(model, chunks, suf, compile=compile, max_rows=max_rows)[0]


# ---- max_rows: the text encoder's chunk of packed rows, sized from free memory --------------------------------
CPU_MAX_ROWS = 1 << 16      # on a CPU: a cache-friendly chunk (memory is not what limits it there)
MAX_ROWS_CAP = 1 << 22      # 4.2 M rows: B = 1000 images x N = 1000 classes in one chunk
MEMORY_FRACTION = 0.5       # of the free device memory given to one chunk's activations


def bytes_per_packed_row(width: int, mlp_width: int, dtype: torch.dtype) -> int:
    """Estimated peak bytes per packed suffix row in one text-encoder chunk (inference): at a layer's MLP about
    8 width-sized tensors (x, LayerNorm out, q/k/v, attention out, new residual, LayerNorm out) and 3 MLP-sized
    ones (fc1 out, QuickGELU's sigmoid and product) are alive, plus the attention's fp32 log-sum-exp; counted
    here as 12 width-sized + 3 MLP-sized values + 64 bytes, an upper bound with ~20 % to spare of what torch's
    profiler measured on a CPU at ViT-B-16 text shapes (fp32: 41.4 KB per row, linear in the rows; estimate
    49.2 KB). scripts/target_check.py measures it on a GPU."""
    elem = torch.empty((), dtype=dtype).element_size()
    return (12 * width + 3 * mlp_width) * elem + 64


def max_rows_for_memory(free_bytes: int, width: int, dtype: torch.dtype, mlp_width: int | None = None, *,
                        min_rows: int = 1, fraction: float = MEMORY_FRACTION, cap: int = MAX_ROWS_CAP) -> int:
    """Packed rows per text-encoder chunk whose activations fit in `fraction` of `free_bytes`: a power of two
    (the same value from call to call, so a compiled text side is not recompiled for a new one), at most `cap`,
    and at least `min_rows` (one class's rows for the image chunk: the encoder never splits a class).

    free_bytes: device memory available; width / mlp_width (default 4 x width): the text transformer's;
    dtype: its compute dtype."""
    if free_bytes < 0:
        raise ValueError(f"free_bytes must be >= 0, got {free_bytes}")
    if width < 1 or (mlp_width is not None and mlp_width < 1):
        raise ValueError(f"width and mlp_width must be >= 1, got {width} and {mlp_width}")
    if min_rows < 1 or cap < 1 or not 0 < fraction <= 1:
        raise ValueError(f"min_rows and cap must be >= 1 and 0 < fraction <= 1; got {min_rows}, {cap}, {fraction}")
    fit = int(free_bytes * fraction) // bytes_per_packed_row(width, mlp_width or 4 * width, dtype)
    rows = 1 << (fit.bit_length() - 1) if fit >= 1 else 1     # the largest power of two <= fit
    return max(min(rows, cap), min_rows)


def default_max_rows(model: IntCoOp, min_rows: int = 1) -> int:
    """fast_logits' max_rows for `model` on its device: from the free memory on a CUDA device (the driver's free
    memory plus what torch's allocator holds unused), CPU_MAX_ROWS elsewhere; at least `min_rows`."""
    device = model.device
    if device.type != "cuda":
        return max(CPU_MAX_ROWS, min_rows)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    blk = model.tower.blocks[0]
    fc = getattr(blk.mlp, "c_fc", None)
    mlp_width = fc.out_features if isinstance(fc, torch.nn.Linear) else None
    return max_rows_for_memory(free, model.tower.width, model.dtype, mlp_width, min_rows=min_rows)
