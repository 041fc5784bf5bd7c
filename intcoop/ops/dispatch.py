"""Backend choice for the package's ops: one place that knows which implementation runs where.

Each backend declares what it supports (devices, dtypes, head dims) and, for given inputs, the list of
reasons it cannot run them (`not_supported_reasons`, after xformers). `choose(op, *tensors)` walks the priority
list and returns the first backend with no reasons; when none fits it raises one error naming every backend
and why. `INTCOOP_BACKEND=<name>` forces a backend for every op it implements (an error, with its reasons, if it cannot
run them); ops it does not implement at all (patch_pool has no C++ CPU kernel) keep the usual choice.

Backends, in order of preference:
    triton  kernels in `intcoop.kernels` (CUDA; CPU tensors too when TRITON_INTERPRET=1 and forced)
    cuda    the compiled CUDA twins in `csrc/` (`intcoop._C`)
    cpp     the compiled C++/OpenMP CPU ops in `csrc/` (`intcoop._C`)
    torch   plain PyTorch (every device and dtype; the float64 references live beside each op)
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field

import torch

__all__ = ["Backend", "BACKENDS", "choose", "report", "register_torch_backend", "forced_backend", "lse_dtype"]

ENV = "INTCOOP_BACKEND"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the log-sum-exp that the attention ops save for backward: float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Backend:
    """One implementation family. `ops` maps an op name to an object with `fwd` and `bwd` (same signatures
    as the op's custom op); `load` fills it lazily and returns a reason string when the backend is missing."""

    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int = 256
    ops: dict = field(default_factory=dict)
    loader: object = None
    _load_error: str | None = None
    _loaded: bool = False

    def load_error(self) -> str | None:
        """None when the backend's code is importable and built here, else why not."""
        if not self._loaded:
            self._loaded = True
            if self.loader is not None:
                try:
                    self._load_error = self.loader(self)
                except Exception as exc:  # a broken build or import must not break the package
                    self._load_error = f"failed to load: {type(exc).__name__}: {exc}"
        return self._load_error

    def device_ok(self, device: torch.device) -> str | None:
        if device.type in self.devices:
            return None
        if self.name == "triton" and device.type == "cpu":
            return "CPU tensors need TRITON_INTERPRET=1 and INTCOOP_BACKEND=triton"
        return f"device {device.type} not supported (supports {', '.join(self.devices)})"

    def not_supported_reasons(self, op: str, *tensors: torch.Tensor, head_dim: int | None = None) -> list[str]:
        """Every reason this backend cannot run `op` on these inputs; empty when it can."""
        err = self.load_error()
        if err:
            return [err]
        reasons = []
        if op not in self.ops:
            reasons.append(f"no implementation of {op}")
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            reasons.append(f"inputs on several devices: {sorted(map(str, devices))}")
        for d in devices:
            r = self.device_ok(d)
            if r:
                reasons.append(r)
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:
            reasons.append(f"mixed dtypes {sorted(map(str, dtypes))}")
        bad = [str(d) for d in dtypes if d not in self.dtypes]
        if bad:
            reasons.append(f"dtype {', '.join(bad)} not supported (supports {', '.join(map(str, self.dtypes))})")
        if head_dim is not None and head_dim > self.max_head_dim:
            reasons.append(f"head dim {head_dim} > {self.max_head_dim}")
        return reasons


def _load_triton(backend: Backend) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpret and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
    mod = importlib.import_module("intcoop.kernels")
    backend.ops.update(mod.OPS)
    backend.devices = ("cuda", "cpu") if interpret else ("cuda",)
    return None


def _load_compiled(device: str):
    def load(backend: Backend) -> str | None:
        from . import _ext

        err = _ext.load_error()
        if err:
            return err
        missing = _ext.missing_kernels(device)
        if missing:
            return missing
        backend.ops.update(_ext.ops(device))
        return None
    return load


BACKENDS: list[Backend] = [
    Backend("triton", ("cuda",), _FLOATS, 256, loader=_load_triton),
    Backend("cuda", ("cuda",), _FLOATS, 256, loader=_load_compiled("cuda")),
    Backend("cpp", ("cpu",), (torch.float32, torch.float64), 256, loader=_load_compiled("cpu")),
    Backend("torch", ("cpu", "cuda", "mps", "xpu"), _FLOATS + (torch.float64,), 1 << 30),
]
_BY_NAME = {b.name: b for b in BACKENDS}


def register_torch_backend(op: str, impl) -> None:
    """Each op module registers its plain-PyTorch implementation here (the always-available fallback)."""
    _BY_NAME["torch"].ops[op] = impl


def forced_backend() -> str | None:
    name = os.environ.get(ENV, "").strip().lower() or None
    if name is not None and name not in _BY_NAME and name != "auto":
        raise ValueError(f"{ENV}={name!r} is not a backend; choose one of {', '.join(_BY_NAME)} or auto")
    return None if name == "auto" else name


def choose(op: str, *tensors: torch.Tensor, head_dim: int | None = None):
    """The implementation of `op` for these inputs: the forced backend, or the first that fits."""
    forced = forced_backend()
    if forced and (_BY_NAME[forced].load_error() or op in _BY_NAME[forced].ops):
        backend = _BY_NAME[forced]
        reasons = backend.not_supported_reasons(op, *tensors, head_dim=head_dim)
        if reasons:
            raise RuntimeError(f"{ENV}={forced} cannot run {op}: " + "; ".join(reasons))
        return backend.ops[op]
    why = {}
    for backend in BACKENDS:      # on the CPU, cpp beats torch by 5-10x (benches/bench_ops_cpu.py)
        if backend.name == "triton" and tensors[0].device.type == "cpu":
            why[backend.name] = ["the Triton interpreter runs only when forced (INTCOOP_BACKEND=triton)"]
            continue
        reasons = backend.not_supported_reasons(op, *tensors, head_dim=head_dim)
        if not reasons:
            return backend.ops[op]
        why[backend.name] = reasons
    lines = "\n".join(f"  {name}: {'; '.join(r)}" for name, r in why.items())
    raise RuntimeError(f"no backend can run {op} on these inputs:\n{lines}")


def report(device: str = "cpu") -> list[tuple[str, str, str]]:
    """(backend, status, detail) for each backend on `device`: built?, usable here?, and why not."""
    rows = []
    probe = torch.empty(1, device=device)
    for backend in BACKENDS:
        err = backend.load_error()
        if err:
            rows.append((backend.name, "unavailable", err))
            continue
        r = backend.device_ok(probe.device)
        rows.append((backend.name, "usable" if r is None else "built, not usable here",
                     r or f"ops: {', '.join(sorted(backend.ops))}"))
    return rows
