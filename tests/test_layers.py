"""runtime/ and tuner/ import downward only, each within itself, and runtime/ never imports
tuner/, optuna or ray (users load schedules in their servers).

runtime/: the torch-only core knows nothing of workloads, stores, serving or Hugging Face; what
builds a Case from a model spec and what serves one sit above it; the HF code (runtime/hf/) above
that, and the vLLM plugin (runtime/vllm/, which reuses hf's graph cutting) on top.

tuner/, lowest first: how a problem is said, the pure statistics and the small parsers; storage
and the configs; where a schedule is measured (the Target and the paired round, the protocol for
measuring in another process, its transports: the tensor-parallel group and vLLM's worker, the
registry of targets) and where
trials run (pools, progress, Ray); the study; search and confirmation; the tuning session and its
driver; rendering (show, analysis, then the report); the commands; the CLI.

Read from the source (ast), lazy imports included, so an import tucked into a function cannot
hide an upward edge; `if TYPE_CHECKING:` imports are types only and do not count."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
RUNTIME = ROOT / "runtime"
CORE = {"batch", "validate", "files", "devices", "counters", "steady", "telemetry", "graph", "schedule", "case", "plan", "backends",
        "backends.base", "backends.cpu", "backends.cuda", "backends.green_ctx", "executor", "measure", "timeline",
        "hardware", "models", "models.llama", "models.moe", "parallel"}
ABOVE_CORE = {"workload", "store", "shapes", "loading", "serving", "probe"}
PERFMODEL = {"perfmodel", "perfmodel.profile", "perfmodel.simulate", "perfmodel.profiler"}  # the performance model: profiles a Bench
LAYERS = [CORE, PERFMODEL, ABOVE_CORE]  # then runtime.hf (every hf.* module), runtime.vllm, then the package facade (__init__)
TUNER_LAYERS = [
    {"errors", "records", "paired", "buckets", "workloads", "journal", "interrupt"},
    {"storage", "publish"}, {"config"},
    {"measuring"}, {"remote"}, {"tp", "vllm_engine"}, {"targets"}, {"pool", "progress"}, {"ray_fanout"},
    {"study"}, {"guide"}, {"search", "confirm"}, {"session"}, {"tune"},
    {"show", "analysis"}, {"report"},
    {"commands"}, {"cli"}, {"__init__"},
]


def layer_of(module: str, package: str = "runtime") -> int:
    if package == "tuner":
        for i, names in enumerate(TUNER_LAYERS):
            if module in names:
                return i
        raise AssertionError(f"tuner/{module}: put it in a layer in tests/test_layers.py")
    for i, names in enumerate(LAYERS):
        if module in names:
            return i
    if module == "hf" or module.startswith("hf."):
        return len(LAYERS)
    if module == "vllm" or module.startswith("vllm."):
        return len(LAYERS) + 1
    assert module == "__init__", f"runtime/{module}: put it in a layer in tests/test_layers.py"
    return len(LAYERS) + 2


def modules(package: str = "runtime") -> dict[str, Path]:
    found = {}
    root = ROOT / package
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"
        found[name] = path
    return found


def _type_checking_only(tree: ast.Module) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return skip


def imports(name: str, path: Path, known: dict, package: str = "runtime") -> list[tuple[str, bool]]:
    """(module imported, lazily?) for each module of `package` that its module `name` imports."""
    tree = ast.parse(path.read_text())
    skip, top = _type_checking_only(tree), {id(n) for n in tree.body}
    package = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or id(node) in skip:
            continue
        if node.level:
            base = package[:len(package) - node.level + 1]
        elif (node.module or "").startswith(f"dynaflow.{package}"):
            base, node_module = [], node.module.removeprefix(f"dynaflow.{package}").lstrip(".")
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


def edges(package: str = "runtime") -> dict[str, set[tuple[str, bool]]]:
    known = modules(package)
    return {name: set(imports(name, path, known, package)) for name, path in known.items()}


PACKAGES = ("runtime", "tuner")


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_has_a_layer(package):
    for name in modules(package):
        layer_of(name, package)


@pytest.mark.parametrize("package, name", [(p, n) for p in PACKAGES for n in sorted(modules(p))])
def test_no_module_imports_upward(package, name):
    upward = [(dep, lazy) for dep, lazy in edges(package)[name] if layer_of(dep, package) > layer_of(name, package)]
    assert not upward, f"{package}/{name} (layer {layer_of(name, package)}) imports upward: {upward}"


def _imported_roots(path: Path) -> set[str]:
    """Every top-level name a file imports (lazy imports included; TYPE_CHECKING ones not)."""
    tree = ast.parse(path.read_text())
    skip, out = _type_checking_only(tree), set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("name", sorted(modules()))
def test_runtime_never_imports_the_tuner_optuna_or_ray(name):
    bad = sorted(m for m in _imported_roots(modules()[name])
                 if m.split(".")[0] in ("optuna", "ray") or m.startswith("dynaflow.tuner"))
    assert not bad, f"runtime/{name} imports {bad}: what a user's server imports must not need them"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    graph = {name: {dep for dep, _ in deps} for name, deps in edges(package).items()}
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


def test_the_checker_sees_the_old_tuner_cycle(tmp_path):
    """Mutation check: tp's old lazy import of the CLI (closing a 13-module cycle) is caught."""
    known = {**modules("tuner"), "tp": tmp_path / "tp.py"}
    (tmp_path / "tp.py").write_text("def _serve_rank():\n    from .cli import one_line\n")
    deps = imports("tp", known["tp"], known, "tuner")
    assert deps == [("cli", True)] and layer_of("cli", "tuner") > layer_of("tp", "tuner")


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    """Mutation check: the old lazy import in workload.build() is caught."""
    known = {**modules(), "workload": tmp_path / "workload.py"}
    (tmp_path / "workload.py").write_text("def build():\n    from .hf.models import build_hf_case\n")
    deps = imports("workload", known["workload"], known)
    assert deps == [("hf.models", True)] and layer_of("hf.models") > layer_of("workload")


@pytest.mark.parametrize("package", ["runtime", "tuner", "search_spaces"])
def test_every_module_imports(package):
    """Every module imports in a fresh interpreter: a syntax error or a missing name anywhere is
    caught by the quick tier (vllm and ray stay lazy: neither needs to be installed)."""
    import subprocess
    import sys

    names = sorted(f"dynaflow.{package}" + ("" if name == "__init__" else "." + name.removesuffix(".__init__"))
                   for name in modules(package))
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
