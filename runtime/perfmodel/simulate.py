"""Predict a schedule's time from a profile: a pure function, no device, no torch op.

    sim = Simulator(profile, graph, layout)
    sim.predict(schedule).ms          # the whole call, as Bench times it
    sim.headroom()                    # the sequential prediction and the bound no schedule beats

The simulation follows the executor's rules (runtime/plan.py, runtime/backends/): each stream
runs its tasks in issue order; a task reading a value made on another stream waits for it (and
for the wake-up the profile measured); a task's solo time is its op's at the nano-batch's tokens
and the stream's share (the profile's fits, runtime/perfmodel/profile.py); while tasks on other
streams run, a task progresses at the rate the measured interference leaves it
(beta[own class][other class] of its speed lost beside one other: a fluid model, so two tasks that serialise on one unit
finish when they would one after the other; beside several, the slowdowns add, as k equal shares
of one unit run each at 1/k). Where tasks are issued from:
- "per-stream" (the CPU backend): each stream's thread pays the dispatch cost before each task;
- "one-issuer" (CUDA eager): one host thread issues every task in the schedule's order, a
  dispatch cost each, and a task cannot start before it is issued; a CUDA graph replays the
  whole plan with no per-task issue cost.
The run's fixed cost (starting and joining its streams) is the profile's, per stream count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from ..batch import BatchLayout
from ..graph import OpGraph
from ..plan import default_order
from ..schedule import Schedule
from .profile import Profile, _features, pair_mode

MIN_RATE = 0.05  # a task never stalls outright: interference fitted on two streams, applied to more


@dataclass(frozen=True, kw_only=True, slots=True)
class Prediction:
    ms: float  # the whole call: fixed run cost + the simulated makespan
    makespan_ms: float
    busy_ms: dict[str, float]  # solo time per resource class (what the bound is made of)
    streams: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Headroom:
    sequential_ms: float
    bound_speedup: float  # the sum of the op classes' solo times over the busiest class's
    busiest: str
    busy_ms: dict[str, float]

    def text(self) -> str:
        parts = ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(self.busy_ms.items(), key=lambda kv: -kv[1]))
        return (f"sequential predicted {self.sequential_ms:.2f} ms; no schedule can beat {self.bound_speedup:.2f}x "
                f"(the busiest class, {self.busiest}, is {self.busy_ms[self.busiest]:.2f} ms of {sum(self.busy_ms.values()):.2f}: "
                f"{parts})")


@dataclass(slots=True)
class _Task:
    op: str
    nano: int
    stream: int
    resource: str
    solo_ms: float
    deps: list[int] = field(default_factory=list)  # tasks on other streams it waits for
    issue_ms: float = 0.0
    start_ms: float = math.nan
    end_ms: float = math.nan
    left: float = 0.0  # solo milliseconds of work left


class Simulator:
    """A profile applied to one model's graph and batch layout."""

    def __init__(self, profile: Profile, graph: OpGraph, layout: BatchLayout) -> None:
        missing = [op.name for op in graph.ops if op.name not in profile.ops]
        if missing:
            raise ValueError(f"the profile has no op(s) {missing[:4]}: it was measured on another model; renew it.")
        self.profile, self.graph, self.layout = profile, graph, layout
        self.resources = {op.name: str(op.resource) for op in graph.ops}
        self._deps = {op.name: op.deps for op in graph.ops}
        self._solo: dict[tuple, float] = {}
        self._ranges: dict[tuple, list[tuple[int, int]]] = {}

    # ---- the parts a schedule's time is made of
    def solo_ms(self, op: str, r0: int, r1: int, share: int | None) -> float:
        key = (op, r0, r1, share)
        if (ms := self._solo.get(key)) is None:
            ms = self._solo[key] = self.profile.solo_ms(op, _features(self.layout, r0, r1), share)
        return ms

    def _nano_ranges(self, schedule: Schedule) -> list[tuple[int, int]]:
        key = (schedule.split_unit, schedule.split_sizes)
        if (r := self._ranges.get(key)) is None:
            r = self._ranges[key] = self.layout.request_ranges(*key)
        return r

    # ---- the simulation
    def predict(self, schedule: Schedule) -> Prediction:
        ranges = self._nano_ranges(schedule)
        order = schedule.order or default_order(self.graph, schedule.num_nano)
        shares = [s.sm_share for s in schedule.streams]
        tasks: list[_Task] = []
        where: dict[tuple[str, int], int] = {}
        busy: dict[str, float] = {}
        for step in order:
            r0, r1 = ranges[step.nano]
            t = _Task(op=step.op, nano=step.nano, stream=step.stream, resource=self.resources[step.op],
                      solo_ms=self.solo_ms(step.op, r0, r1, shares[step.stream]))
            t.deps = [where[(d, step.nano)] for d in self._deps[step.op]
                      if (d, step.nano) in where and tasks[where[(d, step.nano)]].stream != step.stream]
            where[(step.op, step.nano)] = len(tasks)
            tasks.append(t)
            busy[t.resource] = busy.get(t.resource, 0.0) + t.solo_ms
        used = sorted({t.stream for t in tasks})
        p = self.profile
        one_issuer = p.issue == "one-issuer"
        if one_issuer and not schedule.cuda_graph:
            for i, t in enumerate(tasks):
                t.issue_ms = (i + 1) * p.dispatch_ms
        makespan = self._run(tasks, shares, one_issuer, graph=schedule.cuda_graph)
        ms = makespan + p.run_overhead_ms(len(used))
        if schedule.is_sequential and shares[0] is None and p.sequential_ms:  # its own call, measured
            ms = p.sequential_ms
        return Prediction(ms=ms, makespan_ms=makespan, busy_ms=busy, streams=len(used))

    def _run(self, tasks: list[_Task], shares: list[int | None], one_issuer: bool, *, graph: bool) -> float:
        p = self.profile
        queues: dict[int, list[int]] = {}
        for i, t in enumerate(tasks):
            queues.setdefault(t.stream, []).append(i)
            t.left = t.solo_ms
        head = {k: 0 for k in queues}
        free_at = {k: 0.0 for k in queues}  # when each stream's last task ended
        running: list[int] = []
        now, done = 0.0, 0
        gap = 0.0 if (one_issuer or graph) else p.dispatch_ms
        while done < len(tasks):
            # the earliest moment each idle stream's next task can start
            starts = []
            busy_streams = {tasks[i].stream for i in running}
            for k, q in queues.items():
                if k in busy_streams or head[k] >= len(q):
                    continue
                t = tasks[q[head[k]]]
                if any(math.isnan(tasks[d].end_ms) for d in t.deps):
                    continue  # waits for a producer still running or not started
                at = max(free_at[k] + gap, t.issue_ms,
                         max((tasks[d].end_ms + p.wake_ms for d in t.deps), default=0.0))
                starts.append((at, k))
            rates = {i: self._rate(tasks, i, running, shares) for i in running}
            finish = min(((now + tasks[i].left / rates[i], i) for i in running), default=(math.inf, -1))
            start = min(starts, default=(math.inf, -1))
            if start[0] <= finish[0] and start[1] >= 0:
                dt = max(start[0], now) - now
                self._advance(tasks, running, rates, dt)
                now += dt
                i = queues[start[1]][head[start[1]]]
                head[start[1]] += 1
                tasks[i].start_ms = now
                running.append(i)
                continue
            if finish[1] < 0:
                raise ValueError("the schedule cannot run: a task waits for one that never starts "
                                 "(its order issues a step before the step it reads from)")
            self._advance(tasks, running, rates, finish[0] - now)
            now = finish[0]
            for i in [i for i in running if tasks[i].left <= 1e-12 or i == finish[1]]:
                tasks[i].end_ms, tasks[i].left = now, 0.0
                free_at[tasks[i].stream] = now
                running.remove(i)
                done += 1
        return now

    @staticmethod
    def _advance(tasks, running, rates, dt: float) -> None:
        for i in running:
            tasks[i].left -= rates[i] * dt

    def _rate(self, tasks: list[_Task], i: int, running: list[int], shares: list[int | None]) -> float:
        """The rate task i progresses at beside the tasks running on other streams."""
        t, slow = tasks[i], 0.0
        for j in running:
            o = tasks[j]
            if o.stream == t.stream:
                continue
            mode = pair_mode(shares[t.stream], shares[o.stream])
            beta = self.profile.beta(mode, t.resource, o.resource)
            slow += beta / (1.0 - beta)  # the time it adds per unit of work: these add up
        return max(MIN_RATE, 1.0 / (1.0 + slow))

    def headroom(self) -> Headroom:
        """The sequential schedule's predicted time, and the bound no schedule can beat: with every
        op class on its own unit at full speed, the busiest class's total solo time."""
        seq = self.predict(Schedule())
        busiest = max(seq.busy_ms, key=seq.busy_ms.get)
        return Headroom(sequential_ms=seq.ms, bound_speedup=sum(seq.busy_ms.values()) / seq.busy_ms[busiest],
                        busiest=busiest, busy_ms=dict(seq.busy_ms))


# ---- how far to trust it: the model's error over measured schedules
@dataclass(frozen=True, kw_only=True, slots=True)
class ModelError:
    n: int
    rho: float | None  # Spearman's rank correlation of predicted and measured speedups
    median_abs: float | None  # median |predicted / measured - 1| of the speedups
    worst: float | None = None

    def text(self) -> str:
        if self.n == 0 or self.median_abs is None:
            return "model error this run: no schedule was both predicted and measured"
        rho = "n/a (fewer than 3, or all equal)" if self.rho is None else f"{self.rho:.2f}"
        return (f"model error this run: Spearman rho {rho} over {self.n} schedule(s), median |error| "
                f"{self.median_abs:.1%} (worst {self.worst:.1%})")

    def to_dict(self) -> dict:
        return {"n": self.n, "rho": self.rho, "median_abs": self.median_abs, "worst": self.worst}


def model_error(pairs: Sequence[tuple[float, float]]) -> ModelError:
    """(predicted, measured) speedups over the sequential schedule -> the model's error. Speedups,
    not times: each measured one is paired with the sequential run beside it, so how fast the host
    happened to be in that moment cancels out (a time predicted from a profile measured in another
    moment would carry it)."""
    pairs = [(p, m) for p, m in pairs if p > 0 and m > 0 and math.isfinite(p) and math.isfinite(m)]
    if not pairs:
        return ModelError(n=0, rho=None, median_abs=None)
    errors = sorted(abs(p / m - 1) for p, m in pairs)
    mid = len(errors) // 2
    median = errors[mid] if len(errors) % 2 else (errors[mid - 1] + errors[mid]) / 2
    return ModelError(n=len(pairs), rho=spearman([p for p, _ in pairs], [m for _, m in pairs]), median_abs=median,
                      worst=errors[-1])


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get their mean rank); None below 3 points or with no spread."""
    if len(a) != len(b) or len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return None if va == 0 or vb == 0 else cov / math.sqrt(va * vb)


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks

