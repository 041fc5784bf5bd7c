"""Backend choice for the package's ops: the backends declare themselves here, and `choose` walks them.

Each backend is one small class (after xformers' fmha ops): the devices it runs on (and those it runs on only
when forced), and for each op it implements an `OpSupport` with the dtypes, the largest head dim and any extra
limits it has; `load` finds its code. `not_supported_reasons(op, *tensors)` lists every reason it cannot run
those inputs, from the declarations alone. `choose(op, *tensors)` walks the priority list and returns the first
backend's implementation with no reasons; when none fits it raises `NoBackendError` naming the inputs' shapes,
dtypes and devices and every backend's reasons. `INTCOOP_BACKEND=<name>` forces a backend for every op it
declares (an error, with its reasons, if it cannot run them); other ops keep the usual choice.

Backends, in order of preference:
    triton  kernels in `intcoop.kernels` (CUDA; CPU tensors too when TRITON_INTERPRET=1 and forced)
    cuda    the compiled CUDA twins in `csrc/` (`intcoop._C`)
    cpp     the compiled C++/OpenMP CPU ops in `csrc/` (`intcoop._C`); on the CPU 5-10x the torch backend;
            float32 / float64, and bfloat16 / float16 with float32 accumulation
    torch   plain PyTorch (every device and dtype; the float64 references live beside each op)
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Backend", "OpSupport", "NoBackendError", "BACKENDS", "choose", "report", "register_op",
           "forced_backend", "lse_dtype", "describe_inputs"]

ENV = "INTCOOP_BACKEND"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
GRID_YZ = 65535                          # CUDA's limit on grid dimensions y and z
_INPUTS: dict[str, tuple[str, ...]] = {}  # op -> names of the tensors its custom op passes to `choose`


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the log-sum-exp that the attention ops save for backward: float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class NoBackendError(RuntimeError):
    """No backend can run an op on the given inputs (or the forced one cannot)."""


# A limit takes the op's tensors (as passed to `choose`) and returns why they exceed it, or None.
Limit = Callable[[tuple], "str | None"]


@dataclass(frozen=True)
class OpSupport:
    """What one backend accepts for one op."""

    dtypes: tuple[torch.dtype, ...]      # every input tensor has one of these (and all the same)
    max_head_dim: int | None = None      # largest head dim (None: any); ops that have none pass no head_dim
    limits: tuple[Limit, ...] = ()       # extra constraints of this backend's implementation

    def reasons(self, tensors: tuple, head_dim: int | None) -> list[str]:
        out = []
        dtypes = list(dict.fromkeys(t.dtype for t in tensors))
        if len(dtypes) > 1:
            out.append(f"mixed dtypes {', '.join(map(str, dtypes))}")
        bad = [str(d) for d in dtypes if d not in self.dtypes]
        if bad:
            out.append(f"dtype {', '.join(bad)} not supported (supports {', '.join(map(str, self.dtypes))})")
        if head_dim is not None and self.max_head_dim is not None and head_dim > self.max_head_dim:
            out.append(f"head dim {head_dim} > {self.max_head_dim}")
        return out + [r for r in (limit(tensors) for limit in self.limits) if r]


class Backend:
    """One implementation family, declared by a subclass: `name`, `devices` (auto choice may pick it there),
    `forced_devices` (it runs there only when INTCOOP_BACKEND names it), `device_hint` (said when a device is
    not supported), `ops` {op: OpSupport}; `_load` imports its code and fills `_impls` {op: obj with fwd, bwd}."""

    name = ""
    devices: tuple[str, ...] = ()
    forced_devices: tuple[str, ...] = ()
    device_hint = ""
    ops: dict[str, OpSupport] = {}

    def __init__(self):
        self._impls: dict = {}
        self._loaded, self._load_error = False, None

    def _load(self) -> str | None:
        return None

    def load_error(self) -> str | None:
        """None when the backend's code is importable and built here, else why not (cached)."""
        if not self._loaded:
            self._loaded = True
            try:
                self._load_error = self._load()
            except Exception as exc:  # a broken build or import must not break the package
                self._load_error = f"failed to load: {type(exc).__name__}: {exc}"
        return self._load_error

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        """Every dtype some op of this backend accepts."""
        return tuple(dict.fromkeys(d for s in self.ops.values() for d in s.dtypes))

    def built_ops(self) -> list[str]:
        return sorted(op for op in self.ops if op in self._impls) if not self.load_error() else []

    def device_reason(self, device: str, forced: bool = False) -> str | None:
        """Why it cannot run on this device type (None: it can)."""
        if device in self.devices or (forced and device in self.forced_devices):
            return None
        if device in self.forced_devices:
            return f"runs on {device} only when forced ({ENV}={self.name})"
        return (f"device {device} not supported (supports {', '.join(self.devices)})"
                + (f"; {self.device_hint}" if self.device_hint else ""))

    def not_supported_reasons(self, op: str, *tensors: torch.Tensor, head_dim: int | None = None,
                              forced: bool = False) -> list[str]:
        """Every reason this backend cannot run `op` on these inputs; empty when it can. The declarations are
        read first; the code is loaded (once) only when they allow the inputs."""
        support = self.ops.get(op)
        if support is None:
            return [f"no implementation of {op}"]
        reasons = []
        devices = list(dict.fromkeys(t.device.type for t in tensors))
        if len({t.device for t in tensors}) > 1:
            reasons.append(f"inputs on several devices: {', '.join(sorted({str(t.device) for t in tensors}))}")
        reasons += [r for r in (self.device_reason(d, forced) for d in devices) if r]
        reasons += support.reasons(tensors, head_dim)
        if reasons:
            return reasons
        err = self.load_error()
        if err:
            return [err]
        return [] if op in self._impls else [f"{op} is declared but was not built or found ({self._missing(op)})"]

    def _missing(self, op: str) -> str:
        return "not registered"

    def impl(self, op: str):
        return self._impls[op]

    def __repr__(self):
        return f"<backend {self.name}: devices {self.devices}, ops {sorted(self.ops)}>"


# ---------------------------------------------------------------------------------------- the backends

def _grid_limit(index: int, name: str, dims: tuple[int, ...], what: str, cuda_only: bool = False) -> Limit:
    """A limit: dims `dims` of input `index` (`name`, when it has them) at most GRID_YZ (CUDA grid dims y, z)."""
    def limit(tensors):
        t = tensors[index] if len(tensors) > index else None
        if t is None or (cuda_only and not t.is_cuda) or t.dim() <= max(dims):
            return None
        if any(t.shape[i] > GRID_YZ for i in dims):
            return f"{name} {list(t.shape)}: at most {GRID_YZ} {what} (a CUDA grid dimension)"
        return None
    return limit


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda",)
    device_hint = "CPU tensors need TRITON_INTERPRET=1 and INTCOOP_BACKEND=triton"
    # Grids (heads, row tiles, images) and (width blocks, row blocks, images): images on grid dim z.
    ops = {"prefix_attention": OpSupport(_FLOATS, 256, (_grid_limit(0, "q", (0,), "images (B)", cuda_only=True),)),
           "patch_pool": OpSupport(_FLOATS, None, (_grid_limit(1, "z", (0,), "images (B)", cuda_only=True),))}

    @property
    def forced_devices(self):
        return ("cpu",) if _interpreting() else ()

    def _load(self):
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (pip install triton)"
        if not _interpreting() and not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
        self._impls.update(importlib.import_module("intcoop.kernels").OPS)
        return None


class CompiledBackend(Backend):
    """The ops of `intcoop._C` registered for one dispatch key (CPU or CUDA)."""

    def __init__(self, name: str, device: str, ops: dict[str, OpSupport]):
        super().__init__()
        self.name, self.devices, self.ops, self._device = name, (device,), ops, device

    def _load(self):
        from . import _ext

        err = _ext.load_error() or _ext.missing_kernels(self._device)
        if err:
            return err
        self._impls.update(_ext.ops(self._device))
        return None

    def _missing(self, op):
        return f"intcoop._C has no {self._device} kernel of {op}"


class TorchBackend(Backend):
    name = "torch"
    devices = ("cpu", "cuda", "mps", "xpu")
    ops = {"prefix_attention": OpSupport(_FLOATS + (torch.float64,)),
           "patch_pool": OpSupport(_FLOATS + (torch.float64,))}

    def _missing(self, op):
        return f"intcoop.ops.{op} registers it when imported"


_TORCH = TorchBackend()
BACKENDS: list[Backend] = [
    TritonBackend(),
    CompiledBackend("cuda", "cuda", {
        "prefix_attention": OpSupport(_FLOATS, 256, (_grid_limit(0, "q", (0, 2), "images (B) and heads (H)"),)),
        "patch_pool": OpSupport(_FLOATS, None, (_grid_limit(1, "z", (0,), "images (B)"),)),
    }),
    # patch_pool has no C++ CPU kernel: torch's two GEMMs are as fast as a loop could be. prefix_attention's
    # bfloat16 / float16 rows are converted to float32 per task and summed in float32 (csrc/cpu).
    CompiledBackend("cpp", "cpu", {"prefix_attention": OpSupport(_FLOATS + (torch.float64,))}),
    _TORCH,
]
_BY_NAME = {b.name: b for b in BACKENDS}


def register_op(op: str, torch_impl, inputs: tuple[str, ...]) -> None:
    """Each op module registers its plain-PyTorch implementation (the always-available fallback) and the names
    of the tensors its custom op passes to `choose` (for error messages)."""
    _TORCH._impls[op] = torch_impl
    _INPUTS[op] = tuple(inputs)


def forced_backend() -> str | None:
    name = os.environ.get(ENV, "").strip().lower() or None
    if name is not None and name not in _BY_NAME and name != "auto":
        raise ValueError(f"{ENV}={name!r} is not a backend; choose one of {', '.join(_BY_NAME)} or auto")
    return None if name == "auto" else name


def describe_inputs(op: str, tensors) -> str:
    """'q [2, 9, 2, 6] torch.float32 cpu, k ...': the inputs as the op names them."""
    names = _INPUTS.get(op, ())
    names = names if len(names) == len(tensors) else [f"input {i}" for i in range(len(tensors))]
    return ", ".join(f"{n} {list(t.shape)} {t.dtype} {t.device}" for n, t in zip(names, tensors))


def choose(op: str, *tensors: torch.Tensor, head_dim: int | None = None):
    """The implementation of `op` for these inputs: the forced backend, or the first that fits."""
    forced = forced_backend()
    if forced is not None and op in _BY_NAME[forced].ops:
        backend = _BY_NAME[forced]
        reasons = backend.not_supported_reasons(op, *tensors, head_dim=head_dim, forced=True)
        if reasons:
            raise NoBackendError(f"{ENV}={forced} cannot run {op} on {describe_inputs(op, tensors)}: "
                                 + "; ".join(reasons))
        return backend.impl(op)
    why = {}
    for backend in BACKENDS:
        reasons = backend.not_supported_reasons(op, *tensors, head_dim=head_dim)
        if not reasons:
            return backend.impl(op)
        why[backend.name] = reasons
    lines = "\n".join(f"  {name}: {'; '.join(r)}" for name, r in why.items())
    raise NoBackendError(f"no backend can run {op} on {describe_inputs(op, tensors)}"
                         + (f" (head dim {head_dim})" if head_dim is not None else "") + f":\n{lines}")


def report(device: str = "cpu") -> list[tuple[str, str, str]]:
    """(backend, status, detail) for each backend on `device`: built?, usable here?, and why not."""
    kind = torch.device(device).type
    rows = []
    for backend in BACKENDS:
        err = backend.load_error()
        if err:
            rows.append((backend.name, "unavailable", err))
            continue
        ops = f"ops: {', '.join(backend.built_ops())}"
        r = backend.device_reason(kind)
        if r is None:
            rows.append((backend.name, "usable", ops))
        elif backend.device_reason(kind, forced=True) is None:
            rows.append((backend.name, "usable when forced", f"{r}; {ops}"))
        else:
            rows.append((backend.name, "built, not usable here", r))
    return rows
