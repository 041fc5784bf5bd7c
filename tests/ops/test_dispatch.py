"""The backends declare themselves and `dispatch.choose` walks them: each backend's declared devices, dtypes, head
dims, ops and limits; the no-backend error (inputs' shapes, dtypes, devices and every backend's reasons); forcing
with INTCOOP_BACKEND; `report`; and that importing the kernels patches nothing (test setup does, explicitly).

Shape-only checks use tensors on the "meta" device: no memory, no kernels.
"""
import os
import subprocess
import sys

import pytest
import torch

from intcoop.ops import dispatch, patch_pool, prefix_attention
from intcoop.ops.dispatch import Backend, NoBackendError, OpSupport
from intcoop.testing import TOLERANCES, patch_pool_inputs, prefix_attention_inputs

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
NAMES = ["triton", "cuda", "cpp", "torch"]


def _by_name():
    return {b.name: b for b in dispatch.BACKENDS}


def _meta(*shape, dtype=F32):
    return torch.empty(shape, dtype=dtype, device="meta")


# ------------------------------------------------------------------------------------------- declarations

def test_priority_and_declared_ops():
    b = _by_name()
    assert [x.name for x in dispatch.BACKENDS] == NAMES
    assert set(b["triton"].ops) == set(b["cuda"].ops) == set(b["torch"].ops) == {"prefix_attention", "patch_pool"}
    assert set(b["cpp"].ops) == {"prefix_attention"}          # patch_pool: torch's GEMMs on the CPU
    assert b["triton"].devices == b["cuda"].devices == ("cuda",) and b["cpp"].devices == ("cpu",)
    assert {"cpu", "cuda"} <= set(b["torch"].devices)
    assert b["triton"].forced_devices == (("cpu",) if os.environ.get("TRITON_INTERPRET") == "1" else ())


@pytest.mark.parametrize("name,op,dtypes,max_head_dim", [
    ("triton", "prefix_attention", (F16, BF16, F32), 256),
    ("triton", "patch_pool", (F16, BF16, F32), None),
    ("cuda", "prefix_attention", (F16, BF16, F32), 256),
    ("cuda", "patch_pool", (F16, BF16, F32), None),
    ("cpp", "prefix_attention", (F16, BF16, F32, F64), None),
    ("torch", "prefix_attention", (F16, BF16, F32, F64), None),
    ("torch", "patch_pool", (F16, BF16, F32, F64), None),
])
def test_declared_dtypes_and_head_dims(name, op, dtypes, max_head_dim):
    support = _by_name()[name].ops[op]
    assert set(support.dtypes) == set(dtypes) and support.max_head_dim == max_head_dim
    assert set(support.dtypes) <= set(TOLERANCES)            # every dtype a backend takes has a tolerance
    for dt in (F16, BF16, F32, F64):
        reasons = support.reasons((_meta(2, 3, 2, 8, dtype=dt),), 8)
        assert (reasons == []) == (dt in dtypes), (dt, reasons)
    if max_head_dim is not None:
        assert support.reasons((_meta(1, 3, 1, 8),), max_head_dim) == []
        too_wide = support.reasons((_meta(1, 3, 1, 8),), max_head_dim + 1)
        assert too_wide == [f"head dim {max_head_dim + 1} > {max_head_dim}"]


def test_declared_limits_of_the_cuda_backend():
    """The CUDA twins launch one block row per image (and head): at most 65535 of each."""
    cuda = _by_name()["cuda"]
    q = _meta(65536, 3, 2, 8)
    (reason,) = cuda.ops["prefix_attention"].reasons((q, q, q, q, q), 8)
    assert reason == "q [65536, 3, 2, 8]: at most 65535 images (B) and heads (H) (a CUDA grid dimension)"
    assert cuda.ops["prefix_attention"].reasons((_meta(3, 3, 65536, 8),), 8) != []
    assert cuda.ops["prefix_attention"].reasons((_meta(65535, 3, 65535, 8),), 8) == []
    (reason,) = cuda.ops["patch_pool"].reasons((_meta(4, 8), _meta(65536, 5, 8)), None)
    assert reason.startswith("z [65536, 5, 8]: at most 65535 images (B)")
    assert cuda.ops["patch_pool"].reasons((_meta(4, 8),), None) == []       # a one-tensor probe has no z


def test_reasons_for_devices_and_mixed_inputs():
    b = _by_name()
    q = torch.ones(1, 2, 1, 4)
    assert b["cuda"].not_supported_reasons("prefix_attention", q) == ["device cpu not supported (supports cuda)"]
    assert b["cpp"].not_supported_reasons("patch_pool", q) == ["no implementation of patch_pool"]
    assert b["cpp"].not_supported_reasons("prefix_attention", q.to(torch.int32)) == [
        "dtype torch.int32 not supported (supports torch.float16, torch.bfloat16, torch.float32, torch.float64)"]
    mixed = b["torch"].not_supported_reasons("prefix_attention", q, q.double(), q.to("meta"))
    assert "inputs on several devices: cpu, meta" in mixed
    assert "mixed dtypes torch.float32, torch.float64" in mixed
    triton = b["triton"].not_supported_reasons("prefix_attention", q)
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert triton == ["runs on cpu only when forced (INTCOOP_BACKEND=triton)"]
        assert b["triton"].not_supported_reasons("prefix_attention", q, forced=True) == []
    else:
        assert triton[0].startswith("device cpu not supported (supports cuda); CPU tensors need TRITON_INTERPRET=1")


def test_backend_dtypes_is_the_union_over_its_ops():
    assert _by_name()["cpp"].dtypes == (F16, BF16, F32, F64)
    assert set(_by_name()["torch"].dtypes) == {F16, BF16, F32, F64}


# ------------------------------------------------------------------------------------------------ choose

def test_choose_walks_the_list_without_knowing_names(monkeypatch):
    """A backend declared like the others is picked by its declarations and place in the list alone."""
    class Probe(Backend):
        name = "probe"
        devices = ("cpu",)
        ops = {"patch_pool": OpSupport((F64,))}

        def _load(self):
            self._impls["patch_pool"] = "probe impl"

    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setattr(dispatch, "BACKENDS", [Probe()] + dispatch.BACKENDS)
    qt, z, _ = patch_pool_inputs(3, 2, 5, 4, dtype=F64)
    assert dispatch.choose("patch_pool", qt, z) == "probe impl"
    assert dispatch.choose("patch_pool", qt.float(), z.float()) is patch_pool.TorchPatchPool   # probe: f64 only
    assert dispatch.choose("prefix_attention", *prefix_attention_inputs(1, 1, [2], 1, 4, dtype=F64)[:5]) \
        is not None                                                                            # probe: no such op


def test_no_backend_error_names_inputs_and_every_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    args = prefix_attention_inputs(1, 1, [2], 1, 4)
    ints = [t.long() for t in args[:5]]
    with pytest.raises(NoBackendError) as err:
        dispatch.choose("prefix_attention", *ints, head_dim=4)
    text = str(err.value)
    assert isinstance(err.value, RuntimeError)
    assert text.startswith("no backend can run prefix_attention on q [1, 2, 1, 4] torch.int64 cpu, "
                           "k [1, 2, 1, 4] torch.int64 cpu, v [1, 2, 1, 4] torch.int64 cpu, "
                           "pk [1, 1, 1, 4] torch.int64 cpu, pv [1, 1, 1, 4] torch.int64 cpu (head dim 4):\n")
    lines = text.splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == [f"  {n}" for n in NAMES]
    assert lines[1].startswith("  cuda: device cpu not supported (supports cuda); dtype torch.int64 not supported")
    assert "dtype torch.int64 not supported (supports torch.float16, torch.bfloat16, torch.float32, torch.float64)" in lines[2]
    assert "dtype torch.int64 not supported" in lines[3]


def test_patch_pool_error_names_its_inputs(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    with pytest.raises(NoBackendError, match=r"on qt \[3, 4\] torch.int32 cpu, z \[2, 5, 4\] torch.int32 cpu:"):
        dispatch.choose("patch_pool", torch.ones(3, 4, dtype=torch.int32), torch.ones(2, 5, 4, dtype=torch.int32))


@pytest.mark.parametrize("forced,inputs,why", [
    ("cuda", dict(dtype=F32), "device cpu not supported (supports cuda)"),
    ("cpp", dict(dtype=torch.int32), "dtype torch.int32 not supported (supports torch.float16, torch.bfloat16, torch.float32, torch.float64)"),
    ("triton", dict(dtype=F64), "dtype torch.float64 not supported"),
])
def test_forcing_a_backend_that_cannot_run_says_why(forced, inputs, why, monkeypatch):
    monkeypatch.setenv(dispatch.ENV, forced)
    args = prefix_attention_inputs(1, 1, [2], 1, 4, **inputs)
    with pytest.raises(NoBackendError) as err:
        prefix_attention.prefix_attention(*args)
    dt = inputs["dtype"]
    assert str(err.value).startswith(f"INTCOOP_BACKEND={forced} cannot run prefix_attention on "
                                     f"q [1, 2, 1, 4] {dt} cpu, ")
    assert why in str(err.value)


def test_forcing_keeps_the_usual_choice_for_undeclared_ops(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "cpp")
    qt, z, _ = patch_pool_inputs(3, 2, 5, 4)
    assert dispatch.choose("patch_pool", qt, z) is patch_pool.TorchPatchPool
    monkeypatch.setenv(dispatch.ENV, "torch")
    assert dispatch.choose("prefix_attention", *prefix_attention_inputs(1, 1, [2], 1, 4)[:5]) \
        is prefix_attention.TorchPrefixAttention
    monkeypatch.setenv(dispatch.ENV, "warp-drive")
    with pytest.raises(ValueError, match="INTCOOP_BACKEND='warp-drive' is not a backend; choose one of triton, cuda"):
        dispatch.choose("patch_pool", qt, z)


def test_a_one_tensor_probe_is_described(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "cuda")
    with pytest.raises(NoBackendError, match=r"cannot run prefix_attention on input 0 \[1\] torch.float32 cpu: "):
        dispatch.choose("prefix_attention", torch.ones(1))


# ------------------------------------------------------------------------------------------------ report

def test_report_rows():
    rows = dispatch.report("cpu")
    assert [r[0] for r in rows] == NAMES and all(len(r) == 3 and r[2] for r in rows)
    status = {r[0]: r[1] for r in rows}
    detail = {r[0]: r[2] for r in rows}
    assert status["torch"] == "usable" and detail["torch"] == "ops: patch_pool, prefix_attention"
    assert status["cuda"] in ("unavailable", "built, not usable here")
    assert set(status.values()) <= {"usable", "usable when forced", "built, not usable here", "unavailable"}
    if os.environ.get("TRITON_INTERPRET") == "1" and dispatch._BY_NAME["triton"].load_error() is None:
        assert status["triton"] == "usable when forced"
        assert detail["triton"].endswith("ops: patch_pool, prefix_attention")


# --------------------------------------------------------------------------- nothing patched at import time

def test_importing_the_kernels_patches_nothing():
    """intcoop.kernels and its kernel modules leave Triton's interpreter as it is; test setup patches it."""
    pytest.importorskip("triton")
    code = ("import triton.runtime.interpreter as i; before = i._patch_lang_tensor\n"
            "import intcoop.kernels.prefix_attention, intcoop.kernels.patch_pool, intcoop.ops\n"
            "assert i._patch_lang_tensor is before, 'patched at import'\nprint('unchanged')")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "unchanged" in run.stdout, run.stdout + run.stderr[-2000:]


def test_patch_triton_interpreter_keeps_its_version_guard(monkeypatch):
    triton = pytest.importorskip("triton")
    from triton.runtime import interpreter

    from intcoop.testing import patch_triton_interpreter

    calls = []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", lambda tensor, scope: calls.append(tensor), raising=False)
    monkeypatch.setattr(triton, "__version__", "3.8.0")
    assert patch_triton_interpreter() is False                # 3.8 squeezes scalars itself
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert patch_triton_interpreter() is False                # compiled kernels are never touched
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert patch_triton_interpreter() is True
    assert patch_triton_interpreter() is False                # applied once

    class Scope:
        def set_attr(self, tensor, name, fn):
            calls.append(name)
    interpreter._patch_lang_tensor("t", Scope())
    assert calls == ["t", "__index__"]
