"""The project's modules import one another one way only, and pipeline/ and farm/ load without Ray.

Every import counts: at module level, inside functions (lazy) and under TYPE_CHECKING, since each
says that one module knows the other, and a cycle among them is a tangle to pull apart later.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "farm", "cluster")


def project_modules() -> dict[str, Path]:
    """'pipeline.sampling.sampler' -> its file, for every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            parts = file.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return modules


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement loads (a from-import: the module and each name as a submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file."""
    graph: dict[str, set[str]] = {}
    for module, file in modules.items():
        tree = ast.parse(file.read_text(), str(file))
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = imported_names(node, module, file.name == "__init__.py")
                targets |= {name for name in names if name in modules and name != module}
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module loads: outside every function body (if/try/TYPE_CHECKING blocks included)."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            todo.extend(ast.iter_child_nodes(node))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_relative_imports_resolve_to_project_modules():
    node = ast.parse("from .health import task_row").body[0]
    assert imported_names(node, "pipeline.graph.worker", False) == [
        "pipeline.graph.health",
        "pipeline.graph.health.task_row",
    ]
    node = ast.parse("from . import errors").body[0]
    assert imported_names(node, "pipeline", True) == ["pipeline", "pipeline.errors"]


def test_the_project_has_no_import_cycle():
    modules = project_modules()
    graph = import_graph(modules)
    assert "pipeline.sampling.sampler" in graph and sum(map(len, graph.values())) > 50  # the graph was really built
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_pipeline_and_farm_do_not_import_ray_when_they_load():
    offenders = []
    for module, file in project_modules().items():
        if module.split(".")[0] not in ("pipeline", "farm"):
            continue
        for node in module_level_imports(ast.parse(file.read_text(), str(file))):
            names = imported_names(node, module, file.name == "__init__.py")
            if any(name == "ray" or name.startswith("ray.") or name.startswith("cluster") for name in names):
                offenders.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, "imports Ray (directly or through cluster/) at module level: " + ", ".join(offenders)


def test_the_drivers_packages_make_openmp_threads_sleep_before_torch_loads():
    import os
    import subprocess
    import sys

    probe = "import os, sys, {0}; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for package in ("farm", "cluster"):
        out = subprocess.run([sys.executable, "-c", probe.format(package)], env=env, capture_output=True, text=True)
        assert out.stdout.split() == ["PASSIVE", "False"], out.stderr  # set, and torch not loaded yet
    chosen = subprocess.run(
        [sys.executable, "-c", probe.format("farm")],
        env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
        capture_output=True,
        text=True,
    )
    assert chosen.stdout.split() == ["ACTIVE", "False"]  # a policy the user set stands


def _model_libraries_after_importing(modules: str) -> str:
    """What of torch, diffusers and transformers a fresh interpreter has loaded after importing `modules`."""
    import subprocess
    import sys

    probe = f"import sys, {modules}; print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    return out.stdout.strip() or out.stderr


def test_asking_the_farm_something_loads_no_model_libraries():
    # what `farm status` imports, the controller's and the workers' modules, which Ray imports wherever a client looks
    # them up (ray.get_actor), and the HTTP API's, which `farm down` loads to stop it: with torch and diffusers there,
    # every status query took seconds before it asked anything
    modules = "farm.cli, farm.farm_cli, cluster.farm_client, cluster.farm, cluster.farm_worker, cluster.farm_api"
    assert _model_libraries_after_importing(modules) == "[]"


def test_reading_run_folders_loads_no_model_libraries():
    # `farm runs` and `farm ledger` read spec.json and the ledger: with the spec's sampler names and concepts coming
    # from modules that import diffusers and torch, each took 5-8 s on a 2-core VM before it read a file
    modules = "farm.runs, farm.rundir, farm.ledger, farm.timeline, pipeline.spec"
    assert _model_libraries_after_importing(modules) == "[]"
