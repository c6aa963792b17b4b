"""Cut an unchanged nn.Module into named ops with torch.fx, at module boundaries.

Each call of a child module (a ModuleList/ModuleDict counts its items) starts an op; glue code
between modules (slicing, residual adds) joins the op that produced its latest input, so it
never creates a false dependency. The model's final residual add is rewritten to write into
a caller-given buffer, so re-joining nano-batches copies no bytes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.split_module import split_module

from .parallel import Collective

OUT = "dynaflow_out"


class Resource(str, Enum):
    """What bounds an op: the classes a schedule overlaps. Members are their strings (JSON, dict keys)."""

    COMPUTE = "compute"  # arithmetic intensity above the machine's balance (GEMMs, prefill attention)
    MEMORY = "memory"  # bandwidth-bound (decode attention, norms, activations)
    COPY = "copy"  # moves bytes, no arithmetic
    NETWORK = "network"  # collectives between devices (tensor parallelism)

    __str__ = str.__str__


@dataclass(frozen=True, kw_only=True, slots=True)
class Op:
    """One op: a partition of the layer. `deps`: ops whose outputs it reads (same nano-batch)."""

    name: str
    deps: tuple[str, ...]
    flops: float = 0.0
    bytes: float = 0.0
    resource: Resource = Resource.COMPUTE

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "resource", Resource(self.resource))
        except ValueError:
            raise ValueError(f"op {self.name!r}: resource must be one of {[r.value for r in Resource]}, "
                             f"but got {self.resource!r}.") from None


@dataclass(kw_only=True, slots=True)
class OpGraph:
    """The layer as ops in topological order, plus the split GraphModule that runs them."""

    ops: tuple[Op, ...]
    module: fx.GraphModule
    writes_output: bool  # True: the last op writes into the out buffer itself (zero-copy join)
    targets: dict[str, str] | None = None  # op name -> its submodule in `module`

    def call_node(self, name: str) -> fx.Node:
        """The node of `module`'s graph that runs op `name`."""
        target = self.targets[name]
        return next(n for n in self.module.graph.nodes if n.op == "call_module" and n.target == target)

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
        w = max(16, *(len(o.name) for o in self.ops))
        rows = [f"{'op':<{w}} {'resource':<8} {'GFLOP':>9} {'MB':>9}  deps"]
        rows += [f"{o.name:<{w}} {o.resource:<8} {o.flops / 1e9:>9.3f} {o.bytes / 1e6:>9.2f}  {','.join(o.deps)}"
                 for o in self.ops]
        return "\n".join(rows)


def add_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.add(a, b, out=out)


def trace(model: nn.Module) -> OpGraph:
    """Trace `model` (unchanged) and split it into ops."""
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception as e:  # fx raises many types; the user needs the model name and the reason
        raise ValueError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: {e}); the runtime cuts "
            "models with torch.fx, so Python branches on tensor values (or signatures fx cannot read) must not be "
            "in the traced forward."
        ) from None
    writes_output = _rewrite_final_add(gm)
    children = dict(model.named_children())
    return cut(gm, lambda node: _module_key(node, children), root=model, writes_output=writes_output)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping each collective's call whole (one op of resource class network)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Collective) or super().is_leaf_module(m, qualname)


def cut(gm: fx.GraphModule, key_of: Callable[[fx.Node], str | None], *, root: nn.Module | None = None,
        writes_output: bool = False) -> OpGraph:
    """Split a graph into ops: a new op wherever `key_of` (the module a node belongs to) changes,
    glue with its producer. The one cutting path for torch.fx traces (keyed by the model's child
    modules) and dynamo's graphs (keyed by the innermost module in each node's nn_module_stack)."""
    pid, names = _assign_partitions(gm, key_of)
    after = _input_hazards(gm, pid)
    split = split_module(gm, root, lambda n: pid[n])
    ops = []
    for p, deps in _partition_deps(split, names):
        extra = [names[q] for q in sorted(after.get(p, ())) if names[q] not in deps]
        ops.append((p, Op(name=names[p], deps=tuple(deps) + tuple(extra))))
    ops = _in_program_order(ops)
    return OpGraph(ops=ops, module=split, writes_output=writes_output,
                   targets={names[p]: f"submod_{p}" for p in names if any(o.name == names[p] for o in ops)})


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


def _assign_partitions(gm: fx.GraphModule, key_of) -> tuple[dict[fx.Node, int], dict[int, str]]:
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    pid: dict[fx.Node, int] = {}
    names: dict[int, str] = {}
    current_key, current = None, {}
    for node in nodes:  # module nodes: a new op whenever the module changes
        key = key_of(node)
        if key is not None and key != current_key:
            names[len(names) + 1] = _unique(key, names.values())
            current_key = key
        if key is not None:
            pid[node] = len(names)
        current[node] = len(names)
    written = {n.args[0] for n in nodes if writes_input(n)}
    for node in nodes:  # glue: with its producer, or with its consumer when it joins several ops
        if node not in pid and node.op != "get_attr":
            pid[node] = _glue_partition(node, pid)
            if pid[node] == 0 and any(a in written for a in node.all_input_nodes):
                pid[node] = current[node]  # touches an input written in place: stays in program order
            names.setdefault(pid[node], "prologue")
    for node in nodes:  # parameters live with their first user
        if node.op == "get_attr" and node.users:
            pid[node] = min(pid.get(u, 0) for u in node.users)
    return pid, names


def writes_input(node: fx.Node) -> bool:
    """An in-place op (`x.add_(...)`) on a graph input."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return (name.endswith("_") and not name.startswith("_") and bool(node.args)
            and isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder")


def _input_hazards(gm: fx.GraphModule, pid: dict[fx.Node, int]) -> dict[int, set[int]]:
    """Partition -> partitions it must follow because of an input written in place (a static
    cache, its position counter): data flow does not order a read of the input after the write,
    nor the write after earlier reads. Program order decides, as in the unsplit graph."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    after: dict[int, set[int]] = {}
    for ph in (n for n in gm.graph.nodes if n.op == "placeholder"):
        writes = sorted((u for u in ph.users if u in pid and writes_input(u) and u.args[0] is ph), key=order.get)
        if not writes:
            continue
        touches = sorted((u for u in ph.users if u in pid), key=order.get)
        for w in writes:
            for u in touches:
                if u is not w and pid[u] != pid[w]:
                    first, then = (u, w) if order[u] < order[w] else (w, u)
                    after.setdefault(pid[then], set()).add(pid[first])
    return after


def _in_program_order(ops: list[tuple[int, Op]]) -> tuple[Op, ...]:
    """Ops in a topological order of their deps, earliest partition (program order) first."""
    by_name = {op.name: (p, op) for p, op in ops}
    done: set[str] = set()
    out: list[Op] = []
    pending = sorted(ops, key=lambda x: x[0])
    while pending:
        ready = [(p, op) for p, op in pending if all(d in done or d not in by_name for d in op.deps)]
        if not ready:
            raise ValueError(f"ops depend on each other in a cycle: {[(op.name, op.deps) for _, op in pending][:6]}")
        p, op = ready[0]
        pending.remove((p, op))
        done.add(op.name)
        out.append(op)
    return tuple(out)


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
