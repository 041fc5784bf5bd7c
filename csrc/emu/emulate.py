"""CPU emulation of the CUDA kernels in csrc/cuda, so that tests can check their logic where no GPU is present.

The kernels (*.cu) and their torch-side launchers (*_cuda.cpp) are compiled as C++20 against include/, stand-ins
for the CUDA headers (blocks one at a time, a std::thread per CUDA thread, std::barrier for __syncthreads and
warp shuffles, c10::Half / c10::BFloat16 as the storage types), after a few textual rewrites of CUDA-only syntax:
the <<<...>>> launch, the dynamic shared memory, the device guard and stream, and the registration (CPU key of
torch.ops.intcoop_emu.*, same schemas as torch.ops.intcoop_C.*).
Checks indexing, masking, reductions, barriers and dtype conversions; not timing, the memory model, occupancy
or a real device's limits. `load()` builds once per source change (in ~/.cache/intcoop) and returns the ops.
"""
from __future__ import annotations

import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.dirname(HERE)
NAMESPACE = "intcoop_emu"


def _rewrite_cuda(text: str) -> str:
    text = text.replace("extern __shared__ float smem[];", "float* smem = emu::dynamic_smem();")
    text = re.sub(r"([\w:]+(?:<[\w, ]+>)?)<<<(.*?)>>>\((.*?)\);", r"emu::launch(\1, \2, \3);", text)
    text = text.replace("#include <c10/cuda/CUDAGuard.h>", "").replace("#include <c10/cuda/CUDAStream.h>", "")
    text = re.sub(r"const c10::cuda::CUDAGuard guard\(\w+\.device\(\)\);", "", text)
    text = text.replace("c10::cuda::getCurrentCUDAStream()", "nullptr")
    text = re.sub(r"\b(q|z)\.is_cuda\(\)", "true", text)
    return text.replace("TORCH_LIBRARY_IMPL(intcoop_C, CUDA, m)", f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU, m)")


def _write_if_changed(path: str, text: str) -> None:
    if os.path.exists(path) and open(path).read() == text:
        return  # keep the mtime, so that ninja does not recompile
    with open(path, "w") as fh:
        fh.write(text)


def rewrite(dst: str) -> list[str]:
    """Write the rewritten sources into dst; returns the .cpp files to compile."""
    os.makedirs(dst, exist_ok=True)
    sources = []
    cuda_dir = os.path.join(CSRC, "cuda")
    for name in sorted(os.listdir(cuda_dir)):
        text = _rewrite_cuda(open(os.path.join(cuda_dir, name)).read())
        out = name[:-3] + "_cu.cpp" if name.endswith(".cu") else name
        _write_if_changed(os.path.join(dst, out), text)
        if out.endswith(".cpp"):
            sources.append(os.path.join(dst, out))
    bindings = open(os.path.join(CSRC, "bindings.cpp")).read()
    bindings = bindings[: bindings.index("// `import intcoop._C`")]  # the schemas, without the Python module
    bindings = bindings.replace("TORCH_LIBRARY(intcoop_C", f"TORCH_LIBRARY({NAMESPACE}")
    _write_if_changed(os.path.join(dst, "bindings.cpp"), bindings)
    return sources + [os.path.join(dst, "bindings.cpp")]


def load(build_dir: str | None = None, verbose: bool = False):
    """Build (or reuse) the emulated library and return torch.ops.intcoop_emu."""
    import torch
    from torch.utils.cpp_extension import load as load_extension

    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    build_dir = build_dir or os.path.join(cache, "intcoop", f"emu-torch{torch.__version__}")
    sources = rewrite(os.path.join(build_dir, "src"))
    load_extension(name=NAMESPACE, sources=sources, build_directory=build_dir, is_python_module=False,
                   extra_include_paths=[os.path.join(HERE, "include"), os.path.join(CSRC, "include")],
                   extra_cflags=["-std=c++20", "-O2", "-pthread"], extra_ldflags=["-pthread"], verbose=verbose)
    return getattr(torch.ops, NAMESPACE)
