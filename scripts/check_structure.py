"""`make lint`'s structure checks (ruff does the style): layers import one way (storage <- pipeline
<- stages <- cli), no import cycles between project modules, and no function over 80 lines outside
tests/, benchmarks/, demo/ and scripts/. Prints each violation; exits 1 when there is any."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"storage": 0, "pipeline": 1, "stages": 2, "cli": 3}
MAX_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(tree: ast.AST, package: str) -> set[str]:
    """Project modules imported anywhere in a file (function-level imports included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else ".".join(package.split(".")[: 1 - node.level]
                                                                   + [node.module])
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in LAYERS}
    return found


def long_functions(tree: ast.AST, path: Path) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_LINES:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name} is {lines} lines "
                           f"(at most {MAX_LINES})")
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def main() -> int:
    files = [ROOT / "cli.py"] + sorted(p for top in ("storage", "pipeline", "stages")
                                       for p in (ROOT / top).rglob("*.py"))
    modules = {module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    problems = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = {t for t in project_imports(tree, package) if t in modules}
        graph[name] = targets - {name}
        for t in sorted(graph[name]):
            if LAYERS[t.split(".")[0]] > LAYERS[name.split(".")[0]]:
                problems.append(f"{path.relative_to(ROOT)}: imports {t}, a layer above it")
        problems += long_functions(tree, path)
    cycle = find_cycle(graph)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    print("\n".join(problems) if problems else f"structure: {len(modules)} modules, layers one way, "
          f"no cycles, no function over {MAX_LINES} lines")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
