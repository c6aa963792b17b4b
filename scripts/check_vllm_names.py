"""Check the private vLLM names the plugin relies on (runtime/vllm/hooks.py) against vLLM wheels,
read as zips: nothing is installed or imported from them, so a CUDA build can be checked on a
machine without a GPU.

    pip download vllm==0.33.0 --no-deps -d wheels/ && python scripts/check_vllm_names.py wheels/vllm-0.33.0-*.whl

Prints one line per name and wheel (present, or missing and why) and exits 1 if any is missing.
What is checked: each (module, attribute) in hooks.NAMES (a top-level definition, assignment or
import of the module, then attributes of a class: methods, fields, enum members); the fields
hooks reads of vLLM's dataclasses (CONTEXT_FIELDS, GROUP_FIELDS, the CommonAttentionMetadata
fields, and no unknown ones); the arguments of GPUModelRunner._build_attention_metadata the plugin
reads; and the custom ops that read the forward context (registered under their names somewhere
in the wheel's source).
"""
from __future__ import annotations

import ast
import re
import sys
import zipfile
from pathlib import Path

from dynaflow.runtime.vllm import hooks


class Wheel:
    """A wheel's Python sources, parsed on demand."""

    def __init__(self, path: str) -> None:
        self.zip = zipfile.ZipFile(path)
        self.names = set(self.zip.namelist())
        self._trees: dict[str, ast.Module | None] = {}
        meta = next((n for n in self.names if n.endswith(".dist-info/METADATA")), None)
        text = self.zip.read(meta).decode() if meta else ""
        name = re.search(r"^Name: (.+)$", text, re.M)
        version = re.search(r"^Version: (.+)$", text, re.M)
        self.label = f"{name.group(1).strip() if name else Path(path).name} {version.group(1).strip() if version else '?'}"

    def module(self, dotted: str) -> ast.Module | None:
        if dotted not in self._trees:
            base = dotted.replace(".", "/")
            path = next((p for p in (f"{base}.py", f"{base}/__init__.py") if p in self.names), None)
            try:
                self._trees[dotted] = None if path is None else ast.parse(self.zip.read(path))
            except SyntaxError:  # a module this Python cannot parse: its names are not found
                self._trees[dotted] = None
        return self._trees[dotted]

    def sources(self):
        for name in self.names:
            if name.endswith(".py"):
                yield name, self.zip.read(name).decode(errors="replace")


def _top(tree: ast.Module, name: str) -> ast.AST | str | None:
    """The definition of `name` at a module's top level (a class, function, assignment), the
    module it is imported from ("from X import name" -> "X.name"), or None."""
    for node in tree.body:
        for found in _defines(node, name):
            return found
    return None


def _defines(node: ast.AST, name: str):
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
        yield node
    elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
        yield node
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
        yield node
    elif isinstance(node, ast.ImportFrom) and node.module:
        for alias in node.names:
            if (alias.asname or alias.name) == name:
                yield f"{'.' * node.level}{node.module}.{alias.name}"
    elif isinstance(node, (ast.If, ast.Try)):  # `if TYPE_CHECKING:`, `try: import ... except`
        for child in [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", []),
                      *[s for h in getattr(node, "handlers", []) for s in h.body]]:
            yield from _defines(child, name)


def _member(cls: ast.ClassDef, name: str) -> ast.AST | None:
    for node in cls.body:
        for found in _defines(node, name):
            if not isinstance(found, str):
                return found
    return None


def resolve(wheel: Wheel, module: str, dotted: str, depth: int = 0) -> tuple[ast.AST | None, str]:
    """(the node `module.dotted` names in the wheel, or None; where it was found or why not)."""
    tree = wheel.module(module)
    if tree is None:
        return None, f"no module {module}"
    first, *rest = dotted.split(".")
    found = _top(tree, first)
    if isinstance(found, str):  # imported from another module: follow it
        if depth > 5:
            return None, f"{module}.{first}: import chain too long"
        src = found
        if src.startswith("."):  # relative: from the module's package, up one more per extra dot
            level = len(src) - len(src.lstrip("."))
            package = module if f"{module.replace('.', '/')}/__init__.py" in wheel.names else module.rpartition(".")[0]
            base = package.split(".")[:len(package.split(".")) - (level - 1)]
            src = ".".join(base + [src.lstrip(".")])
        mod, _, attr = src.rpartition(".")
        return resolve(wheel, mod, ".".join([attr, *rest]), depth + 1)
    if found is None:
        return None, f"{module} defines no {first}"
    node, where = found, f"{module}.{first}"
    for part in rest:
        if not isinstance(node, ast.ClassDef):
            return None, f"{where} is not a class, so has no {part}"
        member = _member(node, part)
        if member is None:
            return None, f"{where} has no {part}"
        node, where = member, f"{where}.{part}"
    return node, where


def fields(cls: ast.ClassDef) -> list[str]:
    return [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]


def check(wheel: Wheel) -> list[tuple[str, bool, str]]:
    """(what, present, detail) per name the plugin relies on."""
    out = []
    for module, dotted in hooks.NAMES:
        node, detail = resolve(wheel, module, dotted)
        out.append((f"{module}.{dotted}", node is not None, detail))
    classes = {"ForwardContext": ("vllm.forward_context", hooks.CONTEXT_FIELDS),
               "AttentionGroup": ("vllm.v1.worker.utils", hooks.GROUP_FIELDS),
               "CommonAttentionMetadata": ("vllm.v1.attention.backend", hooks.COMMON_FIELDS)}
    for cls_name, (module, wanted) in classes.items():
        node, detail = resolve(wheel, module, cls_name)
        have = fields(node) if isinstance(node, ast.ClassDef) else []
        for f in wanted:
            out.append((f"{cls_name}.{f}", f in have, "a field" if f in have else f"not a field of {detail}"))
        if cls_name == "CommonAttentionMetadata":
            unknown = [f for f in have if f not in wanted and not f.startswith("_")]
            out.append(("CommonAttentionMetadata: no field the plugin does not know", not unknown,
                        f"unknown: {unknown}" if unknown else "none"))
    node, detail = resolve(wheel, "vllm.v1.worker.gpu_model_runner", "GPUModelRunner._build_attention_metadata")
    params = [a.arg for a in node.args.args + node.args.kwonlyargs] if isinstance(node, ast.FunctionDef) else []
    for arg in hooks.BUILD_ARGS:
        out.append((f"GPUModelRunner._build_attention_metadata({arg}=)", arg in params,
                    "an argument" if arg in params else f"not an argument of {detail}"))
    sources = list(wheel.sources())
    for op in hooks.CONTEXT_OPS:
        hit = next((name for name, text in sources if re.search(rf"""op_name\s*=\s*["']{op}["']""", text)), None)
        out.append((f"torch.ops.vllm.{op}", hit is not None, f"registered in {hit}" if hit else "registered nowhere"))
    return out


def main(argv: list[str]) -> int:
    if not argv or any(not Path(a).is_file() for a in argv):
        bad = [a for a in argv if not Path(a).is_file()]
        print(f"check_vllm_names: give vLLM wheel files{f' ({bad} is not a file)' if bad else ''}: "
              "pip download vllm==0.33.0 --no-deps -d wheels/", file=sys.stderr)
        return 2
    missing = 0
    for path in argv:
        try:
            wheel = Wheel(path)
        except zipfile.BadZipFile:
            print(f"check_vllm_names: {path} is not a wheel (not a zip file)", file=sys.stderr)
            return 2
        results = check(wheel)
        missing += sum(not ok for _, ok, _ in results)
        print(f"{wheel.label}: {sum(ok for _, ok, _ in results)} of {len(results)} names present")
        for what, ok, detail in results:
            print(f"  {'ok     ' if ok else 'MISSING'} {what}{'' if ok else f'  ({detail})'}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
