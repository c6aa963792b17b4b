"""NanoFlow-style: 1-4 nano-batches, ops on streams by resource class, SM shares, stagger.

What varies: the number of nano-batches and their relative sizes (snapped to split steps and
request boundaries), how ops map to streams (one stream; compute vs memory+copy; compute vs
memory vs copy; one stream per nano-batch), with tensor parallelism whether the collectives get
a stream of their own (the network stream: each nano-batch's all-reduce overlaps the next one's
compute), each stream's SM share in partition steps (or no partition), the stagger between
nano-batches (which orders the collectives among the other ops), stream priorities, and CUDA-graph
capture.
"""
from dynaflow.runtime import Schedule, StreamSpec
from dynaflow.runtime.devices import device_type
from dynaflow.runtime.graph import Resource

from .base import SpaceContext, Trial, sm_shares, splits_from_weights, staggered_order

name = "nanoflow"
MAPPINGS = {
    "one": lambda res, b: 0,
    "compute|rest": lambda res, b: 0 if res is Resource.COMPUTE else 1,
    # copies and collectives share the third stream: both move bytes, neither computes
    "compute|memory|copy": lambda res, b: {Resource.COMPUTE: 0, Resource.MEMORY: 1}.get(res, 2),
    "per-nano": lambda res, b: b,
}


def suggest(trial: Trial, ctx: SpaceContext) -> Schedule:
    k = trial.suggest_int("num_nano", 1, min(4, len(ctx.boundaries()) - 1))
    weights = [trial.suggest_int(f"weight_{i}", 1, 4) for i in range(k)]
    sizes = splits_from_weights(ctx, weights) if k > 1 else ()
    num_nano = max(1, len(sizes))
    mapping = trial.suggest_categorical("streams", list(MAPPINGS))
    route = network_stream(trial, ctx, MAPPINGS[mapping], num_nano)
    num_streams = max(route(op.resource, b) for op in ctx.graph.ops for b in range(num_nano)) + 1
    stagger = trial.suggest_int("stagger", 0, 4)
    own_network = route is not MAPPINGS[mapping]
    # the network stream holds no SMs of its own: its tasks only wait for a collective, which NCCL
    # runs on its own stream (an SM share there would reserve SMs nothing uses)
    streams = sm_shares(trial, ctx, num_streams - own_network) + ((StreamSpec(),) if own_network else ())
    if trial.suggest_categorical("prioritise_memory", [False, True]) and num_streams > 1:
        streams = tuple(type(s)(sm_share=s.sm_share, priority=-1 if i > 0 else 0) for i, s in enumerate(streams))
    graph = device_type(ctx.hardware.kind).graphs and trial.suggest_categorical("cuda_graph", [False, True])
    if num_nano == 1 and num_streams == 1:  # one nano-batch on one stream is the baseline, however ordered
        return Schedule(label="nanoflow:sequential")
    order = staggered_order(ctx, num_nano, stagger, lambda op, b: route(ctx.graph.op(op).resource, b))
    net = "+network" if own_network else ""
    return Schedule(split_sizes=sizes, streams=streams, order=order, cuda_graph=graph,
                    label=f"nanoflow:{num_nano}x:{mapping}{net}:stagger{stagger}")


def network_stream(trial: Trial, ctx: SpaceContext, route, num_nano: int):
    """With collectives in the graph (tensor parallelism): whether they get a stream of their own,
    after the mapping's streams, so that one nano-batch's collective overlaps another's compute."""
    if not any(op.resource is Resource.NETWORK for op in ctx.graph.ops):
        return route
    if not trial.suggest_categorical("network_stream", [False, True]):
        return route
    own = max(route(op.resource, b) for op in ctx.graph.ops if op.resource is not Resource.NETWORK
              for b in range(num_nano)) + 1
    return lambda res, b: own if res is Resource.NETWORK else route(res, b)
