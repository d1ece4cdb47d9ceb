"""The shape of the source tree: no import circles, no stage prefixes, named packages.

Imports are read with ``ast``, wherever they stand (module level, inside functions, under
``TYPE_CHECKING``): a circle dodged by a late import is still a circle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "drivers", "firmware_bridge", "models")
STAGE_PREFIXES = ("cli_", "outbox_", "config_", "clean_", "uplink_")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported(path: Path, name: str, known: dict[str, Path]) -> Iterator[str]:
    """The project modules that the file at ``path`` (module ``name``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import mod`` imports the module ``pkg.mod``, like ``import pkg.mod``;
            # ``from pkg import name`` imports ``pkg`` itself.
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        else:
            continue
        for target in targets:
            if target in known and target != name:
                yield target


def import_graph() -> dict[str, set[str]]:
    known = project_modules()
    return {name: set(imported(path, name, known)) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_late_and_relative_imports(tmp_path: Path) -> None:
    graph = import_graph()
    assert "agent.readings" in graph["drivers.base"]  # a module-level import
    assert "agent.config.reference" in graph["agent.cli.main"]  # one inside a function


def test_no_two_project_files_import_each_other() -> None:
    found = cycles(import_graph())
    assert found == [], "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_stage_prefixes_directly_in_agent() -> None:
    flat = sorted(p.name for p in (ROOT / "agent").glob("*.py"))
    assert [n for n in flat if n.startswith(STAGE_PREFIXES)] == []


def test_every_package_says_what_it_owns() -> None:
    for init in sorted((ROOT / "agent").rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.split()) >= 12, f"{init.relative_to(ROOT)} has no docstring"
        if init.parent != ROOT / "agent":
            assert "import" in doc, f"{init.relative_to(ROOT)} does not say what it may import"


MQTT_LIBRARIES = ("paho", "aiomqtt")


def private_mqtt_uses(path: Path) -> list[str]:
    """Uses of a private name of paho or aiomqtt in ``path``: a ``_name`` attribute of anything
    but ``self``/``cls``, a private module or name imported, or a subclass of their classes
    (which is how private hooks get overridden)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[str] = []
    library_names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in MQTT_LIBRARIES:
                    library_names.add((a.asname or a.name).split(".")[0])
                    if any(part.startswith("_") for part in a.name.split(".")):
                        found.append(f"line {node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if parts[0] not in MQTT_LIBRARIES:
                continue
            for a in node.names:
                library_names.add(a.asname or a.name)
                if a.name.startswith("_") or any(p.startswith("_") for p in parts):
                    found.append(f"line {node.lineno}: from {node.module} import {a.name}")
    if not library_names:
        return []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"line {node.lineno}: .{node.attr}")
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                root = base
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in library_names:
                    found.append(f"line {node.lineno}: class {node.name} subclasses "
                                 f"{ast.unparse(base)}")
    return found


def test_the_private_name_check_catches_what_it_should(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import paho.mqtt.client as paho\nimport aiomqtt\n"
                   "class C(aiomqtt.Client):\n    pass\n"
                   "def f(c: paho.Client) -> None:\n    c._reset_sockets()\n")
    assert sorted(private_mqtt_uses(bad)) == ["line 3: class C subclasses aiomqtt.Client",
                                              "line 6: ._reset_sockets"]


def test_only_public_mqtt_library_api() -> None:
    files = sorted(p for pkg in (*PACKAGES, "bench", "tests")
                   for p in (ROOT / pkg).rglob("*.py") if p.name != "test_layout.py")
    found = {str(p.relative_to(ROOT)): uses for p in files if (uses := private_mqtt_uses(p))}
    assert found == {}
