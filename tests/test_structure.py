"""The shape of the code: the walls between site and coordinator, small modules, no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "common", "server", "fedsynth")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports (at any depth of the file: function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_the_site_and_the_coordinator_never_import_each_other():
    modules = _modules()
    for name, path in modules.items():
        imported = {m.split(".")[0] for m in _imports(path, name, modules)}
        top = name.split(".")[0]
        if top == "client":
            assert "server" not in imported and "fedsynth" not in imported, name
        if top == "server":
            assert "client" not in imported and "fedsynth" not in imported, name
        if top == "common":
            assert imported <= {"common"}, (name, imported)


def test_no_module_is_over_the_size_limit():
    too_long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not too_long, too_long


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    # a package importing its own submodules (re-exports) is not a cycle of concepts
    graph = {name: {m for m in deps if not m.startswith(name + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles[:3]


def _local_links(doc: Path) -> list[str]:
    """Relative link targets of a markdown file (``](target)``), without anchors, web addresses or mail."""
    import re
    targets = re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8"))
    return [t.split("#", 1)[0] for t in targets if not t.startswith(("http://", "https://", "mailto:", "#"))]


def test_every_file_the_readme_and_the_docs_link_to_exists():
    """The README's map and the docs send a newcomer to files in one step: a moved or renamed file must not leave a
    dead link (the README's measurements and privacy account live in docs/ since stop 66)."""
    docs = [ROOT / "README.md", ROOT / "deploy" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert (ROOT / "docs" / "results.md") in docs and (ROOT / "docs" / "privacy.md") in docs
    dead = [f"{doc.relative_to(ROOT)} -> {target}" for doc in docs for target in _local_links(doc)
            if target and not (doc.parent / target).exists()]
    assert not dead, dead
