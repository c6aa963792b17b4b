"""When each op of each nano-batch ran, on which stream: CUDA events on a GPU, clocks on CPU.

    tl = record_timeline(compiled)           # runs the schedule 5 times, every task timed, medians kept
    seq, best = record_timelines([a, b])     # several schedules, warmed, their runs interleaved
    tl.to_chrome_trace("trace.json")         # open in chrome://tracing or ui.perfetto.dev
    overlap(tl)                              # what ran at the same time, per pair of resource classes

Recording wraps the plan's tasks for one run and restores them; the model is not touched.
"""
from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .executor import Compiled


@dataclass(frozen=True, kw_only=True, slots=True)
class Span:
    op: str
    nano: int
    stream: int
    start_ms: float
    end_ms: float
    resource: str = "compute"  # a graph.Resource (a str) of the op


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeline:
    label: str
    spans: tuple[Span, ...]
    makespans_ms: tuple[float, ...] = ()  # each recorded run's wall time, for the ratio's spread
    walls_ms: tuple[float, ...] = ()  # each recorded run's whole call (start and join included), host clock

    @property
    def makespan_ms(self) -> float:
        return max((s.end_ms for s in self.spans), default=0.0)

    def to_chrome_trace(self, path: str | Path | None = None) -> dict:
        """The Chrome/Perfetto trace-event format: one thread per stream, one slice per task."""
        events = [{"name": s.op, "cat": s.resource, "ph": "X", "pid": 1, "tid": s.stream,
                   "ts": s.start_ms * 1e3, "dur": (s.end_ms - s.start_ms) * 1e3,
                   "args": {"nano_batch": s.nano, "resource": s.resource}} for s in self.spans]
        events += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": k, "args": {"name": f"stream {k}"}}
                   for k in sorted({s.stream for s in self.spans})]
        trace = {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"schedule": self.label}}
        if path is not None:
            Path(path).write_text(json.dumps(trace))
        return trace


def record_timeline(compiled: Compiled, resources: dict[str, str] | None = None, *, runs: int = 5) -> Timeline:
    """Run the compiled schedule `runs` times with every task timed; each (op, nano-batch) span
    is the median start and end over the runs (one run's noise would draw a different picture
    each time). Not for measuring: timing adds a little overhead per task, which is why
    measurement (Bench.measure) never does this."""
    return record_timelines([compiled], resources, runs=runs)[0]


def record_timelines(compiled: list[Compiled], resources: dict[str, str] | None = None, *,
                     runs: int = 5, warmup: int = 2) -> list[Timeline]:
    """Timelines of several schedules of one model, recorded so that they compare: each warmed
    up `warmup` times first, then their runs interleaved with the order alternating (a b, b a,
    a b, ...), medians kept, so a slow first run or a burst of load lands on all of them alike
    and each run's makespans pair up as one round (tuner/paired.py)."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, but got {runs} and {warmup}.")
    recorders = [_Recorder(c, resources or {}) for c in compiled]
    try:
        for _ in range(warmup):  # first-run costs are not the schedule's
            for r in recorders:
                r.run(keep=False)
        for run in range(runs):
            for r in recorders if run % 2 == 0 else recorders[::-1]:
                r.run(keep=True)
    finally:
        for r in recorders:
            r.close()
    return [r.timeline() for r in recorders]


class _Recorder:
    """One compiled schedule with every task wrapped to record its start and end."""

    def __init__(self, compiled: Compiled, resources: dict[str, str]) -> None:
        plan = compiled.plan
        if plan.schedule.cuda_graph:
            raise ValueError("a timeline needs the schedule run eagerly: a CUDA graph replays without its tasks; "
                             "compile it with cuda_graph=False to see its timeline.")
        self.compiled, self.plan, self.resources = compiled, plan, resources
        runner = compiled.runner
        self.cuda = runner.mark is not None  # the backend's streams record device events: timed on the device
        self.marks: list[tuple] = []
        self.lock = threading.Lock()
        self.originals = [t.fn for t in plan.tasks]
        self.per_task: dict[int, list[tuple[float, float]]] = {}
        self.makespans: list[float] = []
        self.walls: list[float] = []
        # On a device each stream's spans are timed with events of its own context (a green stream
        # may record no other), from a base event that stream records before each run: the streams
        # are idle then, so the bases fire together, within the microseconds between their issues.
        self.events = {id(t): (runner.mark(t.stream, True), runner.mark(t.stream, True))
                       for t in plan.tasks} if self.cuda else {}
        self.bases = [runner.mark(k, True) for k in range(len(runner.streams))] if self.cuda else []
        for task in plan.tasks:
            task.fn = self._timed(task, task.fn)

    def _timed(self, task, fn):
        streams = self.compiled.runner.streams

        def run() -> None:
            if self.cuda:
                start, end = self.events[id(task)]
                start.record(streams[task.stream])
                fn()
                end.record(streams[task.stream])
            else:
                start = time.perf_counter()
                fn()
                end = time.perf_counter()
            with self.lock:
                self.marks.append((task, start, end))
        return run

    def run(self, *, keep: bool) -> None:
        self.marks.clear()
        for base, stream in zip(self.bases, self.compiled.runner.streams):
            base.record(stream)
        t0 = time.perf_counter()
        self.compiled()
        self.compiled.backend.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
        if not keep:
            return
        ends = []
        for t, s, e in self.marks:
            span = ((self.bases[t.stream].elapsed_ms(s), self.bases[t.stream].elapsed_ms(e)) if self.cuda
                    else ((s - t0) * 1e3, (e - t0) * 1e3))
            self.per_task.setdefault(id(t), []).append(span)
            ends.append(span[1])
        self.makespans.append(max(ends, default=wall))
        self.walls.append(wall)

    def close(self) -> None:
        for task, fn in zip(self.plan.tasks, self.originals):
            task.fn = fn
        for m in (*self.bases, *(m for pair in self.events.values() for m in pair)):
            m.close()
        self.bases, self.events = [], {}

    def timeline(self) -> Timeline:
        spans = []
        for t in self.plan.tasks:
            times = self.per_task.get(id(t), [])
            if times:
                spans.append(Span(op=t.op, nano=t.nano, stream=t.stream, resource=str(self.resources.get(t.op, "compute")),
                                  start_ms=statistics.median(a for a, _ in times),
                                  end_ms=statistics.median(b for _, b in times)))
        return Timeline(label=self.plan.schedule.label, spans=tuple(sorted(spans, key=lambda s: s.start_ms)),
                        makespans_ms=tuple(self.makespans), walls_ms=tuple(self.walls))


def overlap(tl: Timeline, *, top: int = 5) -> dict:
    """Why a schedule is fast, from its timeline: how long ops on different streams ran at the
    same time, in all (`overlapped_ms`: time with two or more streams busy) and by what was busy
    together (`by_resources`, e.g. "compute+memory", or "compute+compute+memory" with three
    streams busy: each instant counted once, so these add up to `overlapped_ms`), and the `top`
    pairs of (op/nano-batch) that overlapped longest."""
    spans = tl.spans
    pairs = []
    for i, a in enumerate(spans):
        for b in spans[i + 1:]:
            if b.start_ms >= a.end_ms:
                break  # sorted by start: nothing later overlaps a
            ms = min(a.end_ms, b.end_ms) - b.start_ms
            if a.stream != b.stream and ms > 0:
                pairs.append((ms, f"{a.op}/{a.nano}", f"{b.op}/{b.nano}"))
    pairs.sort(key=lambda p: -p[0])
    by_resources = _busy_together(spans)
    return {"makespan_ms": round(tl.makespan_ms, 4), "overlapped_ms": round(sum(by_resources.values()), 4),
            "by_resources": {k: round(v, 4) for k, v in sorted(by_resources.items(), key=lambda kv: -kv[1])},
            "top": [{"ops": [a, b], "ms": round(ms, 4)} for ms, a, b in pairs[:top]]}


def _busy_together(spans) -> dict[str, float]:
    """Wall time with two or more streams busy, by the resource classes busy then (a sweep over
    span edges: each instant counted once, whatever the number of streams)."""
    edges = sorted([(s.start_ms, 1, i) for i, s in enumerate(spans)] + [(s.end_ms, -1, i) for i, s in enumerate(spans)])
    active: set[int] = set()
    out: dict[str, float] = {}
    last = None
    for t, delta, i in edges:
        if last is not None and t > last and len({spans[j].stream for j in active}) >= 2:
            key = "+".join(sorted(str(spans[j].resource) for j in active))
            out[key] = out.get(key, 0.0) + t - last
        if delta > 0:
            active.add(i)
        else:
            active.discard(i)
        last = t
    return out


def overlap_text(o: dict | None) -> str:
    """An overlap summary in one line."""
    if not o:
        return "no timeline recorded"
    if not o.get("overlapped_ms"):
        return f"nothing ran at the same time ({o['makespan_ms']:.2f} ms timeline)"
    pairs = ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(o["by_resources"].items(), key=lambda kv: -kv[1]))
    top = "; ".join(f"{p['ops'][0]} | {p['ops'][1]} {p['ms']:.2f} ms"
                    for p in sorted(o["top"], key=lambda p: -p["ms"])[:3])
    return (f"{o['overlapped_ms']:.2f} of {o['makespan_ms']:.2f} ms with two or more streams busy ({pairs}); "
            f"longest: {top}")
