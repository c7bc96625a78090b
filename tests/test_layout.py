"""The package's shape: imports point down the floors of DESIGN.md's layout, no import cycle, no command module
imported by another, no module much over 450 lines. Read from the source with ``ast`` (function-level imports too)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "libkd"
# Floor of each module (by dotted prefix, longest match first): a module imports only from its floor or below, and
# from its own floor only inside its own package (the CLI's two modules, the top floor, are one).
FLOORS = {
    "libkd": 0, "libkd.config": 0, "libkd.fileio": 0, "libkd.losses": 0, "libkd.progress": 0,
    "libkd.models": 1, "libkd.data": 1, "libkd.engine": 1,
    "libkd.teachers": 2, "libkd.distributed": 2,
    "libkd.store": 3, "libkd.evaluate": 3, "libkd.report": 3,
    "libkd.train_teacher": 4, "libkd.distill": 4, "libkd.deploy": 4,
    "libkd.predict": 5,
    "libkd.study": 6,
    "libkd.cli": 7, "libkd.commands": 7, "libkd.__main__": 7,
}
COMMANDS = ("libkd.train_teacher", "libkd.distill", "libkd.deploy", "libkd.predict", "libkd.study")
MAX_LINES = 460


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = ("libkd", *path.relative_to(SRC).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def owner(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text())
    # Imports for type hints only (under TYPE_CHECKING) count too: a circle of types is a circle of knowledge.
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in (owner(x, known) for x in targets if x.startswith("libkd")) if t and t != name}
    return out


def floor(name: str) -> int:
    best = max((k for k in FLOORS if name == k or name.startswith(k + ".")), key=len)
    return FLOORS[best]


def top_package(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_every_module_has_a_floor_and_imports_point_down():
    known = modules()
    wrong = []
    for name, path in known.items():
        for target in imports(path, name, known):
            if name == "libkd" or target == "libkd":
                continue  # the package root holds only the version and the error base class
            up = floor(target) > floor(name)
            sideways = floor(target) == floor(name) < 7 and top_package(target) != top_package(name)  # cli + commands are one
            if up or sideways:
                wrong.append(f"{name} (floor {floor(name)}) imports {target} (floor {floor(target)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_and_no_command_imported_by_another():
    known = modules()
    graph = {name: imports(path, name, known) for name, path in known.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if nxt == "libkd" or (node.startswith(nxt + ".") and known[nxt].name == "__init__.py"):
                continue  # a package's __init__ re-exports its modules; a module importing a sibling via it is no cycle
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])
    for name, targets in graph.items():
        for target in targets:
            for command in COMMANDS:
                inside = target == command or target.startswith(command + ".")
                if inside and top_package(name) != command and not name.startswith(("libkd.cli", "libkd.commands", "libkd.study")):
                    assert command == "libkd.deploy" and name == "libkd.predict", f"{name} imports the command module {target}"


def test_no_module_is_much_over_450_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert not {n: c for n, c in long.items() if c > MAX_LINES}, {n: c for n, c in long.items() if c > MAX_LINES}


def test_no_module_imports_another_modules_private_name():
    private = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("libkd"):
                private += [f"{name} imports {node.module}.{a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, "\n".join(private)


def test_no_function_in_src_is_over_100_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 100:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, "\n".join(long)
