"""The house: imports flow one way (a module imports only from its own room or a lower one), modules stay small.

The order of the rooms is the README's ("Design"); this test reads every module's import statements (the AST, not
an import, so lazy imports inside functions count too).
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "intcoop"
# lowest first; a module may import from its own room and from rooms before it
ORDER = ["_io", "config", "images", "ops", "clip_files", "clip", "vision", "text", "prompts", "model", "reference", "inference",
         "attributes", "data", "api", "evaluation", "train", "experiments", "demo", "cli"]
# entry points, test and bench support, built parts
TOP = {"__init__", "__main__", "testing", "benchmarking", "__version__", "_C", "kernels"}
MAX_LINES = 450


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        yield path, ".".join(rel.parts).removesuffix(".__init__")


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, module: str):
    """The intcoop modules (or names) that `module` imports, absolute."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target == "intcoop" or target.startswith("intcoop."):
            yield from ([target] if node.module else [f"{target}.{a.name}" for a in node.names])


def test_rooms_are_known_and_imports_flow_one_way():
    rank = {name: i for i, name in enumerate(ORDER)}
    upward, unknown = [], set()
    for path, module in _modules():
        room = _room(module)
        if room not in rank and room not in TOP:
            unknown.add(room)
        for target in _imports(path, module):
            other = _room(target)
            if other == room or room in TOP or other in TOP:
                continue
            if other not in rank:
                unknown.add(other)
            elif rank[other] > rank[room]:
                upward.append(f"{module} imports {target}")
    assert not unknown, f"rooms missing from the README's order: {sorted(unknown)}"
    assert not upward, "imports that go up the house:\n" + "\n".join(upward)


def test_no_module_imports_the_cli_or_the_api_below_them():
    offenders = [f"{m} imports {t}" for p, m in _modules() for t in _imports(p, m)
                 if _room(t) in ("cli", "api") and _room(m) not in ("cli", "api", "__init__", "__main__")]
    assert not offenders, offenders


def test_modules_are_small():
    big = [(len(p.read_text().splitlines()), m) for p, m in _modules() if len(p.read_text().splitlines()) > MAX_LINES]
    assert not big, f"modules over {MAX_LINES} lines: {big}"
