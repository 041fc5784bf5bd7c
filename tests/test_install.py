"""The install: a clone named intcoop is not a namespace-package trap, and the README's manual build command
(`pip install --no-build-isolation -e .`) works with the pip and setuptools of a fresh `python3 -m venv` and with the
newest ones from PyPI.

The two builds run in throw-away venvs that see this venv's packages (torch above all) through a .pth file, from a
copy of the repository's files (tracked and untracked, not ignored) in a folder named intcoop, so that the
repository's own build/ is never touched. They build the C++ part only (INTCOOP_SKIP_CUDA=1, MAX_JOBS=2): one to
two minutes each on two busy cores (62 s and 110 s measured).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Run from the folder that holds a clone named intcoop: the clone must not shadow the installed package.
IMPORT_CHECK = """
import importlib.util, sys
import intcoop
assert intcoop.__file__ is not None, f"intcoop is a namespace package: {list(intcoop.__path__)}"
assert callable(intcoop.fast_logits)
import intcoop.kernels
assert importlib.util.find_spec("kernels") is None, "a top-level `kernels` is importable"
print(intcoop.__file__)
print(intcoop.kernels.__file__)
if "--compiled" in sys.argv:
    import intcoop._C
    print(intcoop._C.__file__)
"""


def _run(cmd, **kwargs) -> str:
    """Run `cmd`; its combined output, or a test failure that shows it."""
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-6000:]}"
    return proc.stdout


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _import_check(python, folder: Path, compiled: bool) -> list[str]:
    script = folder / "check_import.py"   # sys.path[0] is then `folder`, which holds the clone named intcoop
    script.write_text(IMPORT_CHECK)
    out = _run([python, script] + (["--compiled"] if compiled else []), cwd=folder, env=_clean_env())
    return out.strip().splitlines()[-(3 if compiled else 2):]


def _copy_repository(dest: Path) -> None:
    """The repository's files (tracked and untracked, without ignored ones such as .venv and build/) in `dest`;
    symlinks stay symlinks."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        names = _run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
        for name in filter(None, names.split("\0")):
            src, dst = ROOT / name, dest / name
            if src.is_symlink() or src.is_file():   # a tracked file deleted in the work tree is skipped
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst, follow_symlinks=False)
    else:
        shutil.copytree(ROOT, dest, symlinks=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "runs", "__pycache__", "*.so", "*.egg-info", ".pytest_cache", ".benchmarks"))


def _fresh_venv(path: Path) -> Path:
    """A `python3 -m venv` that also sees this venv's packages (after its own): its python."""
    _run([sys.executable, "-m", "venv", path])
    python = path / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    Path(purelib, "zz_intcoop_test_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _versions(python) -> str:
    """'pip X, setuptools Y' of that python (read from the metadata: importing pip disables setuptools' distutils)."""
    return _run([python, "-c", "from importlib.metadata import version as v; "
                               "print(f'pip {v(\"pip\")}, setuptools {v(\"setuptools\")}')"]).strip()


def _build_and_check(tmp_path: Path, python: Path, versions: str, *pip_args: str) -> None:
    """The README's command on a copy of the repository named intcoop, then the import check beside it."""
    clone = tmp_path / "intcoop"
    _copy_repository(clone)
    try:
        _run([python, "-m", "pip", "install", "-q", "--no-build-isolation", *pip_args, "-e", clone],
             cwd=tmp_path, env=_clean_env(INTCOOP_SKIP_CUDA="1", MAX_JOBS="2"))
        lines = _import_check(python, tmp_path, compiled=True)
    except AssertionError as exc:
        raise AssertionError(f"with {versions}: {exc}") from None
    for line in lines:   # the copy's package, its kernels and its library: not this repository's
        assert Path(line).resolve().is_relative_to(clone.resolve()), (versions, lines)


def test_a_clone_named_intcoop_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    (tmp_path / "intcoop").symlink_to(ROOT, target_is_directory=True)
    package, kernels = _import_check(sys.executable, tmp_path, compiled=False)
    assert Path(package).name == "__init__.py" and Path(kernels).parent.name == "kernels"


def test_manual_build_with_the_pip_and_setuptools_of_a_fresh_venv(tmp_path):
    python = _fresh_venv(tmp_path / "venv")
    versions = _versions(python)
    setuptools = tuple(int(x) for x in versions.rsplit(" ", 1)[1].split(".")[:2])
    if setuptools < (70, 1):
        # pyproject's build requirement: setuptools < 70.1 writes wheels with the `wheel` package, which
        # --no-build-isolation does not install (in a README install, torch brings setuptools >= 77 first)
        _run([python, "-m", "pip", "install", "-q", "wheel"], env=_clean_env())
    # --no-deps: torch's own requirement (setuptools >= 77) would otherwise replace the setuptools under test
    _build_and_check(tmp_path, python, versions, "--no-deps")
    assert _versions(python) == versions, "the build changed the venv's pip or setuptools"


def _pypi_unreachable() -> str | None:
    try:
        urllib.request.urlopen("https://pypi.org/simple/setuptools/", timeout=15).close()
    except OSError as exc:
        return f"no network to PyPI (https://pypi.org: {exc}): the newest pip and setuptools cannot be fetched"
    return None


def test_manual_build_with_the_newest_pip_and_setuptools_from_pypi(tmp_path):
    reason = _pypi_unreachable()
    if reason:
        pytest.skip(reason)
    python = _fresh_venv(tmp_path / "venv")
    _run([python, "-m", "pip", "install", "-q", "-U", "pip", "setuptools"], env=_clean_env())
    _build_and_check(tmp_path, python, _versions(python))
