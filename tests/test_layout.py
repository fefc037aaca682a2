"""The layout as README draws it: wdx/ by stage, each stage importing only the ones below it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bottom to top: a module may import its own stage and the stages before it (strictjson: anyone)
STAGES = ["model", "data", "config", "scoring", "train", "deploy"]
COMMANDS = {"evaluate", "transcribe", "pack", "inspect", "export_ct2", "study"}  # the `python -m wdx.X` entry points


def imports() -> dict[str, set[str]]:
    """Every wdx module and the wdx modules it imports, at module level or inside a function."""
    found = {}
    for path in (ROOT / "wdx").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wdx"):
                assert node.level == 0, f"{name}: relative import"
                deps |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("wdx")}
        found[name] = deps
    return {name: {d for d in deps if d in found and d != name} for name, deps in found.items()}


def stage(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "wdx"


def test_no_module_imports_itself_through_others():
    graph, state = imports(), {}

    def visit(node, path):
        state[node] = "open"
        for dep in graph[node]:
            if dep.startswith(node + ".") or graph.get(dep) is None:
                continue  # a package importing its own submodule
            assert state.get(dep) != "open", f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_each_stage_imports_only_the_stages_below_it():
    for module, deps in imports().items():
        here = stage(module)
        if here not in STAGES:
            continue  # wdx/demo, the command entry points, wdx itself
        for dep in deps:
            there = stage(dep)
            if there in STAGES:
                assert STAGES.index(there) <= STAGES.index(here), f"{module} imports {dep}: {there} is above {here}"


def test_flat_modules_are_the_config_the_json_writer_and_the_commands():
    flat = {p.stem for p in (ROOT / "wdx").glob("*.py")} - {"__init__"}
    assert flat == {"config", "strictjson"} | COMMANDS and len(flat) <= 8
    assert len((ROOT / "train_loop.py").read_text().splitlines()) <= 500
