"""The package's import structure: every subpackage sits below the ones that use it.

Parses each module's imports (top-level and deferred ones inside functions alike) with `ast`, without importing
anything, and checks that no library subpackage imports the command line (`cli`) or the demo, that no two modules
import each other through any chain, and that no two subpackages (and top-level modules) do either.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "internvlx_hf"
TOP_ROOMS = ("cli", "demo")


def _module_name(path: Path) -> tuple[str, list[str]]:
    parts = ["internvlx_hf", *path.relative_to(PACKAGE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), parts
    return ".".join(parts), parts[:-1]


def _exists(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path, package: list[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "internvlx_hf":
                continue
            for alias in node.names:  # `from . import chat` imports the module chat
                found.add(f"{module}.{alias.name}" if _exists(f"{module}.{alias.name}") else module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "internvlx_hf"}
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name, package = _module_name(path)
        graph[name] = _imports(path, package)
    for name, targets in graph.items():
        # Edges between files, as the issue asks: `from ..evaluation.metrics import x` is an edge to metrics.py, not
        # to evaluation/__init__.py (which Python also runs first; see the note in docs/design.md).
        graph[name] = {t for t in targets if t in graph and t != name}
    return graph


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_is_read():
    graph = _graph()
    assert "internvlx_hf.cli.command" in graph["internvlx_hf.cli.chat"]
    assert "internvlx_hf.generation" in graph["internvlx_hf.evaluation.runner"]  # a deferred import counts
    assert "internvlx_hf.token_budget" in graph["internvlx_hf.evaluation.runner"]


@pytest.mark.parametrize("top", TOP_ROOMS)
def test_no_library_room_imports_the_command_line_or_the_demo(top):
    allowed = {"cli", "demo", "__main__"} if top == "demo" else {"cli", "__main__"}
    offenders = sorted(f"{module} -> {target}" for module, targets in _graph().items() for target in targets
                       if _room(target) == top and _room(module) not in allowed)
    assert offenders == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_rooms_form_layers():
    """A room imports only rooms below it: no chain of imports leads from a room back into itself, even when the
    files involved form no cycle (`data.sources` once imported `evaluation.metrics` while `evaluation` reads `data`;
    the metrics now sit below both, in `internvlx_hf.metrics`)."""
    rooms: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        rooms.setdefault(_room(module), set()).update(_room(target) for target in targets)
    rooms = {room: targets - {room} for room, targets in rooms.items()}
    assert "metrics" in rooms["data"] and "metrics" in rooms["evaluation"]
    assert _cycles(rooms) == []


def test_the_server_is_one_room_used_through_its_package():
    """`internvlx_hf.serving`'s modules import one another only: everything else (the command line) imports the
    package, whose names are the server's public API."""
    graph = _graph()
    offenders = sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                       if target.startswith("internvlx_hf.serving.") and _room(module) != "serving")
    assert offenders == []
    assert "internvlx_hf.serving" in graph["internvlx_hf.cli.serve"]


def test_no_command_borrows_from_another_command():
    """A command's module uses what the command line shares (`cli.command`, `cli.quantization`, `cli.train_flags`)
    and the library rooms below it, never another command's module (`eval` once loaded its model through
    `cli.chat`, `demo` read its video through it: both now use `internvlx_hf.loading`)."""
    shared = {"internvlx_hf.cli", "internvlx_hf.cli.command", "internvlx_hf.cli.quantization",
              "internvlx_hf.cli.train_flags"}
    offenders = sorted(f"{module} -> {target}" for module, targets in _graph().items() for target in targets
                       if module != "internvlx_hf.cli" and _room(module) == "cli" and _room(target) == "cli"
                       and target not in shared)
    assert offenders == []
    assert "internvlx_hf.loading" in _graph()["internvlx_hf.cli.eval"]


def test_nothing_outside_modeling_imports_a_private_name_from_it():
    """`modeling`'s private names (``_rms``, which the vLLM plugin once borrowed) are its own: other rooms use its
    public ones (`scale_to_rms`, `attach_projectors`), so `modeling` can change its insides freely."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name, package = _module_name(path)
        if _room(name) == "modeling":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module.startswith("internvlx_hf.modeling"):
                offenders += [f"{name}: {module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert offenders == []


BENCHMARKS = PACKAGE.parents[1] / "benchmarks"


def _benchmark_imports(path: Path) -> tuple[set[str], list[str]]:
    """The top-level names a benchmark file imports, and the string constants its code adds to ``sys.path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level:
            names.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
    path_strings = [const.value for node in ast.walk(tree)
                    if isinstance(node, ast.Call) and "sys.path" in ast.unparse(node.func)
                    for const in ast.walk(node) if isinstance(const, ast.Constant) and isinstance(const.value, str)]
    return names, path_strings


def test_benchmarks_import_only_the_package_and_each_other():
    """A benchmark imports the package, its dependencies and the benchmarks' own modules, never the tests (helpers
    both use live in a benchmark module, e.g. ``vllm_tiny``), and no two benchmark modules import each other."""
    files = sorted(BENCHMARKS.rglob("*.py"))
    own = {path.stem for path in files}
    test_modules = {path.stem for path in (PACKAGE.parents[1] / "tests").glob("*.py")} - own
    graph = {}
    for path in files:
        names, path_strings = _benchmark_imports(path)
        assert not names & test_modules, f"{path.name} imports a test module: {sorted(names & test_modules)}"
        assert not [s for s in path_strings if "tests" in s], f"{path.name} puts tests/ on sys.path"
        graph[path.stem] = names & own - {path.stem}
    assert "vllm_tiny" in graph["bench_vllm_lvtc_savings"]  # the graph is read
    for name, targets in graph.items():
        for target in targets:
            assert name not in graph.get(target, set()), f"{name} and {target} import each other"


def test_experiments_hold_records_not_code():
    """`experiments/` keeps one record per finished study; a study's code leaves the tree with its end (the record
    names a commit that has it), so no code there imports the package or sits in its import graph (docs/design.md)."""
    experiments = PACKAGE.parents[1] / "experiments"
    code = [str(path.relative_to(experiments)) for path in experiments.rglob("*") if path.suffix in (".py", ".sh")]
    assert code == []


def test_modules_and_functions_stay_readable():
    """One job per module: no file of the package over 600 lines, no function over 100 (docs/design.md)."""
    long_files, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        name = str(path.relative_to(PACKAGE))
        if source.count("\n") > 600:
            long_files.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                long_functions.append(f"{name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert (long_files, long_functions) == ([], [])
