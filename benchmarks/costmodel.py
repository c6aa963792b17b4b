"""A deterministic latency model of a schedule: roofline op costs at real dimensions, a fluid
simulation of streams sharing SMs and HBM bandwidth, and pairwise interference.

It is a landscape for benchmarking the *search* (how many trials a sampler needs), not a
prediction of GPU timings: the constants are the field's reported numbers, not measurements.
"""
from __future__ import annotations

from dataclasses import dataclass

from dynaflow.runtime import BatchLayout, Schedule
from dynaflow.runtime.plan import default_order
from dynaflow.runtime.workload import PRESETS

PEAK_FLOPS = 800e12  # bf16 dense GEMM an H100 SXM measures (DESIGN.md)
PEAK_BYTES = 3.0e12  # device-to-device copy an H100 SXM measures
NUM_SMS = 132
SATURATING_SM_FRACTION = 0.4  # about 40% of the SMs can saturate HBM
LAUNCH_S = {False: 4e-6, True: 1e-6}  # per op: eager launch vs CUDA-graph replay
INTERFERENCE = {frozenset({"compute"}): 0.10, frozenset({"memory"}): 0.15, frozenset({"compute", "memory"}): 0.05,
                 # a collective reads and writes HBM as it goes: it slows memory-bound ops more than GEMMs
                 frozenset({"network"}): 0.0, frozenset({"compute", "network"}): 0.03,
                 frozenset({"memory", "network"}): 0.08}
BYTES = 2  # bf16
# Tensor parallelism (all-reduces over NVLink): the bus bandwidth nccl-tests report for an 8 x H100
# SXM all-reduce (NVLink 4, about 450 GB/s each way per GPU), a small all-reduce's latency at TP-8,
# and the SMs a running NCCL kernel holds (its channels), taken from the SMs the other ops share.
NVLINK_BUS_BYTES = 400e9
COLLECTIVE_LATENCY_S = 20e-6
NCCL_SMS = 16


@dataclass(frozen=True, slots=True)
class Cost:
    flops: float
    bytes: float
    network: float = 0.0  # bytes each rank moves over NVLink (a collective's bus bytes)

    @property
    def resource(self) -> str:
        if self.network:
            return "network"
        return "compute" if self.flops / max(self.bytes, 1) > PEAK_FLOPS / PEAK_BYTES else "memory"


def op_cost(op: str, model: str, decode: int, context: int, prefill_reqs: int, chunk: int, tp: int = 1) -> Cost:
    """One op's cost on one rank: the preset's TP shard at `tp` > 1, whose all-reduces move
    2(tp-1)/tp of the hidden states each."""
    c = PRESETS[model].shard(tp) if tp > 1 else PRESETS[model]
    t = decode + prefill_reqs * chunk
    if op.endswith("_allreduce"):
        return Cost(0.0, 0.0, network=BYTES * t * c.hidden * 2 * (tp - 1) / tp)
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    gemms = {"qkv_proj": (c.hidden, qkv), "o_proj": (c.num_heads * c.head_dim, c.hidden),
             "gate_up_proj": (c.hidden, 2 * c.intermediate), "down_proj": (c.intermediate, c.hidden)}
    if op in gemms:
        k, n = gemms[op]
        return Cost(2 * t * k * n, BYTES * (k * n + t * (k + n)))
    if op == "decode_attn":
        kv = decode * (context + 1) * c.num_kv_heads * c.head_dim
        return Cost(4 * decode * c.num_heads * (context + 1) * c.head_dim, BYTES * 2 * kv)
    if op == "prefill_attn":
        return Cost(2 * prefill_reqs * c.num_heads * c.head_dim * chunk * chunk, BYTES * prefill_reqs * chunk * 2 * qkv)
    width = {"attn_norm": c.hidden, "mlp_norm": c.hidden, "rope": qkv, "act": 3 * c.intermediate}.get(op, 0)
    return Cost(0.0, BYTES * 2 * t * width)


@dataclass(slots=True)
class _Task:
    stream: int
    cost: Cost
    deps: list[int]
    issue_s: float
    progress: float = 0.0
    done_s: float | None = None


def simulate(schedule: Schedule, op_names, op_deps, layout: BatchLayout, model: str, context: int,
             tp: int = 1) -> float:
    """Makespan in seconds of one run of `schedule` (on one rank of a TP group at `tp` > 1)."""
    tasks = _tasks(schedule, op_names, op_deps, layout, model, context, tp)
    streams = schedule.streams
    now, running, pending = 0.0, [], list(range(len(tasks)))
    while pending or running:
        for i in list(pending):  # start every task whose stream is idle, deps done and issue time passed
            t = tasks[i]
            first_of_stream = next(j for j in pending if tasks[j].stream == t.stream) == i
            idle = not any(tasks[j].stream == t.stream for j in running)
            if first_of_stream and idle and t.issue_s <= now and all(tasks[d].done_s is not None for d in t.deps):
                running.append(i)
                pending.remove(i)
        rates = _rates([tasks[i] for i in running], streams)
        finish = [(1 - tasks[i].progress) / r for i, r in zip(running, rates)]
        issues = [tasks[i].issue_s - now for i in pending if tasks[i].issue_s > now]
        step = min(finish + issues) if finish or issues else 0.0
        now += step
        for i, r in zip(list(running), rates):
            tasks[i].progress += r * step
            if tasks[i].progress >= 1 - 1e-9:
                tasks[i].done_s = now
                running.remove(i)
        if not running and pending and not issues and step == 0.0:
            raise RuntimeError("deadlock in the schedule simulation")
    return now


def _tasks(schedule, op_names, op_deps, layout, model, context, tp) -> list[_Task]:
    ranges = layout.request_ranges(schedule.split_unit, schedule.split_sizes)
    order = schedule.order or default_order(_Names(op_names), len(ranges))
    launch = LAUNCH_S[schedule.cuda_graph]
    index = {(s.op, s.nano): i for i, s in enumerate(order)}
    tasks = []
    for i, s in enumerate(order):
        r0, r1 = ranges[s.nano]
        kinds, tokens = layout.request_kinds[r0:r1], layout.request_tokens[r0:r1]
        prefill = [n for k, n in zip(kinds, tokens) if k == "prefill"]
        cost = op_cost(s.op, model, kinds.count("decode"), context, len(prefill), prefill[0] if prefill else 0, tp)
        deps = [index[(d, s.nano)] for d in op_deps[s.op]]
        tasks.append(_Task(stream=s.stream, cost=cost, deps=deps, issue_s=(i + 1) * launch))
    return tasks


class _Names:
    def __init__(self, names) -> None:
        self.names = tuple(names)


def _rates(running: list[_Task], streams) -> list[float]:
    """Progress per second (fraction of its work) of each running task.

    Each task runs at its standalone rate within its caps (an SM partition caps compute at its
    share and bandwidth at share / 40%); unpartitioned tasks then share the unreserved SMs, all
    tasks share HBM bandwidth (scaled down together on overflow), and each concurrent pair
    slows both by its interference factor. A running collective takes its latency plus its bus
    bytes over NVLink's bandwidth (shared by the collectives running at once), and holds NCCL's
    SMs, which the unpartitioned tasks then lack."""
    collectives = sum(1 for t in running if t.cost.network)
    free = max(NUM_SMS - sum(s.sm_share or 0 for s in streams) - NCCL_SMS * collectives, 8) / NUM_SMS
    need_c = [t.cost.flops / PEAK_FLOPS for t in running]  # seconds of the whole GPU's compute
    need_m = [t.cost.bytes / PEAK_BYTES for t in running]  # seconds of the whole GPU's bandwidth
    rates = []
    for t, c, m in zip(running, need_c, need_m):
        if t.cost.network:
            rates.append(1.0 / (COLLECTIVE_LATENCY_S + t.cost.network * collectives / NVLINK_BUS_BYTES))
            continue
        share = streams[t.stream].sm_share
        cap_c = share / NUM_SMS if share else free
        cap_m = min(1.0, cap_c / SATURATING_SM_FRACTION)
        rates.append(min(cap_c / c if c else 1e9, cap_m / m if m else 1e9))
    shared = [i for i, t in enumerate(running) if not streams[t.stream].sm_share and not t.cost.network]
    used_c = sum(need_c[i] * rates[i] for i in shared)
    if used_c > free:
        for i in shared:
            rates[i] *= free / used_c
    used_m = sum(m * r for m, r in zip(need_m, rates))
    if used_m > 1:  # HBM oversubscribed: the ops using it slow together (a collective's cost is NVLink's)
        rates = [r if t.cost.network else r / used_m for t, r in zip(running, rates)]
    return [r / (1 + sum(INTERFERENCE[frozenset({t.cost.resource, o.cost.resource})]
                         for j, o in enumerate(running) if j != i))
            for i, (t, r) in enumerate(zip(running, rates))]
