"""The layout holds: no import circle among the modules of src/, and no import from a lower floor back up.

Floors, from the top: the command lines; the trainer; the parts it composes (the model, the
corpus, checkpoints, monitoring, the config, and training's own parts); the run's safety. Every
import statement counts, also those inside functions (a circle through a deferred import is still
a circle). Read from the source with `ast`, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
COMMANDS = {"train_qlora", "prepare_data", "evaluate", "export", "generate"}
FLOOR_NAMES = {4: "command line", 3: "trainer", 2: "part", 1: "run safety"}


def floor(module: str) -> int:
    if module in COMMANDS:
        return 4
    if module == "training.trainer":
        return 3
    if module.split(".")[0] == "run_safety":
        return 1
    return 2


def project_modules() -> dict[str, Path]:
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(module: str, path: Path, modules: dict) -> set[str]:
    """The project's modules that `module` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule where there is one
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules and name != module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def test_the_source_tree_is_read_whole():
    graph = import_graph()
    assert {"train_qlora", "training.trainer", "base_model.loading", "run_safety.durable", "config"} <= set(graph)
    assert "run_safety.durable" in graph["checkpoints.manager"]  # the reader sees imports at all


def test_no_import_circle():
    graph = import_graph()
    circles, state = [], {}

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles: " + "; ".join(" -> ".join(circle) for circle in circles)


def test_no_import_from_a_lower_floor_back_up():
    upward = [f"{module} ({FLOOR_NAMES[floor(module)]}) imports {target} ({FLOOR_NAMES[floor(target)]})"
              for module, targets in import_graph().items() for target in sorted(targets)
              if floor(target) > floor(module)]
    assert not upward, "\n".join(upward)


def test_the_source_root_holds_only_command_lines_and_the_config():
    loose = sorted(path.stem for path in SRC.glob("*.py"))
    assert set(loose) == COMMANDS | {"config"}, f"modules outside a package: {sorted(set(loose) - COMMANDS)}"
