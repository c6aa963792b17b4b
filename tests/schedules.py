"""Random valid schedules for the conformance suite."""
from __future__ import annotations

import random

from dynaflow.runtime import BatchLayout, OpGraph, Schedule, Step, StreamSpec


def random_splits(layout: BatchLayout, rng: random.Random) -> tuple[str, tuple[int, ...]]:
    n = layout.num_requests
    k = rng.randint(1, min(4, n))
    cuts = sorted(rng.sample(range(1, n), k - 1)) if k > 1 else []
    bounds = [0, *cuts, n]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    if rng.random() < 0.5:  # the same cut, in tokens
        tokens = layout.request_tokens
        return "tokens", tuple(sum(tokens[a:b]) for a, b in zip(bounds, bounds[1:]))
    return "requests", tuple(sizes)


def random_order(graph: OpGraph, num_nano: int, num_streams: int, rng: random.Random) -> list[Step]:
    """A random topological order of the (op, nano) DAG, each step on a random stream."""
    done: set[tuple[str, int]] = set()
    todo = [(op.name, b) for b in range(num_nano) for op in graph.ops]
    order = []
    while todo:
        ready = [(o, b) for o, b in todo if all((d, b) in done for d in graph.op(o).deps)]
        o, b = rng.choice(ready)
        todo.remove((o, b))
        done.add((o, b))
        order.append(Step(op=o, nano=b, stream=rng.randrange(num_streams)))
    return order


def random_schedule(graph: OpGraph, layout: BatchLayout, rng: random.Random, *, cuda_graph: bool = False) -> Schedule:
    unit, sizes = random_splits(layout, rng)
    num_streams = rng.randint(1, 3)
    streams = tuple(StreamSpec(priority=rng.choice([0, -1])) for _ in range(num_streams))
    order = random_order(graph, max(1, len(sizes)), num_streams, rng) if rng.random() < 0.85 else []
    return Schedule(split_unit=unit, split_sizes=sizes, streams=streams, order=tuple(order),
                    cuda_graph=cuda_graph, label="random")
