"""Every reading reason and window flag the code can emit is in ``agent.quality`` and explained
in docs/mqtt.md.

The codes are collected from the source with ``ast``: every string (or string constant, or
f-string / ``PREFIX + name`` prefix) that flows into a ``reasons`` or ``flags`` value, a
``Reading``'s reasons argument or a driver's ``self.reading(..., reasons)``. A new code that
bypasses the registry is caught here, as is a registry entry the docs do not explain.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from agent import quality

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("agent", "drivers", "firmware_bridge")
DOCS = ROOT / "docs" / "mqtt.md"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _trees() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p))
            for pkg in SOURCES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _constants(trees: dict[str, ast.Module]) -> dict[str, dict[str, str]]:
    """Module -> its string constants, own or imported from another project module (and
    ``module.NAME`` for ``from pkg import module as alias``)."""
    own: dict[str, dict[str, str]] = {}
    for name, tree in trees.items():
        consts: dict[str, str] = {}
        for node in tree.body:
            target: ast.expr | None = None
            value: ast.expr | None = None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            elif isinstance(node, ast.AnnAssign):
                target, value = node.target, node.value
            if isinstance(target, ast.Name) and isinstance(value, ast.Constant) \
                    and isinstance(value.value, str):
                consts[target.id] = value.value
        own[name] = consts
    out: dict[str, dict[str, str]] = {n: dict(c) for n, c in own.items()}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            for alias in node.names:
                local = alias.asname or alias.name
                if node.module in own and alias.name in own[node.module]:
                    out[name][local] = own[node.module][alias.name]
                sub = f"{node.module}.{alias.name}"
                for k, v in own.get(sub, {}).items():
                    out[name][f"{local}.{k}"] = v
    for name, tree in trees.items():  # NAME = other_module.NAME, NAME = IMPORTED
        for node in tree.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                got = list(_strings(node.value, out[name]))
                if len(got) == 1:
                    out[name].setdefault(node.target.id, got[0])
    return out


def _strings(expr: ast.expr | None, consts: dict[str, str]) -> Iterator[str]:
    """The codes an expression can produce (a prefix for ``f"x:{...}"`` or ``X + name``)."""
    if expr is None:
        return
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        yield expr.value
    elif isinstance(expr, ast.JoinedStr):
        head = expr.values[0] if expr.values else None
        if isinstance(head, ast.Constant) and isinstance(head.value, str):
            yield head.value
        else:
            yield "<f-string without a literal prefix>"
    elif isinstance(expr, ast.Name) and expr.id in consts:
        yield consts[expr.id]
    elif isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) \
            and f"{expr.value.id}.{expr.attr}" in consts:
        yield consts[f"{expr.value.id}.{expr.attr}"]
    elif isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
        yield from _strings(expr.left, consts)
        if not isinstance(expr.left, (ast.Constant, ast.Name, ast.Attribute, ast.JoinedStr)):
            yield from _strings(expr.right, consts)
    elif isinstance(expr, (ast.Tuple, ast.List, ast.Set)):
        for e in expr.elts:
            yield from _strings(e.value if isinstance(e, ast.Starred) else e, consts)
    elif isinstance(expr, ast.IfExp):
        yield from _strings(expr.body, consts)
        yield from _strings(expr.orelse, consts)


def _named_code_sink(target: ast.expr) -> bool:
    name = target.id if isinstance(target, ast.Name) else (
        target.attr if isinstance(target, ast.Attribute) else "")
    return "reasons" in name or name.endswith("flags")


def emitted_codes() -> dict[str, set[str]]:
    """Code -> where it is emitted (module:line)."""
    trees = _trees()
    consts = _constants(trees)
    found: dict[str, set[str]] = {}

    def note(module: str, node: ast.AST, expr: ast.expr | None) -> None:
        for code in _strings(expr, consts[module]):
            found.setdefault(code, set()).add(f"{module}:{getattr(node, 'lineno', 0)}")

    # Parameters that flow straight into a sink: (module, function) -> parameter positions.
    relay: dict[tuple[str, str], list[int]] = {}
    for module, tree in trees.items():
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            params = [a.arg for a in fn.args.args if a.arg != "self"]
            for sub in ast.walk(fn):
                if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) \
                        and sub.func.attr in ("append", "add") \
                        and _named_code_sink(sub.func.value) and sub.args \
                        and isinstance(sub.args[0], ast.Name) and sub.args[0].id in params:
                    relay.setdefault((module, fn.name), []).append(params.index(sub.args[0].id))

    for module, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                callee = node.func.attr if isinstance(node.func, ast.Attribute) else (
                    node.func.id if isinstance(node.func, ast.Name) else "")
                for i in relay.get((module, callee), ()):
                    if i < len(node.args):
                        note(module, node, node.args[i])
                f = node.func
                if isinstance(f, ast.Attribute) and f.attr in ("append", "add", "extend") \
                        and _named_code_sink(f.value) and node.args:
                    note(module, node, node.args[0])
                for kw in node.keywords:
                    if kw.arg in ("reasons", "flags"):
                        note(module, node, kw.value)
                if isinstance(f, ast.Name) and f.id == "Reading" and len(node.args) >= 8:
                    note(module, node, node.args[7])
                if isinstance(f, ast.Attribute) and f.attr == "reading" and len(node.args) >= 4:
                    note(module, node, node.args[3])
            elif isinstance(node, ast.AugAssign) and _named_code_sink(node.target):
                note(module, node, node.value)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    elts = t.elts if isinstance(t, ast.Tuple) else [t]
                    values = (node.value.elts if isinstance(t, ast.Tuple)
                              and isinstance(node.value, ast.Tuple) else [node.value])
                    for tt, vv in zip(elts, values * len(elts) if len(values) == 1 else values,
                                      strict=False):
                        # A display string built for a person is not a code.
                        if vv is not None and _named_code_sink(tt) and not any(
                                isinstance(x, ast.JoinedStr) for x in ast.walk(vv)):
                            note(module, node, vv)
            elif isinstance(node, ast.FunctionDef) and "reasons" in node.name:
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Return):
                        note(module, sub, sub.value)
    return found


def registered(code: str) -> bool:
    return code in quality.ALL_CODES


def documented_codes() -> set[str]:
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## Quality codes", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE))


def test_every_code_the_source_emits_is_registered() -> None:
    found = emitted_codes()
    unknown = {code: sorted(where) for code, where in found.items() if not registered(code)}
    assert not unknown, f"emitted but not in agent/quality.py: {unknown}"
    # The scan must see the codes it is meant to police, or it proves nothing.
    for known in ("overflow", "out_of_range", "clock_unsynced", "rate", "spike", "stuck",
                  "frozen", "partial", "redacted", "inconsistent:", "disagreement:", "drift:",
                  "downweighted:"):
        assert known in found, f"the scan no longer finds {known!r}"


def test_every_registered_code_is_explained_in_the_docs() -> None:
    documented = documented_codes()
    wanted = {c + "<name>" if c.endswith(":") else c for c in quality.ALL_CODES}
    # A prefixed flag is documented with the kind of name it takes.
    docs_norm = {re.sub(r":<\w+>$", ":<name>", d) for d in documented}
    missing = sorted(wanted - docs_norm)
    assert not missing, f"docs/mqtt.md, Quality codes, does not explain: {missing}"
    stale = sorted(d for d in docs_norm if d not in wanted)
    assert not stale, f"docs/mqtt.md lists codes the agent does not have: {stale}"


def test_window_flags_are_recognised_with_any_name() -> None:
    assert quality.known_window_flag("drift:bme1.temperature")
    assert quality.known_window_flag("partial")
    assert not quality.known_window_flag("drift:")
    assert not quality.known_window_flag("spike")
