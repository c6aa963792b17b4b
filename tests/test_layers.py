"""runtime/ imports downward only: the torch-only core knows nothing of workloads, stores, serving
or Hugging Face; what builds a Case from a model spec and what serves one sit above it; the HF
code (runtime/hf/) above that, and the vLLM plugin (runtime/vllm/, which reuses hf's graph
cutting) on top. Read from the source (ast), lazy imports included, so an
import tucked into a function cannot hide an upward edge; `if TYPE_CHECKING:` imports are types
only and do not count."""
import ast
from pathlib import Path

import pytest

RUNTIME = Path(__file__).parents[1] / "runtime"
CORE = {"batch", "validate", "files", "counters", "telemetry", "graph", "schedule", "case", "plan", "backends",
        "backends.base", "backends.cpu", "backends.cuda", "backends.green_ctx", "executor", "measure", "timeline",
        "hardware", "models", "models.llama", "models.moe", "parallel"}
ABOVE_CORE = {"workload", "store", "shapes", "loading", "serving", "probe"}
LAYERS = [CORE, ABOVE_CORE]  # then runtime.hf (every hf.* module), runtime.vllm, then the package facade (__init__)


def layer_of(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if module in names:
            return i
    if module == "hf" or module.startswith("hf."):
        return len(LAYERS)
    if module == "vllm" or module.startswith("vllm."):
        return len(LAYERS) + 1
    assert module == "__init__", f"runtime/{module}: put it in a layer in tests/test_layers.py"
    return len(LAYERS) + 2


def modules() -> dict[str, Path]:
    found = {}
    for path in RUNTIME.rglob("*.py"):
        parts = path.relative_to(RUNTIME).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"
        found[name] = path
    return found


def _type_checking_only(tree: ast.Module) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return skip


def imports(name: str, path: Path, known: dict) -> list[tuple[str, bool]]:
    """(module imported, lazily?) for each runtime module `name` imports."""
    tree = ast.parse(path.read_text())
    skip, top = _type_checking_only(tree), {id(n) for n in tree.body}
    package = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or id(node) in skip:
            continue
        if node.level:
            base = package[:len(package) - node.level + 1]
        elif (node.module or "").startswith("dynaflow.runtime"):
            base, node_module = [], node.module.removeprefix("dynaflow.runtime").lstrip(".")
            base = node_module.split(".") if node_module else []
        else:
            continue
        target = ".".join(base + ([node.module] if node.level and node.module else []))
        for alias in node.names:
            sub = f"{target}.{alias.name}" if target else alias.name
            dep = sub if sub in known else (target or "__init__")
            if dep in known and dep != name:
                out.append((dep, id(node) not in top))
    return out


def edges() -> dict[str, set[tuple[str, bool]]]:
    known = modules()
    return {name: set(imports(name, path, known)) for name, path in known.items()}


def test_every_runtime_module_has_a_layer():
    for name in modules():
        layer_of(name)


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_imports_upward(name):
    upward = [(dep, lazy) for dep, lazy in edges()[name] if layer_of(dep) > layer_of(name)]
    assert not upward, f"runtime/{name} (layer {layer_of(name)}) imports upward: {upward}"


def test_no_import_cycle():
    graph = {name: {dep for dep, _ in deps} for name, deps in edges().items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path[path.index(dep):] + [dep])}")
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    """Mutation check: the old lazy import in workload.build() is caught."""
    known = {**modules(), "workload": tmp_path / "workload.py"}
    (tmp_path / "workload.py").write_text("def build():\n    from .hf.models import build_hf_case\n")
    deps = imports("workload", known["workload"], known)
    assert deps == [("hf.models", True)] and layer_of("hf.models") > layer_of("workload")
