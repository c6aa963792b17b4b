"""Cut an unchanged nn.Module into named ops with torch.fx, at module boundaries.

Each call of a child module (a ModuleList/ModuleDict counts its items) starts an op; glue code
between modules (slicing, residual adds) joins the op that produced its latest input, so it
never creates a false dependency. The model's final residual add is rewritten to write into
a caller-given buffer, so re-joining nano-batches copies no bytes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.split_module import split_module

RESOURCES = ("compute", "memory", "copy")
OUT = "dynaflow_out"


@dataclass(frozen=True, kw_only=True, slots=True)
class Op:
    """One op: a partition of the layer. `deps`: ops whose outputs it reads (same nano-batch)."""

    name: str
    deps: tuple[str, ...]
    flops: float = 0.0
    bytes: float = 0.0
    resource: str = "compute"


@dataclass(kw_only=True, slots=True)
class OpGraph:
    """The layer as ops in topological order, plus the split GraphModule that runs them."""

    ops: tuple[Op, ...]
    module: fx.GraphModule
    writes_output: bool  # True: the last op writes into the out buffer itself (zero-copy join)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(op.name for op in self.ops)

    @property
    def depth(self) -> int:
        """Ops on the longest dependency path."""
        longest: dict[str, int] = {}
        for op in self.ops:  # topological order
            longest[op.name] = 1 + max((longest[d] for d in op.deps if d in longest), default=0)
        return max(longest.values(), default=0)

    def op(self, name: str) -> Op:
        for op in self.ops:
            if op.name == name:
                return op
        raise KeyError(f"no op named {name!r}; ops: {list(self.names)}")

    def describe(self) -> str:
        rows = [f"{'op':<16} {'resource':<8} {'GFLOP':>9} {'MB':>9}  deps"]
        rows += [f"{o.name:<16} {o.resource:<8} {o.flops / 1e9:>9.3f} {o.bytes / 1e6:>9.2f}  {','.join(o.deps)}"
                 for o in self.ops]
        return "\n".join(rows)


def add_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.add(a, b, out=out)


def trace(model: nn.Module) -> OpGraph:
    """Trace `model` (unchanged) and split it into ops."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types; the user needs the model name and the reason
        raise ValueError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: {e}); the runtime cuts "
            "models with torch.fx, so Python branches on tensor values (or signatures fx cannot read) must not be "
            "in the traced forward."
        ) from None
    writes_output = _rewrite_final_add(gm)
    pid, names = _assign_partitions(gm, model)
    split = split_module(gm, model, lambda n: pid[n])
    ops = tuple(Op(name=names[p], deps=deps) for p, deps in _partition_deps(split, names))
    return OpGraph(ops=ops, module=split, writes_output=writes_output)


def _rewrite_final_add(gm: fx.GraphModule) -> bool:
    """`return a + b` becomes `return add_into(a, b, out)`: the join writes in place."""
    graph = gm.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    final = out_node.args[0]
    is_add = isinstance(final, fx.Node) and final.op == "call_function" and final.target in (operator.add, torch.add)
    if not is_add or len(final.args) != 2 or final.kwargs or len(final.users) != 1:
        return False
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_placeholder):
        out = graph.placeholder(OUT)
    final.target, final.args = add_into, (*final.args, out)
    gm.recompile()
    return True


def _module_key(node: fx.Node, model_children: dict[str, nn.Module]) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if node.op == "call_module":
        path = str(node.target)
    elif stack:
        path = next(iter(stack.values()))[0]
    else:
        return None
    parts = path.split(".")
    head = parts[0]
    if isinstance(model_children.get(head), (nn.ModuleList, nn.ModuleDict)) and len(parts) > 1:
        return f"{head}.{parts[1]}"
    return head


def _assign_partitions(gm: fx.GraphModule, model: nn.Module) -> tuple[dict[fx.Node, int], dict[int, str]]:
    children = dict(model.named_children())
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    pid: dict[fx.Node, int] = {}
    names: dict[int, str] = {}
    current_key = None
    for node in nodes:  # module nodes: a new op whenever the module changes
        key = _module_key(node, children)
        if key is not None and key != current_key:
            names[len(names) + 1] = _unique(key, names.values())
            current_key = key
        if key is not None:
            pid[node] = len(names)
    for node in nodes:  # glue: with its producer, or with its consumer when it joins several ops
        if node not in pid and node.op != "get_attr":
            pid[node] = _glue_partition(node, pid)
            names.setdefault(pid[node], "prologue")
    for node in nodes:  # parameters live with their first user
        if node.op == "get_attr" and node.users:
            pid[node] = min(pid.get(u, 0) for u in node.users)
    return pid, names


def _glue_partition(node: fx.Node, pid: dict[fx.Node, int]) -> int:
    producers = {pid[a] for a in node.all_input_nodes if a in pid}
    latest = max(producers, default=0)
    if len(producers - {0}) < 2:
        return latest
    consumers = [pid[u] for u in node.users if u in pid]
    return min(consumers) if consumers and min(consumers) >= latest else latest


def _unique(key: str, taken) -> str:
    taken = set(taken)
    if key not in taken:
        return key
    i = 2
    while f"{key}#{i}" in taken:
        i += 1
    return f"{key}#{i}"


def _partition_deps(split: fx.GraphModule, names: dict[int, str]):
    producer: dict[fx.Node, str] = {}
    for node in split.graph.nodes:
        if node.op == "call_module":
            p = int(str(node.target).removeprefix("submod_"))
            deps = sorted({producer[a] for a in node.all_input_nodes if a in producer}, key=list(names.values()).index)
            producer[node] = names[p]
            yield p, tuple(deps)
        elif node.op == "call_function" and node.target is operator.getitem:
            if node.args[0] in producer:
                producer[node] = producer[node.args[0]]
