"""The house rules of reward_server/, checked on its source: no module over 300 lines, no import cycle, and every
import goes down the layer chain that docs/architecture.md draws."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "reward_server"
MAX_LINES = 300

# The layers, top first: a module may import modules of its own layer or of layers below it, never above.
LAYERS = ["launcher", "cli", "app", "check", "kinds", "serving", "engine", "faults", "scoring", "loading", "distributed",
          "config", "protocol"]
CLIENT = "client"  # the client stands apart: it may import protocol alone


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__init__" else ""


def imports_of(path: Path, module: str):
    """reward_server modules that `module` imports (absolute names)."""
    tree = ast.parse(path.read_text())
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if path.name == "__init__.py":
        package = module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("reward_server"):
                if node.module is None or name.count(".") == 0:  # from . import x / from reward_server import x
                    for alias in node.names:
                        yield f"{name}.{alias.name}"
                else:
                    yield name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("reward_server"):
                    yield alias.name


@pytest.mark.parametrize("path", [p for p, _ in modules()], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_over_300_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {n} lines; split it by job"


def test_imports_go_down_the_layers_and_the_client_needs_protocol_only():
    wrong = []
    for path, module in modules():
        mine = layer_of(module)
        for target in imports_of(path, module):
            theirs = layer_of(target)
            if not theirs or theirs == mine:
                continue
            if mine == CLIENT or theirs == CLIENT:
                if not (mine == CLIENT and theirs == "protocol"):
                    wrong.append(f"{module} -> {target}")
                continue
            if mine not in LAYERS or theirs not in LAYERS:
                wrong.append(f"{module} -> {target} (a layer docs/architecture.md does not name)")
            elif LAYERS.index(theirs) < LAYERS.index(mine):
                wrong.append(f"{module} -> {target} (upward)")
    assert not wrong, "imports against the layer chain:\n" + "\n".join(wrong)


def test_no_import_cycle():
    graph = {}
    names = {m for _, m in modules()}
    for path, module in modules():
        graph[module] = {t for t in imports_of(path, module) if t in names and t != module}
    state, cycle = {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in graph[m]:
            if state.get(t) == "open":
                cycle.append(stack[stack.index(t):] + [t] if t in stack else [m, t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycle, f"import cycles: {cycle[:3]}"
