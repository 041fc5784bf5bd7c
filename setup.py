"""The compiled core of intcoop, intcoop._C (csrc/), described here once; pyproject.toml holds everything else
(metadata, dependencies, packages, package data, the console script). See README "Install by hand".

`pip install --no-build-isolation -e .` builds the optional extension `intcoop._C` with torch.utils.cpp_extension:
    always   csrc/*.cpp and csrc/cpu/*.cpp (C++17, OpenMP, -O3)
    CUDA     csrc/cuda/*.cpp and csrc/cuda/*.cu as well, when nvcc is found (CUDA_HOME, `which nvcc`, or
             /usr/local/cuda), torch is a CUDA build and INTCOOP_SKIP_CUDA is not 1
Environment: INTCOOP_SKIP_EXT=1 installs the pure-Python package (no compiled part); INTCOOP_SKIP_CUDA=1 builds
the CPU part only; TORCH_CUDA_ARCH_LIST defaults to DEFAULT_CUDA_ARCHS (covers the H100/H200, sm_90); MAX_JOBS
limits ninja's parallel compiles. CMakeLists.txt only drives this file; it lists no sources of its own.
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # A100, H100/H200 (sm_90) and PTX for newer GPUs; ~4 s more than "9.0" here
CPU_SOURCES = ("csrc/*.cpp", "csrc/cpu/*.cpp")
CUDA_SOURCES = ("csrc/cuda/*.cpp", "csrc/cuda/*.cu")

def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() == "1"


def sources(with_cuda: bool) -> list[str]:
    """The compiled sources, relative to the repository root: the one list (CMakeLists.txt globs the same folders)."""
    patterns = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    return sorted(f for p in patterns for f in glob.glob(p, root_dir=ROOT))


def find_cuda_home() -> str | None:
    """A CUDA toolkit root with bin/nvcc and include/cuda_runtime.h, or None.

    `which nvcc` may be a wrapper script (here /usr/local/bin/nvcc), whose parent is not the toolkit, so each
    candidate is checked for the header before torch.utils.cpp_extension sees it.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [os.path.dirname(os.path.dirname(p)) for p in (nvcc, os.path.realpath(nvcc))]
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
                os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def extension_modules():
    """([intcoop._C], {"build_ext": BuildExtension}), or ([], {}) when INTCOOP_SKIP_EXT=1."""
    if _flag("INTCOOP_SKIP_EXT"):
        return [], {}
    cuda_home = None if _flag("INTCOOP_SKIP_CUDA") else find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when it is imported
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError("building intcoop._C needs torch in the build environment: use "
                           "`pip install --no-build-isolation -e .`, or INTCOOP_SKIP_EXT=1 to skip the "
                           f"compiled part ({exc})") from exc
    with_cuda = cuda_home is not None and torch.version.cuda is not None
    cxx = ["-O3", "-fopenmp"]
    kwargs = dict(
        name="intcoop._C",
        sources=sources(with_cuda),
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo"]
        ext = CUDAExtension(**kwargs)
    else:
        ext = CppExtension(**kwargs)
    parts = f"C++ and CUDA ({cuda_home}, archs {os.environ['TORCH_CUDA_ARCH_LIST']})" if with_cuda else "C++ only"
    print(f"intcoop._C: {parts}, {len(kwargs['sources'])} sources")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

# Only what pyproject.toml cannot say: the compiled extension and torch's build_ext.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
